"""Adapters trained on transformers 5 module names, folded into checkpoints saved under the legacy names.

transformers 5 renames some families' modules in memory (ViT: ``vit.layers.0.attention.q_proj``) but saves them
under the older names (``vit.encoder.layer.0.attention.attention.query``); PEFT names an adapter's targets after the
modules in memory. The fold matches them through transformers' own conversion mapping; PEFT's merge_and_unload →
save_pretrained is the oracle, compared tensor by tensor on the files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _architectures import build, model_class
from _loading import load_checked
from safetensors.torch import load_file

import weightsmith as ws
from weightsmith import architecture
from weightsmith.cli import main


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny random models saved by transformers: {family: directory}."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(name) / "base"
            build(name).save_pretrained(cache[name])
        return cache[name]

    return make


def _adapter(name: str, out: Path, **lora) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(build(name), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out)
    return out


def _peft_saved(name: str, base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """PEFT's fold as transformers saves it: from_pretrained → PeftModel → merge_and_unload → save_pretrained."""
    from peft import PeftModel

    model = load_checked(model_class(name), base)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return _tensors(out)


def test_checkpoint_names_follow_what_transformers_saves(saved):
    vit = saved("vit")
    names = architecture.checkpoint_names(_config(vit))
    assert names["vit.layers.0.attention.q_proj.weight"] == "vit.encoder.layer.0.attention.attention.query.weight"
    stored = set(_tensors(vit))
    assert names and set(names.values()) <= stored  # every mapped name is one the file holds
    assert not set(names) & stored  # ... and no in-memory name is
    assert architecture.checkpoint_names(_config(saved("llama"))) == {}
    assert architecture.checkpoint_names(None) == {}


def test_vit_cli_merge_equals_peft_and_unmerges(saved, tmp_path):
    base = saved("vit")
    adapter = _adapter("vit", tmp_path / "adapter", target_modules=["q_proj", "v_proj", "fc1", "fc2"])
    keys = load_file(adapter / "adapter_model.safetensors")
    assert any(".layers.0.attention.q_proj.lora_A" in k for k in keys)  # named after the modules in memory
    assert main(["lora", "merge", str(base), str(adapter), "-o", str(tmp_path / "out")]) == 0
    ours, theirs = _tensors(tmp_path / "out"), _peft_saved("vit", base, adapter, tmp_path / "peft")
    assert ours.keys() == theirs.keys() == _tensors(base).keys()
    original = _tensors(base)
    changed = [n for n in ours if not torch.equal(ours[n], original[n])]
    assert len(changed) == 8, changed  # 4 modules × 2 blocks
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) <= 1e-6
    load_checked(model_class("vit"), tmp_path / "out")
    ws.lora.unmerge(tmp_path / "out", adapter, tmp_path / "again")
    again = _tensors(tmp_path / "again")
    assert max(float((again[n] - original[n]).abs().max()) for n in original) <= 1e-6


def test_vit_modules_to_save_and_lora_bias(saved, tmp_path):
    base = saved("vit")
    adapter = _adapter(
        "vit", tmp_path / "adapter", target_modules=["k_proj", "o_proj"], modules_to_save=["classifier"], lora_bias=True
    )
    ws.lora.merge(base, [adapter], tmp_path / "out")
    ours, theirs = _tensors(tmp_path / "out"), _peft_saved("vit", base, adapter, tmp_path / "peft")
    assert ours.keys() == theirs.keys()
    bias = "vit.encoder.layer.1.attention.output.dense.bias"  # o_proj's bias, under its legacy name
    assert not torch.equal(ours[bias], _tensors(base)[bias])
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) <= 1e-6
    load_checked(model_class("vit"), tmp_path / "out")


def test_gpt_neox_head_saved_as_embed_out(saved, tmp_path):
    base = saved("gpt_neox")
    assert "embed_out.weight" in _tensors(base)
    adapter = _adapter("gpt_neox", tmp_path / "adapter", target_modules=["lm_head", "query_key_value"])
    assert any(k.startswith("base_model.model.lm_head.") for k in load_file(adapter / "adapter_model.safetensors"))
    ws.lora.merge(base, [adapter], tmp_path / "out")
    ours, theirs = _tensors(tmp_path / "out"), _peft_saved("gpt_neox", base, adapter, tmp_path / "peft")
    assert ours.keys() == theirs.keys()
    assert not torch.equal(ours["embed_out.weight"], _tensors(base)["embed_out.weight"])
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) <= 1e-6
    load_checked(model_class("gpt_neox"), tmp_path / "out")


def test_a_target_no_name_explains_is_still_refused(saved, tmp_path):
    from weightsmith.errors import IncompatibleError

    base = saved("vit")
    adapter = _adapter("vit", tmp_path / "adapter", target_modules=["q_proj"])
    state = load_file(adapter / "adapter_model.safetensors")
    renamed = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}  # a block the base does not have
    from safetensors.torch import save_file

    save_file(renamed, adapter / "adapter_model.safetensors")
    with pytest.raises(IncompatibleError, match=r"1 target\(s\) missing from the base .*layers\.7\."):
        ws.lora.merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_quantize_ignores_renamed_modules_by_their_names_in_memory(saved, tmp_path, scheme):
    """The same mapping in quantize: a pattern naming ViT's modules as transformers has them in memory keeps their
    legacy-named weights float, and the ignore list names them as the loader sees them."""
    base = saved("vit")
    ws.quantize(base, tmp_path / "q", scheme=scheme, ignore=["classifier", "q_proj"])
    ignored = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    ignored = ignored.get("ignore") or ignored.get("llm_int8_skip_modules")
    assert {"vit.layers.0.attention.q_proj", "vit.layers.1.attention.q_proj"} <= set(ignored)
    stored = _tensors(tmp_path / "q")
    query = "vit.encoder.layer.0.attention.attention.query.weight"
    assert torch.equal(stored[query], _tensors(base)[query])  # kept float, unchanged
    key = "vit.encoder.layer.0.attention.attention.key.weight"
    assert key not in stored or stored[key].dtype != torch.float32  # the others are quantized
    model = load_checked(model_class("vit"), tmp_path / "q")
    assert model.vit.layers[0].attention.q_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("save_projection", [True, False])
def test_vit_vera_sizes_its_layers_from_the_legacy_names(saved, tmp_path, save_projection):
    """VeRA reads each layer's input size from the base weight, named in memory by the adapter and stored under the
    legacy name by the checkpoint: the size is found through the same mapping, and the fold equals PEFT's."""
    from peft import VeraConfig, get_peft_model

    base = saved("vit")
    torch.manual_seed(1)
    config = VeraConfig(r=8, target_modules=["q_proj", "v_proj", "fc1"], save_projection=save_projection)
    peft_model = get_peft_model(build("vit"), config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:  # lambda_b starts at 0 (no change): give every trained vector values
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(".layers.0.attention.q_proj.vera_lambda_b" in k for k in keys)  # named after the modules in memory
    report = ws.lora.merge(base, [tmp_path / "adapter"], tmp_path / "out")
    assert report.summary["types"] == ["VERA"]
    ours, theirs = _tensors(tmp_path / "out"), _peft_saved("vit", base, tmp_path / "adapter", tmp_path / "peft")
    assert ours.keys() == theirs.keys() == _tensors(base).keys()
    original = _tensors(base)
    changed = [n for n in ours if not torch.equal(ours[n], original[n])]
    assert len(changed) == 6, changed  # 3 modules × 2 blocks
    assert max(float((ours[n] - theirs[n]).abs().max()) for n in ours) <= 1e-6
    load_checked(model_class("vit"), tmp_path / "out")
