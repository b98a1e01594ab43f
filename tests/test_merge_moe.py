"""Mixture-of-experts merges (mergekit-moe's YAML): tiny Llama experts into a Mixtral, compared with mergekit 0.1.5's
``mergekit-moe`` run in process on the same models; the output loads in transformers and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from _loading import load_checked
from _merge_utils import config_json, load, make_finetune, max_diff, mergekit_available, write_yaml
from _tokenizers import byte_level_tokenizer

import weightsmith as ws
from weightsmith.checkpoint import Checkpoint
from weightsmith.cli import main
from weightsmith.errors import ConfigError

LAYERS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama base with a byte-level tokenizer (vocab 300 in 320 rows) and three fine-tunes of it."""
    import transformers as tf

    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    base = root / "base"
    tf.LlamaForCausalLM(cfg).save_pretrained(base)
    byte_level_tokenizer(base, vocab_size=300)
    out = {"base": base}
    for i, name in enumerate(("chat", "math", "code")):
        out[name] = make_finetune(base, root / name, seed=i + 1, scale=0.05)
    return out


def _config(models, gate_mode: str = "cheap_embed", **expert_extra) -> dict:
    experts = [
        {"source_model": str(models["chat"]), "positive_prompts": ["hello there, how are you", "tell me a story"]},
        {
            "source_model": str(models["math"]),
            "positive_prompts": ["add the numbers 12 and 30"],
            "negative_prompts": ["a story"],
        },
        {"source_model": str(models["code"]), "positive_prompts": ["def main(): return 0"], **expert_extra},
    ]
    return {
        "base_model": str(models["base"]),
        "gate_mode": gate_mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": experts,
    }


def _mergekit_moe(config: dict, out: Path, seed: int = 0) -> Path:
    """mergekit 0.1.5's mergekit-moe build, in process, offline on local paths (seeded as its --random-seed)."""
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    torch.manual_seed(seed)
    options = MergeOptions(quiet=True, lazy_unpickle=False, copy_tokenizer=False, write_model_card=False)
    build(MoEMergeConfig.model_validate(yaml.safe_load(yaml.safe_dump(config))), str(out), options, device="cpu")
    return out


needs_mergekit = pytest.mark.skipif(not mergekit_available(), reason="mergekit 0.1.5 not installed")


@needs_mergekit
@pytest.mark.parametrize(
    "gate_mode, extra",
    [
        ("cheap_embed", {}),
        ("random", {}),
        ("uniform_random", {}),
        ("cheap_embed", {"residual_scale": 0.5}),
        ("hidden", {}),
        ("hidden_avg", {}),
    ],
    ids=["cheap_embed", "random", "uniform_random", "residual_scale", "hidden", "hidden_avg"],
)
def test_equals_mergekit_moe(models, gate_mode, extra, tmp_path):
    config = _config(models, gate_mode, **extra)
    ours = ws.merge.run(config, tmp_path / "ours", seed=7)
    theirs = _mergekit_moe(config, tmp_path / "theirs", seed=7)
    a, b = load(tmp_path / "ours"), load(theirs)
    worst, where = max_diff(a, b)  # the same tensor names, and every element within 1e-6
    assert worst <= 1e-6, (worst, where)
    assert a["model.layers.1.mlp.experts.gate_up_proj"].shape == (3, 96, 32)
    assert ours.summary["gate_mode"] == gate_mode
    mine, peer = config_json(tmp_path / "ours"), config_json(theirs)
    for key in ("architectures", "model_type", "num_local_experts", "num_experts_per_tok", "sliding_window"):
        assert mine[key] == peer[key], key


def test_experts_and_routers_are_what_they_should_be(models, tmp_path):
    """Without the oracle: expert j of layer i is model j's MLP of layer i (gate rows, then up rows), attention and
    norms are the base's, and a cheap_embed router row is the unit vector of the prompts' summed embeddings."""
    ws.merge.run(_config(models), tmp_path / "out")
    out = load(tmp_path / "out")
    base = ws.open(models["base"])
    code = ws.open(models["code"])
    fused = out["model.layers.1.mlp.experts.gate_up_proj"][2]
    assert torch.equal(fused[:48], code["model.layers.1.mlp.gate_proj.weight"])
    assert torch.equal(fused[48:], code["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.experts.down_proj"][2], code["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    gate = out["model.layers.0.mlp.gate.weight"]
    assert gate.shape == (3, 32)
    assert torch.allclose(gate.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.equal(gate, out["model.layers.1.mlp.gate.weight"])  # the same router in every layer
    tok = byte_level_tokenizer(None, vocab_size=300)
    ids = tok(tok.bos_token + "def main(): return 0", add_special_tokens=False)["input_ids"]
    v = base["model.embed_tokens.weight"][ids].sum(0)
    assert torch.allclose(gate[2], v / v.norm(), atol=1e-6)


def test_hidden_routers_run_one_layer_at_a_time(models, tmp_path, monkeypatch):
    """gate_mode hidden: each layer's router rows differ (they come from that layer's input states), are unit
    vectors, and the base's decoder layers are read one at a time, in order, never two at once."""
    from weightsmith import layerwise

    loaded: list[str] = []
    real = layerwise.load_layer

    def spy(layer, ckpt, prefix, *args, **kwargs):
        loaded.append(prefix)
        resident = [n for n, p in layer.named_parameters() if not p.is_meta]
        assert resident == []  # the layer arrives empty: nothing of an earlier layer is kept in it
        return real(layer, ckpt, prefix, *args, **kwargs)

    import weightsmith.merge.hidden as hidden

    monkeypatch.setattr(hidden, "load_layer", spy)
    ws.merge.run(_config(models, "hidden"), tmp_path / "out")
    out = load(tmp_path / "out")
    g0, g1 = out["model.layers.0.mlp.gate.weight"], out["model.layers.1.mlp.gate.weight"]
    assert g0.shape == (3, 32) and not torch.allclose(g0, g1, atol=1e-3)
    assert torch.allclose(g1.norm(dim=1), torch.ones(3), atol=1e-2)  # unit rows (rounded in bfloat16)
    assert loaded == ["model.layers.0."]  # layer 1's input is layer 0's output; the last layer is never run


def test_loads_as_mixtral_and_generates(models, tmp_path):
    ws.merge.run(_config(models), tmp_path / "out")
    model = load_checked("MixtralForCausalLM", tmp_path / "out")
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    ids = torch.tensor([[1, 5, 9, 13]])
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 8)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "out")) == 300  # the base's tokenizer, carried


def test_noise_scale_is_seeded_gaussian(models, tmp_path):
    """noise_scale σ adds σ·N(0, 1) to the expert's MLP (mergekit draws from torch's global stream, so only the
    distribution can be compared); the same seed gives the same output."""
    config = _config(models, "random", noise_scale=0.1)
    ws.merge.run(config, tmp_path / "a", seed=3)
    ws.merge.run(config, tmp_path / "b", seed=3)
    a, b = load(tmp_path / "a"), load(tmp_path / "b")
    assert max_diff(a, b)[0] == 0.0
    code = ws.open(models["code"])
    noise = a["model.layers.0.mlp.experts.down_proj"][2] - code["model.layers.0.mlp.down_proj.weight"]
    assert 0.08 < float(noise.std()) < 0.12 and abs(float(noise.mean())) < 0.02
    chat = ws.open(models["chat"])
    assert torch.equal(a["model.layers.0.mlp.experts.down_proj"][0], chat["model.layers.0.mlp.down_proj.weight"])


def _read_nothing(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"weight {name} read before the checks")

    monkeypatch.setattr(Checkpoint, "__getitem__", refuse)


@pytest.mark.parametrize(
    "case, message",
    [
        ("hidden", "gate_mode 'hidden_first' is not supported: use one of hidden, hidden_avg, hidden_last"),
        ("per_token", "experts_per_token 4: must be between 1 and the number of experts (3)"),
        ("same_prompts", "experts: every expert has the same prompts, so the router cannot tell them apart"),
        ("no_prompts", "experts[1]: gate_mode cheap_embed needs positive_prompts for every expert"),
        ("unknown", "unknown key 'gate' (expected one of"),
        ("shared", "shared_experts (a Qwen2-MoE or DeepSeek output) is not supported"),
    ],
)
def test_bad_config_refused_in_one_line(models, case, message, tmp_path, capsys, monkeypatch):
    config = _config(models)
    if case == "hidden":
        config["gate_mode"] = "hidden_first"
    elif case == "per_token":
        config["experts_per_token"] = 4
    elif case == "same_prompts":
        for e in config["experts"]:
            e["positive_prompts"], e["negative_prompts"] = ["x"], []
    elif case == "no_prompts":
        del config["experts"][1]["positive_prompts"]
    elif case == "unknown":
        config["gate"] = 1
    else:
        config["shared_experts"] = [{"source_model": str(models["chat"])}]
    _read_nothing(monkeypatch)
    path = write_yaml(config, tmp_path / "moe.yml")
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_mismatched_expert_fails_before_any_weight(models, tmp_path, monkeypatch):
    """An expert of another depth, or of another MLP width, is refused from its config and headers alone."""
    import transformers as tf

    deep = tmp_path / "deep"
    tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48,
        )
    ).save_pretrained(deep)  # fmt: skip
    config = _config(models)
    config["experts"][2]["source_model"] = str(deep)
    _read_nothing(monkeypatch)
    with pytest.raises(ConfigError, match=r"experts\[2\]: .* has num_hidden_layers 3, the base 2: every expert"):
        ws.merge.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_builds_moe_from_yaml(models, tmp_path):
    path = write_yaml(_config(models, "random"), tmp_path / "moe.yml")
    assert main(["merge", str(path), "-o", str(tmp_path / "out"), "--seed", "1", "--dtype", "bf16"]) == 0
    out = ws.open(tmp_path / "out")
    assert out.info("model.layers.0.mlp.experts.down_proj").dtype == torch.bfloat16
    assert config_json(tmp_path / "out")["num_local_experts"] == 3
