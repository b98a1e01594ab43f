"""Hub ids as model references, offline from a local cache the test populates, and mergekit's six example configs
(linear, ties, bio-merge, gradient-slerp, orcamini-platy-44layer, arcee_fusion) run unchanged against tiny models
published in that cache under the same names, compared with mergekit 0.1.5's output on the same models.

mergekit itself cannot resolve Hub ids offline, so it is given the snapshot paths; where a config computes in half
precision, mergekit runs with ``dtype: float32`` and ``out_dtype`` the config's dtype (it would otherwise round at
every step, weightsmith once)."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from _merge_utils import config_json, load, make_finetune, mergekit_available, run_mergekit, write_yaml

import weightsmith as ws
from weightsmith.cli import main

LLAMA = [
    "psmathur/orca_mini_v3_13b",
    "WizardLM/WizardLM-13B-V1.2",
    "garage-bAInd/Platypus2-13B",
    "WizardLM/WizardMath-13B-V1.0",
]
LLAMA_BASE = "TheBloke/Llama-2-13B-fp16"
MISTRAL = ["mistralai/Mistral-7B-Instruct-v0.2", "BioMistral/BioMistral-7B"]
MISTRAL_BASE = "mistralai/Mistral-7B-v0.1"


def hub_put(cache: Path, repo_id: str, src: Path, revision: str = "main") -> Path:
    """Publish a checkpoint directory in a Hugging Face cache as ``repo_id`` at ``revision`` (the cache's layout:
    ``models--org--name/refs/<revision>`` holding a commit hash, the files under ``snapshots/<hash>/``)."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = folder / "snapshots" / commit
    shutil.copytree(src, snapshot)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / revision).write_text(commit)
    return snapshot


def _tiny(kind: str, layers: int, dtype: torch.dtype, path: Path, seed: int) -> Path:
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    else:
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=16))
    model.to(dtype).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hub cache holding tiny models under the example configs' names: 40-layer fp16 Llamas (the configs take
    layers [0, 40] and [20, 40]), 2-layer fp16 Mistrals, and bf16 ``model_a``/``model_b``."""
    root = tmp_path_factory.mktemp("hub")
    cache, work = root / "cache", root / "work"
    paths: dict[str, str] = {}
    base = _tiny("llama", 40, torch.float16, work / "llama-base", 0)
    paths[LLAMA_BASE] = str(hub_put(cache, LLAMA_BASE, base))
    for i, name in enumerate(LLAMA):
        paths[name] = str(hub_put(cache, name, make_finetune(base, work / f"llama{i}", seed=10 + i)))
    base = _tiny("mistral", 2, torch.float16, work / "mistral-base", 1)
    paths[MISTRAL_BASE] = str(hub_put(cache, MISTRAL_BASE, base))
    for i, name in enumerate(MISTRAL):
        paths[name] = str(hub_put(cache, name, make_finetune(base, work / f"mistral{i}", seed=20 + i)))
    base = _tiny("llama", 2, torch.bfloat16, work / "a", 2)
    paths["model_a"] = str(hub_put(cache, "model_a", base))
    paths["model_b"] = str(hub_put(cache, "model_b", make_finetune(base, work / "b", seed=30, scale=0.05)))
    revised = make_finetune(base, work / "b-rev", seed=31, scale=0.05)
    paths["model_b@v2"] = str(hub_put(cache, "model_b", revised, revision="v2"))
    return {"cache": cache, "home": root / "home", "paths": paths, "root": root}


@pytest.fixture
def offline(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HOME", str(hub["home"]))
    return hub


# mergekit's examples/, as their structure reads (model names, parameters, gradients, filters, dtypes)
EXAMPLES: dict[str, dict] = {
    "linear": {
        "models": [
            {"model": LLAMA[0], "parameters": {"weight": 1.0}},
            {"model": LLAMA[1], "parameters": {"weight": 0.3}},
            {"model": LLAMA[2], "parameters": {"weight": 0.5}},
        ],
        "merge_method": "linear",
        "dtype": "float16",
    },
    "ties": {
        "models": [
            {"model": LLAMA[0], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
            {"model": LLAMA[2], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
            {
                "model": LLAMA[3],
                "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]},
            },
        ],
        "merge_method": "ties",
        "base_model": LLAMA_BASE,
        "parameters": {"normalize": True, "int8_mask": True},
        "dtype": "float16",
    },
    "bio-merge": {
        "models": [
            {"model": MISTRAL[0], "parameters": {"density": 0.5, "weight": 0.5}},
            {"model": MISTRAL[1], "parameters": {"density": 0.5, "weight": 0.5}},
        ],
        "merge_method": "ties",
        "base_model": MISTRAL_BASE,
        "parameters": {"normalize": False, "int8_mask": True},
        "dtype": "float16",
    },
    "gradient-slerp": {
        "slices": [
            {"sources": [{"model": LLAMA[0], "layer_range": [0, 40]}, {"model": LLAMA[2], "layer_range": [0, 40]}]}
        ],
        "merge_method": "slerp",
        "base_model": LLAMA[0],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float16",
    },
    "orcamini-platy-44layer": {
        "slices": [
            {"sources": [{"model": LLAMA[0], "layer_range": [0, 24]}]},
            {"sources": [{"model": LLAMA[2], "layer_range": [20, 40]}]},
        ],
        "merge_method": "passthrough",
        "dtype": "float16",
    },
    "arcee_fusion": {
        "models": [{"model": "model_a"}, {"model": "model_b"}],
        "merge_method": "arcee_fusion",
        "base_model": "model_a",
        "dtype": "bfloat16",
    },
}


def _localised(cfg: dict, paths: dict[str, str]) -> dict:
    """The config for mergekit: Hub ids replaced by their snapshot paths, computing in float32."""
    cfg = copy.deepcopy(cfg)
    for entry in cfg.get("models", []) + [s for sl in cfg.get("slices", []) for s in sl["sources"]]:
        entry["model"] = paths[entry["model"]]
    if "base_model" in cfg:
        cfg["base_model"] = paths[cfg["base_model"]]
    cfg["out_dtype"], cfg["dtype"] = cfg["dtype"], "float32"
    return cfg


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_config_runs_unchanged_and_equals_mergekit(offline, name, tmp_path):
    if not mergekit_available():
        pytest.skip("mergekit is not installed")
    path = write_yaml(EXAMPLES[name], tmp_path / f"{name}.yml")
    assert main(["merge", str(path), "-o", str(tmp_path / "ours")]) == 0
    theirs_dir = run_mergekit(_localised(EXAMPLES[name], offline["paths"]), tmp_path / "theirs")
    ours, theirs = load(tmp_path / "ours"), load(theirs_dir)
    assert set(ours) == set(theirs)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[EXAMPLES[name]["dtype"]]
    differing = total = 0
    for n in theirs:
        assert ours[n].dtype == theirs[n].dtype == dtype, n
        ne = ours[n] != theirs[n]
        differing, total = differing + int(ne.sum()), total + ne.numel()
        if ne.any():  # at most one rounding step apart (a TIES threshold tie aside, see below)
            ulp = torch.finfo(dtype).eps * theirs[n][ne].float().abs().clamp(min=torch.finfo(dtype).tiny)
            close = (ours[n][ne].float() - theirs[n][ne].float()).abs() <= ulp
            if EXAMPLES[name]["merge_method"] != "ties":
                assert bool(close.all()), f"{name}: {n} differs by more than one rounding step"
    # identical but for a few elements: one-ulp rounding differences (slerp) or entries tied in |δ| at a TIES
    # magnitude threshold, which our stated rule (lower index first) may break differently than torch's sort
    print(f"{name}: {differing} of {total} elements differ")
    assert differing <= 1e-3 * total, f"{name}: {differing} of {total} elements differ"
    if "slices" in EXAMPLES[name]:
        key_layers = sum(
            s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in EXAMPLES[name]["slices"]
        )
        assert config_json(tmp_path / "ours")["num_hidden_layers"] == key_layers


def test_revision_in_yaml_and_on_the_command_line(offline, tmp_path):
    """``model_b@v2`` in YAML and ``model_b#v2`` on the command line both read the v2 snapshot."""
    cfg = {"merge_method": "linear", "models": [{"model": "model_b@v2", "parameters": {"weight": 1.0}}]}
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "yaml")]) == 0
    assert main(["merge", "--method", "linear", "--model", "model_b#v2@1", "-o", str(tmp_path / "cli")]) == 0
    v2, main_rev = load(Path(offline["paths"]["model_b@v2"])), load(Path(offline["paths"]["model_b"]))
    for out in ("yaml", "cli"):
        got = load(tmp_path / out)
        assert all(torch.equal(got[n], v2[n]) for n in v2)
        assert not all(torch.equal(got[n], main_rev[n]) for n in v2)


@pytest.mark.parametrize(
    "model, expected",
    [
        ("nobody/missing-model", "nobody/missing-model: Hub id: not in the local cache"),
        ("model_b@v9", "model_b@v9: Hub id: not in the local cache"),
    ],
)
def test_unknown_hub_id_offline_fails_in_one_line(offline, model, expected, tmp_path, capsys):
    cfg = {"merge_method": "linear", "models": [{"model": "model_a"}, {"model": model}], "parameters": {"weight": 1}}
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_layer_range_past_a_hub_models_depth(offline, tmp_path, capsys):
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "model_a", "layer_range": [0, 3]}]}]}
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "slices[0]: layer_range [0, 3] of model_a is past its depth (2 layers)" in err, err


def test_model_card_names_method_models_revisions_and_config(offline, tmp_path):
    import yaml

    cfg = {"merge_method": "arcee_fusion", "base_model": "model_a", "models": [{"model": "model_b@v2"}]}
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == ["model_a", "model_b"] and meta["library_name"] == "transformers"
    assert "merge" in meta["tags"] and "arcee_fusion" in meta["tags"]
    commit = Path(offline["paths"]["model_b@v2"]).name
    assert f"- `model_b@v2` (revision `{commit}`)" in body
    assert "weightsmith 0." in body and "`arcee_fusion`" in body
    config = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["merge_method"] == "arcee_fusion" and config["base_model"] == "model_a"


@pytest.fixture
def no_weight_read(monkeypatch):
    """Reading any tensor's data fails the test: the checks must run from configs and headers alone."""
    from weightsmith.checkpoint.files import SafetensorsFile

    def refuse(self, name):
        raise AssertionError(f"{self.path}: tensor {name} read before the checks")

    monkeypatch.setattr(SafetensorsFile, "read", refuse)


@pytest.mark.parametrize("case", ["layer_range", "shape", "depth"])
def test_bad_hub_config_fails_before_any_weight_is_read(offline, no_weight_read, case, tmp_path, capsys):
    """A layer_range past a cached model's depth, models whose shapes disagree, or models of different depths fail
    from the index and headers, in one line naming the problem and the fix, before any tensor is read."""
    if case == "shape":  # a wider model (hidden 24) published in the cache beside model_a (hidden 16)
        import transformers as tf

        wide = tmp_path / "wide-src"
        tf.LlamaForCausalLM(
            tf.LlamaConfig(vocab_size=64, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=False)
        ).to(torch.bfloat16).save_pretrained(wide)  # fmt: skip
        hub_put(offline["cache"], "org/wide", wide)
    models = {
        "layer_range": {"slices": [{"sources": [{"model": "model_a", "layer_range": [0, 5]}]}]},
        "shape": {"models": [{"model": "model_a"}, {"model": "org/wide"}]},
        "depth": {"models": [{"model": "model_a"}, {"model": LLAMA_BASE}]},
    }[case]
    capsys.readouterr()  # what building the models printed
    method = "passthrough" if case == "layer_range" else "linear"
    cfg = {"merge_method": method, **models, **({"parameters": {"weight": 1}} if method == "linear" else {})}
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    expected = {
        "layer_range": "slices[0]: layer_range [0, 5] of model_a is past its depth (2 layers): use an end of at most 2",
        "shape": "inputs do not match: 'lm_head.weight' is [64, 24] in org/wide but [64, 16] in model_a;",
        "depth": f"inputs do not match: {LLAMA_BASE} has 342 tensor(s) model_a lacks, e.g.",
    }[case]
    assert expected in err and len(err.splitlines()) == 1, err
    if case != "layer_range":
        assert err.endswith(": merge models of one architecture and size (a slice's layer_range picks layers; "
                            "tokenizer_source merges different vocabularies)")  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.fixture
def requests(monkeypatch):
    """Every file the merge asks huggingface_hub for (``hf_hub_download``; ``snapshot_download`` with patterns),
    recorded on the way to the real functions, which serve them from the local cache."""
    import huggingface_hub

    asked: list[str] = []
    real_file, real_snapshot = huggingface_hub.hf_hub_download, huggingface_hub.snapshot_download

    def file(repo_id, filename, *args, **kwargs):
        asked.append(f"{repo_id}/{filename}")
        return real_file(repo_id, filename, *args, **kwargs)

    def snapshot(repo_id, *args, **kwargs):
        asked.append(f"{repo_id}/*")  # a whole snapshot: what the merge must no longer ask for
        return real_snapshot(repo_id, *args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    return asked


@pytest.fixture(scope="module")
def published(hub, tmp_path_factory):
    """A 4-layer Llama in 6 KB shards published as org/sharded, and a fine-tune of it as org/sharded-ft."""
    import transformers as tf

    torch.manual_seed(5)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=False)  # fmt: skip
    work = tmp_path_factory.mktemp("sharded")
    whole, src = work / "whole", work / "sharded-src"
    tf.LlamaForCausalLM(cfg).save_pretrained(whole)
    config = json.loads((whole / "config.json").read_text())
    ws.save(ws.open(whole), src, config=config, shard_size="6KB")
    ft = work / "sharded-ft-src"
    ws.save(ws.open(make_finetune(whole, work / "ft-whole", seed=40)), ft, config=config, shard_size="6KB")
    hub_put(hub["cache"], "org/sharded", src)
    hub_put(hub["cache"], "org/sharded-ft", ft)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    return {"src": src, "ft": ft, "index": index, "cache": hub["cache"]}


@pytest.fixture
def sharded(published, offline):
    return published


def _shards(asked: list[str], repo: str) -> set[str]:
    return {a.removeprefix(repo + "/") for a in asked if a.startswith(repo + "/") and a.endswith(".safetensors")}


def test_a_bad_hub_config_fails_before_any_shard_is_requested(sharded, requests, tmp_path, capsys):
    """Shapes that disagree are found from the configs, the index and the headers: no shard is requested and
    no snapshot is downloaded whole."""
    import transformers as tf

    wide = tmp_path / "wide-src"
    tf.LlamaForCausalLM(
        tf.LlamaConfig(vocab_size=64, hidden_size=24, num_hidden_layers=4, num_attention_heads=2,
                       num_key_value_heads=1, intermediate_size=32, tie_word_embeddings=False)
    ).save_pretrained(wide, max_shard_size="40KB")  # fmt: skip
    hub_put(sharded["cache"], "org/wide-sharded", wide)
    cfg = {"merge_method": "linear", "models": [{"model": "org/sharded"}, {"model": "org/wide-sharded"}],
           "parameters": {"weight": 1}}  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 2
    assert "inputs do not match" in capsys.readouterr().err
    assert "org/sharded/config.json" in requests and "org/sharded/model.safetensors.index.json" in requests
    assert [a for a in requests if a.endswith(".safetensors") or a.endswith("/*")] == []
    assert not (tmp_path / "out").exists()


def test_a_sliced_hub_merge_requests_only_the_shards_it_reads(sharded, requests, tmp_path):
    """A linear merge of layers 2–3 of two 4-layer sharded models fetches the shards holding those layers and the
    tensors outside the layers, no other; the output equals the same merge of the local directories."""
    weight_map = sharded["index"]["weight_map"]
    cfg = {
        "merge_method": "linear",
        "slices": [{"sources": [{"model": "org/sharded", "layer_range": [2, 4], "parameters": {"weight": 0.5}},
                                {"model": "org/sharded-ft", "layer_range": [2, 4], "parameters": {"weight": 0.5}}]}],
    }  # fmt: skip
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 0
    read = {n for n in weight_map if ".layers." not in n or n.split(".layers.")[1].split(".")[0] in ("2", "3")}
    needed = {weight_map[n] for n in read}
    assert len(needed) < len(set(weight_map.values()))  # the slice leaves some shards out
    assert _shards(requests, "org/sharded") == needed and _shards(requests, "org/sharded-ft") == needed
    assert not [a for a in requests if a.endswith("/*")]
    local = copy.deepcopy(cfg)
    for source, path in zip(local["slices"][0]["sources"], (sharded["src"], sharded["ft"])):
        source["model"] = str(path)
    assert main(["merge", str(write_yaml(local, tmp_path / "l.yml")), "-o", str(tmp_path / "local")]) == 0
    ours, theirs = load(tmp_path / "out"), load(tmp_path / "local")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert config_json(tmp_path / "out")["num_hidden_layers"] == 2


@pytest.fixture
def online(published, monkeypatch):
    """The online path without a network: the Hub's listing, file download and remote header reads are fakes that
    serve the published snapshots and record what is asked."""
    from types import SimpleNamespace

    import huggingface_hub

    from weightsmith.checkpoint.files import ST_CODES, SafetensorsFile

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(published["cache"]))
    snapshots = {"org/sharded": published["src"], "org/sharded-ft": published["ft"]}
    asked: list[str] = []

    def list_repo_files(repo_id, revision=None, **kwargs):
        return sorted(p.name for p in snapshots[repo_id].iterdir())

    def hf_hub_download(repo_id, filename, revision=None, cache_dir=None, local_files_only=False, **kwargs):
        assert not local_files_only
        asked.append(f"{repo_id}/{filename}")
        return str(snapshots[repo_id] / filename)

    def get_safetensors_metadata(repo_id, revision=None, **kwargs):
        asked.append(f"{repo_id}/headers")
        files = {}
        for shard in sorted(snapshots[repo_id].glob("*.safetensors")):
            entries = SafetensorsFile(shard, shard.name).entries
            tensors = {
                n: SimpleNamespace(dtype=ST_CODES[i.dtype], shape=list(i.shape)) for n, (i, _, _) in entries.items()
            }
            files[shard.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    for name, fake in (("list_repo_files", list_repo_files), ("hf_hub_download", hf_hub_download),
                       ("get_safetensors_metadata", get_safetensors_metadata)):  # fmt: skip
        monkeypatch.setattr(huggingface_hub, name, fake)
    return asked


def test_online_headers_come_from_the_hub_and_only_the_needed_shards_are_downloaded(published, online, tmp_path):
    """Online, the headers are read with get_safetensors_metadata (no shard downloaded for them), and the merge then
    downloads the shards of layers 2–3 and of the tensors outside the layers only; the result equals the local
    merge."""
    cfg = {
        "merge_method": "linear",
        "slices": [{"sources": [{"model": "org/sharded", "layer_range": [2, 4], "parameters": {"weight": 0.3}},
                                {"model": "org/sharded-ft", "layer_range": [2, 4], "parameters": {"weight": 0.7}}]}],
    }  # fmt: skip
    assert main(["merge", str(write_yaml(cfg, tmp_path / "c.yml")), "-o", str(tmp_path / "out")]) == 0
    weight_map = published["index"]["weight_map"]
    read = {n for n in weight_map if ".layers." not in n or n.split(".layers.")[1].split(".")[0] in ("2", "3")}
    needed = {weight_map[n] for n in read}
    assert _shards(online, "org/sharded") == needed and _shards(online, "org/sharded-ft") == needed
    first_shard = min(i for i, a in enumerate(online) if a.endswith(".safetensors"))
    assert {"org/sharded/headers", "org/sharded-ft/headers"} <= set(online[:first_shard])  # headers, then shards
    local = copy.deepcopy(cfg)
    for source, path in zip(local["slices"][0]["sources"], (published["src"], published["ft"])):
        source["model"] = str(path)
    assert main(["merge", str(write_yaml(local, tmp_path / "l.yml")), "-o", str(tmp_path / "local")]) == 0
    ours, theirs = load(tmp_path / "out"), load(tmp_path / "local")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
