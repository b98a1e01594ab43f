"""Lazy views chain: a fold, a prune and a quantization streamed into one writer give exactly what the three verbs
give one after another on disk, and each view describes its output before computing it."""

from __future__ import annotations

import json

import pytest
import torch
from _lora_utils import make_adapter
from conftest import build_model
from safetensors import safe_open

import weightsmith as ws
from weightsmith.checkpoint import CheckpointWriter
from weightsmith.compress.prune import PrunedView, open_pruned
from weightsmith.compress.quantize import NF4, REGISTRY, Int8, QuantizedView, int8, nf4, open_quantized
from weightsmith.errors import ConfigError, IncompatibleError
from weightsmith.merge.lora import open_folded


def _read(path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor of an output directory, and the operations its provenance records."""
    tensors, steps = {}, None
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            steps = steps or [s["operation"] for s in json.loads(f.metadata()["weightsmith"])["steps"]]
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors, steps


def _write_view(view, out) -> None:
    with CheckpointWriter(out, steps=list(view.history), config=view.config, carry=view.carry_files) as writer:
        for name in view:
            writer.write_from(view, name)


def _assert_identical(ours: dict, reference: dict) -> None:
    assert sorted(ours) == sorted(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


@pytest.fixture
def adapter(tmp_path):
    # init_lora_weights=False: B is not zero, so the fold changes the targeted weights
    return make_adapter(
        build_model("llama"),
        tmp_path / "adapter",
        r=4,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False,
    )


@pytest.mark.parametrize(
    "prune_options,scheme,options",
    [({"sparsity": 0.5}, "int8", {}), ({"sparsity": 0.4, "scope": "global"}, "nf4", {"double_quant": True})],
)
def test_fold_prune_quantize_views_match_the_verbs_on_disk(
    tiny_model, tmp_path, adapter, prune_options, scheme, options
):
    base = tiny_model("llama")
    ws.lora.merge(base, [adapter], tmp_path / "merged")
    ws.prune(tmp_path / "merged", tmp_path / "pruned", **prune_options)
    ws.quantize(tmp_path / "pruned", tmp_path / "disk", scheme, **options)

    folded = open_folded(base, [(adapter, 1.0)])
    view = open_quantized(open_pruned(folded, **prune_options), scheme, **options)
    _write_view(view, tmp_path / "streamed")

    disk, disk_steps = _read(tmp_path / "disk")
    streamed, steps = _read(tmp_path / "streamed")
    _assert_identical(streamed, disk)
    assert steps == ["lora merge", "prune", "quantize"] == disk_steps
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((tmp_path / "disk" / "config.json").read_text())["quantization_config"]
    )
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(folded[q_proj], ws.open(base)[q_proj])  # the adapter did change the weights

    # a view is also a verb's source
    ws.quantize(open_pruned(folded, **prune_options), tmp_path / "verb", scheme, **options)
    verb, verb_steps = _read(tmp_path / "verb")
    _assert_identical(verb, disk)
    assert verb_steps == ["lora merge", "prune", "quantize"]


@pytest.mark.parametrize(
    "scheme,options",
    [
        ("int8", {}),
        ("int8", {"weight_only": True}),
        ("int8", {"group_size": 16}),
        ("nf4", {}),
        ("nf4", {"group_size": 128, "double_quant": True}),
    ],
)
def test_quantized_view_describes_every_tensor_before_computing(tiny_model, monkeypatch, scheme, options):
    src = tiny_model("qwen2", dtype="bfloat16")
    view = open_quantized(src, scheme, **options)
    codec = {"int8": int8, "nf4": nf4}[scheme]
    computed = []
    real = codec.quantize_module
    monkeypatch.setattr(codec, "quantize_module", lambda *a: computed.append(1) or real(*a))
    data_dependent = [n for n in view if n.endswith(nf4.QUANT_STATE) and options.get("double_quant")]
    infos = {n: view.info(n) for n in view if n not in data_dependent}
    config = view.config["quantization_config"]
    assert not computed  # names, shapes, dtypes and config without quantizing anything
    assert config["quant_method"] == ("bitsandbytes" if scheme == "nf4" else "compressed-tensors")
    for name in view:
        tensor = view[name]
        info = view.info(name)
        assert (tuple(tensor.shape), tensor.dtype) == (info.shape, info.dtype), name
        if name in infos:
            assert infos[name] == info
    assert len(computed) == len(view.targets)  # one quantization per module, however many tensors it stores
    modules = tuple(view.targets)  # each stored tensor of <m> starts with "<m>.weight"
    assert isinstance(view, QuantizedView)
    assert all((view.location(n) is None) == n.startswith(modules) for n in view)  # the rest is copied raw
    if "weight_packed" in config.get("format", ""):
        with pytest.raises(KeyError):
            view.info(view.targets[0])  # stored as <m>.weight_packed instead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codecs_describe_what_they_store(dtype):
    gen = torch.Generator().manual_seed(0)
    schemes = [
        Int8(),
        Int8(weight_only=True),
        Int8(group_size=16),
        *(NF4(group_size=g, double_quant=d) for g in (64, 128, 4096) for d in (False, True)),
    ]
    for shape in [(64, 48), (33, 10), (7, 300), (96, 64)]:  # partial blocks, widths not a multiple of 4
        w = torch.randn(shape, generator=gen).to(dtype)
        for scheme in schemes:
            codec = REGISTRY[type(scheme)]
            if codec.check(scheme, "w", shape):
                continue
            stored = codec.quantize_module(scheme, w)
            described = codec.describe(scheme, shape, dtype)
            assert list(described) == list(stored), scheme  # same names, same order
            for suffix, (size, kind) in described.items():
                assert kind == stored[suffix].dtype and size in (None, tuple(stored[suffix].shape)), (scheme, suffix)
                assert size is not None or (scheme.double_quant and suffix == nf4.QUANT_STATE)


def test_pruned_view_global_ties_do_not_depend_on_read_order(tiny_model, tmp_path):
    src = tiny_model("llama", dtype="bfloat16")  # bf16: many weights share |w|, so ties at the threshold matter
    ws.prune(src, tmp_path / "disk", sparsity=0.5, scope="global")
    disk, _ = _read(tmp_path / "disk")
    view = open_pruned(src, sparsity=0.5, scope="global")
    backwards = {name: view[name] for name in reversed(list(view))}
    _assert_identical(backwards, disk)
    zeros = sum(int((backwards[n] == 0).sum()) for n in view.targets)
    assert zeros == round(0.5 * sum(backwards[n].numel() for n in view.targets))  # exact overall
    norm = "model.norm.weight"
    assert isinstance(view, PrunedView) and norm not in view.targets
    assert view.location(norm) == ws.open(src).location(norm) and view.location(view.targets[0]) is None
    assert open_pruned(src, sparsity=0.5, dtype="float32").location(norm) is None  # cast: not a raw copy


def test_views_refuse_at_open(tiny_model, tmp_path):
    src = tiny_model("llama")
    with pytest.raises(ConfigError, match="wanda"):
        open_pruned(src, method="wanda", sparsity=0.5)
    with pytest.raises(ConfigError, match="pattern 2:3 needs input widths divisible by 3"):
        open_pruned(src, pattern="2:3")
    with pytest.raises(ConfigError, match="group size 48"):
        open_quantized(src, "int8", group_size=48)
    ws.quantize(src, tmp_path / "int8")
    with pytest.raises(IncompatibleError, match="already quantized"):
        open_quantized(tmp_path / "int8", "nf4")
    with pytest.raises(IncompatibleError, match="already quantized"):
        open_quantized(open_quantized(src), "int8")
