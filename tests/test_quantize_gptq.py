"""GPTQ int4 over a checkpoint, one decoder layer at a time: better than round-to-nearest layer by layer (measured in
transformers' own model), loads cleanly, and equals GPTQ run on the fully loaded model; the config, flags and
`device` refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from _distill_utils import write_corpus
from _loading import load_checked
from _tokenizers import byte_level_tokenizer
from conftest import SENTENCES

import weightsmith as ws
from weightsmith.cli import build_parser, main
from weightsmith.compress.quantize import GPTQ, Int4, make_scheme
from weightsmith.compress.quantize.gptq import gptq_int4
from weightsmith.compress.quantize.int4 import dequantize_module, unpack_int4
from weightsmith.errors import CheckpointError, ConfigError, IncompatibleError

GROUP = 32
SAMPLES = 24


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, hidden 64, GQA) with a byte-level BPE tokenizer, and a calibration file beside it."""
    import transformers as tf

    root = tmp_path_factory.mktemp("gptq")
    config = tf.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # correlated input features, as trained models have: where GPTQ's feedback pays
        model.model.embed_tokens.weight.add_(torch.randn(1, 64) * 0.05)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root / "llama")
    byte_level_tokenizer(root / "llama")
    write_corpus(root / "calib.txt", SENTENCES[:SAMPLES])
    return root


def _scheme(root: Path, **gptq) -> Int4:
    return Int4(group_size=GROUP, gptq=GPTQ(calibration=str(root / "calib.txt"), block_size=GROUP, **gptq))


@pytest.fixture(scope="module")
def quantized(llama) -> tuple[Path, dict]:
    out = llama / "gptq"
    report = ws.quantize(llama / "llama", out, scheme=_scheme(llama))
    ws.quantize(llama / "llama", llama / "rtn", scheme=Int4(group_size=GROUP))
    return out, report.details["gptq"]


def _ids(root: Path) -> list[torch.Tensor]:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(root / "llama")
    return [tok(s, return_tensors="pt")["input_ids"] for s in SENTENCES[:SAMPLES]]


def _dequantized(root: Path, name: str):
    """The float model with the weights a quantized output reconstructs (``dequantize``), loaded by transformers."""
    ws.dequantize(root / name, root / f"{name}-float", force=True)
    return load_checked("LlamaForCausalLM", root / f"{name}-float")


def test_gptq_beats_round_to_nearest_layer_by_layer(llama, quantized):
    """Each decoder layer's output on the calibration text is closer to the float model's with GPTQ than with RTN,
    measured in transformers' model (not by the driver); the driver's own per-Linear figures say the same."""
    float_model = load_checked("LlamaForCausalLM", llama / "llama")
    gptq, rtn = _dequantized(llama, "gptq"), _dequantized(llama, "rtn")
    errors = {"gptq": [0.0, 0.0], "rtn": [0.0, 0.0]}
    with torch.no_grad():
        for ids in _ids(llama):
            ref = float_model(input_ids=ids, output_hidden_states=True).hidden_states
            for label, model in (("gptq", gptq), ("rtn", rtn)):
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
                for layer in range(2):  # hidden_states[layer + 1]: after decoder layer `layer`
                    errors[label][layer] += float(torch.sum((hidden[layer + 1] - ref[layer + 1]) ** 2))
    for layer in range(2):
        assert errors["gptq"][layer] < 0.9 * errors["rtn"][layer], (layer, errors)
    rows = quantized[1]["tensors"]
    assert len(rows) == 14  # 7 Linears × 2 layers
    assert all(r["gptq_error"] < r["rtn_error"] for r in rows), rows
    assert quantized[1]["output_error_vs_rtn"] < 0.9


def test_output_loads_in_transformers_and_matches_dequantize(llama, quantized):
    out, _ = quantized
    model = load_checked("LlamaForCausalLM", out)  # compressed-tensors decompresses on load
    reference = _dequantized(llama, "gptq")
    ids = _ids(llama)[0]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    import json

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, GROUP, "group")


def _accumulate(total: torch.Tensor):
    def hook(_module, args):
        x = args[0][0]  # (T, in): one sample
        total.add_(x.T @ x)

    return hook


def _reference_full_model(root: Path, scheme: Int4) -> dict[str, torch.Tensor]:
    """GPTQ with the whole model loaded by transformers: for each layer, the Hessians come from full forward passes
    of the model whose earlier layers are already quantized. Returns {weight name: codes}."""
    model = load_checked("LlamaForCausalLM", root / "llama")
    ids = _ids(root)
    gptq = scheme.gptq
    assert gptq is not None
    codes = {}
    for i, layer in enumerate(model.model.layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        count = {"tokens": 0}
        hooks = [m.register_forward_pre_hook(_accumulate(sums[n])) for n, m in linears.items()]
        with torch.no_grad():
            for x in ids:
                model(input_ids=x)
                count["tokens"] += x.shape[1]
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            h = 2 * sums[n] / count["tokens"]
            q, s, z = gptq_int4(m.weight.data, h, group_size=GROUP, damp=gptq.damp, block_size=gptq.block_size)
            codes[f"model.layers.{i}.{n}.weight"] = q
            m.weight.data = (q.float().reshape(q.shape[0], -1, GROUP) * s.unsqueeze(-1)).reshape(q.shape)
    return codes


def test_layer_at_a_time_equals_the_fully_loaded_model(llama, quantized):
    """The same codes as GPTQ over the fully loaded transformers model, up to float rounding: at most 0.2% of the
    codes of each weight differ, each by one step (a value on a rounding boundary after ~1e-6 of summation-order
    noise in the Hessian), and every scale agrees to 1e-5."""
    from safetensors.torch import load_file

    stored = load_file(quantized[0] / "model.safetensors")
    reference = _reference_full_model(llama, _scheme(llama))
    assert len(reference) == 14
    for name, q_ref in reference.items():
        module = name.removesuffix(".weight")
        q = unpack_int4(stored[f"{module}.weight_packed"], tuple(q_ref.shape))
        differ = q != q_ref
        assert float(differ.float().mean()) <= 0.002, (name, int(differ.sum()))
        assert int((q.int() - q_ref.int()).abs().max()) <= 1, name


@pytest.fixture(scope="module")
def bert(llama) -> Path:
    """A tiny BERT encoder (2 layers, hidden 64, pooler) with correlated input features, and the byte-level tokenizer:
    a text encoder like all-MiniLM-L6-v2, calibrated on the same text."""
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(1)
    model = tf.BertModel(config).eval()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(torch.randn(1, 64) * 0.05)
    model.save_pretrained(llama / "bert")
    byte_level_tokenizer(llama / "bert")
    return llama / "bert"


def test_gptq_on_a_text_encoder(llama, bert):
    """Encoders are calibrated layer by layer too: each encoder layer's output (in transformers' BertModel, with the
    dequantized weights) is closer to the float model's with GPTQ than with RTN; the output loads as a BertModel
    with no bad key and computes what its dequantized float model computes."""
    report = ws.quantize(bert, llama / "bert-gptq", scheme=_scheme(llama))
    ws.quantize(bert, llama / "bert-rtn", scheme=Int4(group_size=GROUP))
    assert len(report.details["gptq"]["tensors"]) == 12  # q, k, v, attention output, intermediate, output × 2
    models = {"float": load_checked("BertModel", bert)}
    for label in ("gptq", "rtn"):
        ws.dequantize(llama / f"bert-{label}", llama / f"bert-{label}-float", force=True)
        models[label] = load_checked("BertModel", llama / f"bert-{label}-float")
    errors = {"gptq": [0.0, 0.0], "rtn": [0.0, 0.0]}
    with torch.no_grad():
        for ids in _ids(llama):
            ref = models["float"](input_ids=ids, output_hidden_states=True).hidden_states
            for label in ("gptq", "rtn"):
                hidden = models[label](input_ids=ids, output_hidden_states=True).hidden_states
                for layer in range(2):
                    errors[label][layer] += float(torch.sum((hidden[layer + 1] - ref[layer + 1]) ** 2))
    for layer in range(2):
        assert errors["gptq"][layer] < 0.9 * errors["rtn"][layer], (layer, errors)
    loaded = load_checked("BertModel", llama / "bert-gptq")  # compressed-tensors decompresses on load
    ids = _ids(llama)[0]
    with torch.no_grad():
        a, b = loaded(input_ids=ids).last_hidden_state, models["gptq"](input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())


def test_act_order_loads_and_beats_round_to_nearest(llama, tmp_path):
    report = ws.quantize(llama / "llama", tmp_path / "out", scheme=_scheme(llama, act_order=True))
    assert report.details["gptq"]["output_error_vs_rtn"] < 0.95
    import json

    weights = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert weights["group_0"]["weights"]["actorder"] == "weight"
    load_checked("LlamaForCausalLM", tmp_path / "out")


def test_cli_gptq(llama, tmp_path, capsys):
    rc = main(
        [
            "quantize", str(llama / "llama"), "-o", str(tmp_path / "out"), "--scheme", "int4", "--group-size", "32",
            "--gptq", "--calibration", str(llama / "calib.txt"), "--samples", "8", "--seq-len", "16", "--json",
        ]
    )  # fmt: skip
    assert rc == 0
    assert '"gptq"' in capsys.readouterr().out
    parts = {
        k.removeprefix("model.layers.0.mlp.down_proj."): v
        for k, v in ws.open(tmp_path / "out").items()
        if k.startswith("model.layers.0.mlp.down_proj.")
    }
    assert dequantize_module(parts).shape == (64, 128)


def test_every_gptq_field_has_a_flag():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    flags = {o for a in sub.choices["quantize"]._actions for o in a.option_strings}
    for field in dataclasses.fields(GPTQ):
        assert "--" + field.name.replace("_", "-") in flags, field.name
    assert "--gptq" in flags and "--device" in flags


def test_scheme_from_flat_options_and_json():
    scheme = make_scheme("int4", group_size=64, gptq=True, calibration="c.txt", damp=0.05, act_order=True)
    assert scheme == Int4(group_size=64, gptq=GPTQ(calibration="c.txt", damp=0.05, act_order=True))
    assert make_scheme(scheme.to_dict()) == scheme  # to_dict round-trips, the nested config included
    with pytest.raises(ConfigError, match="`calibration`"):
        make_scheme("int4", gptq=True)
    with pytest.raises(ConfigError, match="only with `gptq`"):
        make_scheme("int4", damp=0.1)
    with pytest.raises(ConfigError, match="do not apply"):
        make_scheme("int8", gptq=True, calibration="c.txt")
    with pytest.raises(ConfigError, match="`damp`"):
        GPTQ(calibration="c.txt", damp=1.5)


def test_refusals_name_the_problem(llama, tiny_model, tmp_path):
    with pytest.raises(IncompatibleError, match="decoder-only language models and text encoders"):
        ws.quantize(tiny_model("gemma"), tmp_path / "a", scheme=_scheme(llama))
    with pytest.raises(CheckpointError, match="no tokenizer"):
        ws.quantize(tiny_model("llama"), tmp_path / "b", scheme=_scheme(llama))
    with pytest.raises(ConfigError, match="calibration file not found"):
        missing = Int4(group_size=GROUP, gptq=GPTQ(calibration=str(tmp_path / "x.txt")))
        ws.quantize(llama / "llama", tmp_path / "c", scheme=missing)
    with pytest.raises(ConfigError, match="round-to-nearest runs on the CPU"):
        ws.quantize(llama / "llama", tmp_path / "d", scheme="int4", device="cuda")
    for path in "abcd":
        assert not (tmp_path / path).exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device on a machine without one")
@pytest.mark.parametrize("device, message", [("cuda", "not available"), ("cuda:3", "not available"), ("tpu", "cpu")])
def test_cli_refuses_a_missing_device(llama, tmp_path, capsys, device, message):
    argv = ["quantize", str(llama / "llama"), "-o", str(tmp_path / "out"), "--scheme", "int4", "--gptq"]
    rc = main([*argv, "--calibration", str(llama / "calib.txt"), "--device", device])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "--device" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_result(llama, quantized, tmp_path):
    """GPTQ on the GPU: the same codes as on the CPU up to float rounding (≤ 0.5% of codes, by one step)."""
    from safetensors.torch import load_file

    ws.quantize(llama / "llama", tmp_path / "cuda", scheme=_scheme(llama), device="cuda")
    cpu = load_file(quantized[0] / "model.safetensors")
    gpu = load_file(tmp_path / "cuda" / "model.safetensors")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        if name.endswith("weight_packed"):
            shape = tuple(int(d) for d in cpu[name.replace("packed", "shape")].tolist())
            a, b = unpack_int4(cpu[name], shape), unpack_int4(gpu[name], shape)
            assert float((a != b).float().mean()) <= 0.005, name
            assert int((a.int() - b.int()).abs().max()) <= 1, name


def test_layers_are_written_in_numeric_order():
    """Layer 10 after layer 2 (not in the file's lexicographic order), tensors before the first layer first and the
    rest last: each layer is calibrated once, in order."""
    from weightsmith.compress.quantize.gptq_driver import _layer_major

    names = ["model.embed_tokens.weight", "lm_head.weight"]
    names += [f"model.layers.{i}.{p}.weight" for i in (0, 1, 10, 2) for p in ("mlp.up_proj", "input_layernorm")]
    names += ["model.norm.weight"]
    ordered = _layer_major(names)
    assert ordered[:2] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert [n.split(".")[2] for n in ordered[2:-1]] == ["0", "0", "1", "1", "2", "2", "10", "10"]
    assert ordered[-1] == "model.norm.weight"
