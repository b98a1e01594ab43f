"""The architecture facts and the defects they fixed: tied heads absent from the file stay float and are named in
the quantization config; modules transformers keeps in float32 stay float32 and unquantized; the merge finiteness
check does not overflow in fp16; Conv1D orientation comes from one module (openai-gpt's 2:4 groups along inputs)."""

from __future__ import annotations

import json

import pytest
import torch
from _architectures import build, model_class
from _loading import load_checked
from safetensors.torch import load_file

import weightsmith as ws
from weightsmith import architecture


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def make(name):
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(name)
            build(name).save_pretrained(cache[name])
        return cache[name]

    return make


def _qc(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("name,head", [("whisper", "proj_out"), ("t5", "lm_head")])
@pytest.mark.parametrize("scheme,key", [("int8", "ignore"), ("nf4", "llm_int8_skip_modules")])
def test_tied_head_absent_from_file_is_named_kept_float(saved, tmp_path, name, head, scheme, key):
    src = saved(name)
    assert f"{head}.weight" not in load_file(src / "model.safetensors")  # tied: not stored
    ws.quantize(src, tmp_path / "q", scheme)
    assert head in _qc(tmp_path / "q")[key]
    model = load_checked(model_class(name), tmp_path / "q")  # no `proj_out.weight_scale | MISSING`
    assert type(model.get_submodule(head)) is torch.nn.Linear


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_t5_float32_modules_stay_float32_and_unquantized(saved, tmp_path, scheme):
    src = saved("t5")
    assert architecture.model_facts(json.loads((src / "config.json").read_text())).keep_fp32 == ("wo",)
    ws.quantize(src, tmp_path / "q", scheme)
    stored = load_file(tmp_path / "q" / "model.safetensors")
    wo = [n for n in stored if n.endswith("DenseReluDense.wo.weight")]
    assert wo and all(stored[n].dtype == torch.float32 and stored[n].shape == (64, 128) for n in wo)
    assert not any(n.startswith(tuple(w.removesuffix("weight") for w in wo)) and n not in wo for n in stored)
    load_checked(model_class("t5"), tmp_path / "q")  # expects a float [64, 128] wo


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic", "slerp"])
def test_fp16_merge_of_large_finite_tensor_is_not_refused(tmp_path, method):
    # 1024×1024 values near 0.1: every result is finite, but its fp16 sum (~1e5) overflows at 65504
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        t = (0.1 + 0.01 * torch.randn(1024, 1024, generator=g)).half()
        ws.save({"w.weight": t}, tmp_path / f"m{i}")
        paths.append(str(tmp_path / f"m{i}"))
    base, a, b = paths
    density = {"density": 0.5} if method == "ties" else {}
    models = [{"model": m, "parameters": {"weight": 0.5, **density}} for m in (a, b)]
    config = {"merge_method": method, "models": models, "dtype": "float16"}
    if method != "linear":
        config["base_model"] = base
    if method == "slerp":
        config.update(models=[{"model": a}], parameters={"t": 0.5})
    ws.merge.run(config, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")["w.weight"]
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())
    assert not torch.isfinite(out.sum())  # the sum the old check took does overflow


def test_openai_gpt_conv1d_2_4_groups_along_inputs(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.OpenAIGPTConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = tf.OpenAIGPTLMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "src")
    ws.prune(tmp_path / "src", tmp_path / "out", pattern="2:4")
    out = load_file(tmp_path / "out" / "model.safetensors")
    conv1d = [n for n, m in model.named_modules() if isinstance(m, tf.pytorch_utils.Conv1D)]
    assert conv1d
    for module in conv1d:
        w = out[f"{module}.weight"]  # [in, out]
        assert architecture.is_conv1d(cfg.to_dict(), f"{module}.weight")
        groups = w.t().reshape(-1, 4)  # groups of 4 consecutive inputs of one output
        assert bool(((groups != 0).sum(-1) == 2).all()), module
    load_checked(tf.OpenAIGPTLMHeadModel, tmp_path / "out")


def test_layer_index_takes_the_block_not_the_sub_layer():
    assert architecture.layer_index("encoder.block.3.layer.1.DenseReluDense.wo.weight") == 3
    assert architecture.layer_index("model.layers.11.mlp.up_proj.weight") == 11
    assert architecture.layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert architecture.layer_index("lm_head.weight") is None
    assert architecture.split_layer("encoder.block.3.layer.1.x.weight") == ("encoder.block", 3, "layer.1.x.weight")


def test_inspect_does_not_import_transformers(minilm_path):
    import subprocess
    import sys

    code = (
        f"import sys, weightsmith as ws; ws.inspect({str(minilm_path)!r}); "
        "print([m for m in ('transformers', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_openai_gpt_wanda_scores_conv1d_rows_along_inputs(tmp_path):
    import transformers as tf
    from _prune_utils import CALIBRATION, with_tokenizer, write_lines

    torch.manual_seed(0)
    cfg = tf.OpenAIGPTConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    model = tf.OpenAIGPTLMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "bare")
    src = with_tokenizer(tmp_path / "bare", tmp_path / "src")
    calib = write_lines(tmp_path / "calib.txt", CALIBRATION)
    ws.prune(src, tmp_path / "out", method="wanda", sparsity=0.5, calibration=calib, samples=4, seq_len=16)
    out = load_file(tmp_path / "out" / "model.safetensors")
    conv1d = [n for n, m in model.named_modules() if isinstance(m, tf.pytorch_utils.Conv1D)]
    for module in conv1d:
        w = out[f"{module}.weight"]  # [in, out]: Wanda keeps half of each output's inputs
        assert bool(((w == 0).sum(0) == w.shape[0] // 2).all()), module
    load_checked(tf.OpenAIGPTLMHeadModel, tmp_path / "out")


@pytest.mark.parametrize("field,value", [("tie_word_embeddings", None), ("hidden_size", "wide")])
def test_a_config_transformers_cannot_build_is_refused_in_one_line(tiny_model, tmp_path, field, value):
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), src)
    config = json.loads((src / "config.json").read_text())
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", "quantize", str(src), "-o", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert str(src) in line and "config.json" in line and field in line
    assert not out.exists()


def test_model_facts_of_an_unknown_model_type_are_none():
    assert architecture.model_facts({"model_type": "not-a-transformers-model", "hidden_size": 8}) is None
