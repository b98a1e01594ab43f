"""export onnx for generation: a causal LM's graph with its KV cache (optimum's ``-with-past`` names), the task
inferred from the checkpoint, and greedy decoding through onnxruntime held to transformers' ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _architectures import build

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.errors import ConfigError
from weightsmith.export.to_onnx.generate import greedy

ort = pytest.importorskip("onnxruntime")


def _names(layers: int = 2) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


@pytest.fixture(scope="module")
def llama_cached(tmp_path_factory, tiny_model):
    """The tiny Llama exported through the CLI without --task: the cached graph is what it infers."""
    src, out = tiny_model("llama"), tmp_path_factory.mktemp("llama-kv") / "onnx" / "model.onnx"
    assert main(["export", "onnx", str(src), "-o", str(out)]) == 0
    return src, out


def test_inferred_task_is_generation_with_past_under_optimum_names(llama_cached):
    _, out = llama_cached
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs, outputs = _names()
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == outputs
    past = {i.name: i.shape for i in session.get_inputs()}["past_key_values.0.key"]
    assert isinstance(past[0], str) and isinstance(past[2], str) and past[1] == 2 and past[3] == 16  # GQA: 2 kv heads
    # the first step: an empty past (length 0) in, a present of the prompt's length out
    feeds = {"input_ids": np.array([[5, 9, 11]]), "attention_mask": np.ones((1, 3), np.int64)}
    feeds["position_ids"] = np.arange(3)[None]
    feeds.update({n: np.zeros((1, 2, 0, 16), np.float32) for n in inputs[3:]})
    logits, *present = session.run(None, feeds)
    assert logits.shape == (1, 3, 128) and all(p.shape == (1, 2, 3, 16) for p in present)


def test_greedy_through_onnxruntime_equals_generate(llama_cached):
    """The package's ORT loop against transformers' own greedy generate on prompts the export never checked."""
    import transformers as tf

    src, out = llama_cached
    model = tf.AutoModelForCausalLM.from_pretrained(src).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(11)
    for length in (1, 6, 20):
        ids = torch.randint(3, 128, (1, length), generator=gen)
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        got = greedy(session, ids.numpy(), max_new_tokens=12, eos_token_id=model.generation_config.eos_token_id)
        assert got.tolist() == expected.tolist(), length
        assert got.shape[1] > length  # something was generated


def test_cached_gpt2_int8_reports_quality_and_greedy_agreement(tiny_model, tmp_path):
    """GPT-2 takes no GQA and ties its head: the same graph shape; int8 through onnxruntime with its figures."""
    import onnx

    out = tmp_path / "model.onnx"
    report = ws.export.onnx(tiny_model("gpt2"), out, task="text-generation-with-past", quantize="int8")
    assert report.summary["task"] == "text-generation-with-past"
    assert report.summary["generation"].startswith("greedy = transformers generate on 4 prompts")
    assert report.summary["parity_max_abs"] <= 1e-4
    assert set(report.details["parity (max |Δ| by batch×past+new)"]) >= {"1x0+8", "1x7+1"}
    quality = report.details["int8"]
    assert 0.98 <= quality["cosine_mean"] <= 1 and 0 <= quality["greedy_token_agreement"] <= 1
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops or "ConvInteger" in ops, ops
    _, outputs = _names()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == outputs


def test_an_architecture_without_an_exporter_is_refused_naming_the_supported(tmp_path, capsys):
    src = tmp_path / "llava"
    build("llava").save_pretrained(src)
    out = tmp_path / "x" / "model.onnx"
    capsys.readouterr()  # save_pretrained's own progress
    assert main(["export", "onnx", str(src), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "LlavaForConditionalGeneration" in err and "text-generation-with-past" in err
    assert "text2text-generation" in err  # the encoder-decoder tasks are among those named
    assert not out.parent.exists()
    with pytest.raises(ConfigError, match="task 'seq2seq'"):
        ws.export.onnx(src, out, task="seq2seq")


@pytest.mark.parametrize(
    "task, message",
    [
        (None, "MambaForCausalLM: its cache is not attention keys and values"),
        ("causal-lm", "the exported graph does not run on inputs of shape input_ids (1, 8)"),
    ],
)
def test_a_state_space_model_is_refused_in_one_line(tmp_path, task, message):
    """Mamba's cache holds convolution and SSM states, not keys and values; traced without one, its graph takes only
    the traced sequence length, which the validation's other lengths find. Either way: one line, nothing written."""
    build("mamba").save_pretrained(tmp_path / "mamba")
    options = {} if task is None else {"task": task}
    with pytest.raises(ws.WeightsmithError) as caught:
        ws.export.onnx(tmp_path / "mamba", tmp_path / "out" / "model.onnx", **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()
