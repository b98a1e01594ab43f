"""eval: perplexity, KL and logits |Δ| for causal LMs, embedding cosine for encoders, on checkpoints and ONNX files,
checked against computations done here with transformers directly."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from _distill_utils import with_tokenizer
from conftest import SENTENCES, embed

import weightsmith as ws
from weightsmith.cli import main

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "merging models one tensor at a time",
    "a b",
    "streaming keeps memory flat however large the model is",
]


@pytest.fixture(scope="module")
def causal_pair(tiny_model, tmp_path_factory):
    """A tiny Llama with a character tokenizer, and the same model pruned to 50% (so the two differ)."""
    root = tmp_path_factory.mktemp("eval")
    model = with_tokenizer(tiny_model("llama"), root / "llama", causal=True)
    ws.prune(model, root / "pruned", sparsity=0.5)
    data = root / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    return model, root / "pruned", data


def _reference_numbers(model_dir, ref_dir, texts):
    """Perplexity from transformers' own labels= loss, and KL(p_ref ‖ p_model) per position, computed directly."""
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = tf.AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    nll = count = kl = positions = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            nll += float(out.loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
            kl += float(
                torch.nn.functional.kl_div(
                    out.logits.log_softmax(-1),
                    ref(input_ids=ids).logits.log_softmax(-1),
                    log_target=True,
                    reduction="sum",
                )
            )
            positions += ids.shape[1]
    return math.exp(nll / count), kl / positions


def test_causal_perplexity_and_kl_match_transformers(causal_pair):
    model, pruned, data = causal_pair
    report = ws.evaluate(pruned, data, ref=model)
    ppl, kl = _reference_numbers(pruned, model, TEXTS)
    ref_ppl, _ = _reference_numbers(model, model, TEXTS)
    assert report.summary["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert report.summary["ref_perplexity"] == pytest.approx(ref_ppl, rel=1e-5)
    assert report.summary["kl_per_token"] == pytest.approx(kl, rel=1e-4) and kl > 0
    assert report.summary["max_abs"] > 0


def test_a_model_against_itself(causal_pair):
    model, _, data = causal_pair
    s = ws.evaluate(model, data, ref=model).summary
    assert s["max_abs"] == 0 and s["kl_per_token"] == pytest.approx(0, abs=1e-7)
    assert s["perplexity"] == s["ref_perplexity"]


def test_causal_onnx_equals_the_checkpoint(causal_pair, tmp_path):
    model, _, data = causal_pair
    ws.export.onnx(model, tmp_path / "onnx" / "model.onnx", task="causal-lm")
    onnx = ws.evaluate(tmp_path / "onnx" / "model.onnx", data, ref=model).summary
    assert onnx["runtime"] == "onnxruntime"
    assert onnx["max_abs"] < 1e-4
    assert onnx["perplexity"] == pytest.approx(onnx["ref_perplexity"], rel=1e-5)


def test_encoder_cosine_matches_sentence_embeddings(minilm_path, tmp_path, capsys):
    ws.quantize(minilm_path, tmp_path / "int8", scheme="int8")
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "int8"), "--ref", str(minilm_path), "--data", str(data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    expected = float((embed(tmp_path / "int8", tokenizer_dir=minilm_path) * embed(minilm_path)).sum(-1).mean())
    assert summary["kind"] == "encoder" and summary["texts"] == len(SENTENCES)
    assert summary["embedding_cosine"] == pytest.approx(expected, abs=1e-4)
    assert 0.99 < summary["embedding_cosine"] < 1


@pytest.mark.parametrize(
    "case, message",
    [
        ("encoder_without_ref", "pass --ref"),
        ("missing_data", "evaluation data not found"),
        ("empty_data", "evaluation data is empty"),
        ("kinds_differ", "cannot compare a causal LM with an encoder"),
        ("missing_model", "no such file or directory"),
    ],
)
def test_bad_eval_input(causal_pair, minilm_path, tmp_path, capsys, case, message):
    model, _, data = causal_pair
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = {
        "encoder_without_ref": [minilm_path, "--data", data],
        "missing_data": [model, "--data", tmp_path / "nope.txt"],
        "empty_data": [model, "--data", empty],
        "kinds_differ": [model, "--ref", minilm_path, "--data", data],
        "missing_model": [tmp_path / "nope", "--data", data],
    }[case]
    capsys.readouterr()
    code = main(["eval", *map(str, argv)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
