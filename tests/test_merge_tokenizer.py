"""Merging models whose vocabularies differ (``tokenizer_source: union | base | <model>``, the ``tokenizer:``
section) against mergekit 0.1.5: the same output vocabulary, the same re-indexed and merged embedding and head
tensors; the merged tokenizer loads with AutoTokenizer and the model with transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from _merge_utils import config_json, load, max_diff, mergekit_available, run_mergekit, write_yaml

import weightsmith as ws
from weightsmith.cli import main

TEXT_A = ["the cat sat on the mat", "a dog ran in the park", "cats and dogs play all day"] * 20
TEXT_B = ["the model merged the weights", "tokens of a vocabulary differ", "a cat merged with a dog"] * 20


def _tokenizer(texts: list[str], vocab: int, specials: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", *specials]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _model(tokenizer, path, seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-vocab")
    tok_a = _tokenizer(TEXT_A, 60, ["<s>", "</s>"])
    tok_b = _tokenizer(TEXT_B, 72, ["<s>", "</s>", "<tool>"])
    tok_b.add_tokens(["zebra"])
    a, b = _model(tok_a, root / "a", 0), _model(tok_b, root / "b", 1)
    return {"root": root, "a": a, "b": b}


def _configs(m) -> dict[str, dict]:
    a, b = m["a"], m["b"]
    two = [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}]
    return {
        "union": {"merge_method": "linear", "base_model": a, "models": two, "tokenizer_source": "union"},
        "base": {"merge_method": "linear", "base_model": a, "models": two, "tokenizer_source": "base"},
        "model": {"merge_method": "linear", "base_model": a, "models": two, "tokenizer_source": b},
        "section": {
            "merge_method": "task_arithmetic",
            "base_model": a,
            "models": [{"model": b, "parameters": {"weight": 0.5}}],
            "tokenizer": {
                "source": "union",
                "pad_to_multiple_of": 16,
                "tokens": {
                    "<tool>": {"source": {"kind": "model_token", "model": a, "token": "cat"}},
                    "the": {"source": b, "force": True},
                    "<extra>": {"source": {"kind": "zero"}},
                },
            },
        },
    }


@pytest.fixture(scope="module")
def mk(models):
    if not mergekit_available():
        pytest.skip("mergekit is not installed")
    return {n: run_mergekit(copy.deepcopy(c), models["root"] / f"mk-{n}") for n, c in _configs(models).items()}


@pytest.mark.parametrize("name", ["union", "base", "model", "section"])
def test_vocabulary_merge_matches_mergekit(models, mk, name, tmp_path):
    from transformers import AutoTokenizer

    ws.merge.run(_configs(models)[name], tmp_path / "out")
    ours, theirs = load(tmp_path / "out"), load(mk[name])
    ours_vocab = AutoTokenizer.from_pretrained(tmp_path / "out").get_vocab()
    theirs_vocab = AutoTokenizer.from_pretrained(mk[name]).get_vocab()
    assert set(ours_vocab) == set(theirs_vocab)
    if name in ("base", "model"):  # the source tokenizer's own ids (a union's added ids may differ)
        assert ours_vocab == theirs_vocab
    # token-indexed tensors compared token by token (mergekit's union ids for added tokens are not stable)
    order_ours = torch.tensor([ours_vocab[t] for t in sorted(ours_vocab)])
    order_theirs = torch.tensor([theirs_vocab[t] for t in sorted(ours_vocab)])
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ours[n].shape == theirs[n].shape
        n_real = len(ours_vocab)
        ours[n] = torch.cat([ours[n][order_ours], ours[n][n_real:]])
        theirs[n] = torch.cat([theirs[n][order_theirs], theirs[n][n_real:]])
    diff, where = max_diff(ours, theirs)
    assert diff <= 1e-6, f"{name}: max |Δ| {diff} at {where}"
    assert config_json(tmp_path / "out")["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]


def test_union_output_loads_and_keeps_each_models_rows(models, tmp_path):
    import transformers as tf

    ws.merge.run(_configs(models)["union"], tmp_path / "out")
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "out")
    model, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.generate(torch.tensor([tok.encode("the cat")]), max_new_tokens=3, do_sample=False).shape[1] > 2
    tok_a, tok_b = tf.AutoTokenizer.from_pretrained(models["a"]), tf.AutoTokenizer.from_pretrained(models["b"])
    emb = load(tmp_path / "out")["model.embed_tokens.weight"]
    emb_b = load(models["b"])["model.embed_tokens.weight"]
    zebra = tok.get_vocab()["zebra"]  # only b has it: b's row, whatever the weights
    assert "zebra" not in tok_a.get_vocab() and torch.allclose(emb[zebra], emb_b[tok_b.get_vocab()["zebra"]], atol=1e-7)


def test_unknown_tokenizer_source_refused(models, tmp_path, capsys):
    cfg = {**_configs(models)["union"], "tokenizer_source": "nowhere/model"}
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer_source 'nowhere/model' is not a known tokenizer source (use union, base, or one of" in err
    assert len(err.splitlines()) == 1
