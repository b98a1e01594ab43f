"""int4 W4A16 (pack-quantized) and FP8 W8A8 (float-quantized) against compressed-tensors' own compressor and config
writer, and transformers' loader (compressed-tensors installed)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file

import weightsmith as ws
from weightsmith.compress.quantize import FP8, Int4
from weightsmith.compress.quantize import int4 as int4_codec
from weightsmith.errors import ConfigError

IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127, 3, 2, 0, 42]])
INT4_OPTIONS = [
    {"group_size": 32},
    {"group_size": 32, "asymmetric": True},
    {"group_size": 0},
    {"group_size": 0, "asymmetric": True},
]


def _tf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _qconfig(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def _ct_reference(model, weights, acts, ours: dict[str, torch.Tensor], tmp_path):
    """compressed-tensors' own path: apply the scheme to a transformers model, set our scales (and zero points),
    compress with ModelCompressor, and write the config with its update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(**weights),
        input_activations=QuantizationArgs(**acts) if acts else None,
    )
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.copy_(ours[f"{name}.weight_scale"])
            if getattr(module, "weight_zero_point", None) is not None and f"{name}.weight_zero_point" in ours:
                rows, cols = module.weight_zero_point.shape
                packed = ours[f"{name}.weight_zero_point"].t().contiguous()
                module.weight_zero_point.copy_(int4_codec.unpack_int4(packed, (cols, rows)).t())
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "config.json").write_text("{}")
    compressor.update_config(str(tmp_path / "ct"))
    return model.state_dict(), _qconfig(tmp_path / "ct")


def _assert_same(ours, theirs, mine_config, their_config):
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        mine, their = (t.contiguous().reshape(-1).view(torch.uint8) for t in (ours[name], theirs[name]))
        assert torch.equal(mine, their), name  # fp8: bitwise
    assert mine_config.pop("ignore") == ["lm_head", "model.embed_tokens"]
    assert their_config.pop("ignore") == ["lm_head"]
    assert mine_config == their_config


@pytest.mark.parametrize("options", INT4_OPTIONS)
def test_int4_bytes_and_config_match_compressed_tensors(tiny_model, tmp_path, options):
    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "ours", scheme="int4", ignore=["lm_head"], **options)
    ours = _tensors(tmp_path / "ours")
    scheme = Int4(**options)
    weights = {
        "num_bits": 4,
        "type": "int",
        "symmetric": not scheme.asymmetric,
        "strategy": "group" if scheme.group_size else "channel",
        "group_size": scheme.group_size,
    }
    theirs, config = _ct_reference(build_model("llama"), weights, None, ours, tmp_path)
    _assert_same(ours, theirs, _qconfig(tmp_path / "ours"), config)


def test_fp8_bytes_and_config_match_compressed_tensors(tiny_model, tmp_path):
    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "ours", scheme="fp8", ignore=["lm_head"])
    ours = _tensors(tmp_path / "ours")
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
    theirs, config = _ct_reference(build_model("llama"), weights, acts, ours, tmp_path)
    _assert_same(ours, theirs, _qconfig(tmp_path / "ours"), config)


def test_int4_packing_matches_compressed_tensors():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for rows, width in ((5, 8), (3, 7), (9, 33), (16, 64)):
        q = torch.randint(-8, 8, (rows, width), dtype=torch.int8, generator=g)
        packed = int4_codec.pack_int4(q)
        assert torch.equal(packed, pack_to_int32(q, 4))
        assert torch.equal(int4_codec.unpack_int4(packed, q.shape), q)
        assert torch.equal(unpack_from_int32(packed, 4, q.shape), q)
        assert torch.equal(int4_codec.pack_int4(q.t().contiguous()).t(), pack_to_int32(q, 4, packed_dim=0))


def test_int4_rtn_formula():
    w = torch.tensor([[0.3, -0.75, 0.1, 0.0], [0.2, 0.4, 0.6, 0.8]])
    q, s, z = int4_codec.quantize_int4(w, group_size=None)
    assert z is None and torch.allclose(s, torch.tensor([[0.1], [0.8 / 7.5]]))
    assert q[0].tolist() == [3, -8, 1, 0]  # −0.75 / 0.1 = −7.5 → −8 (round half to even), in range
    assert q[1, 3] == 7  # 0.8 / (0.8/7.5) = 7.5 → 8, clamped to 7
    q, s, z = int4_codec.quantize_int4(w, group_size=None, asymmetric=True)
    assert z is not None and z[1, 0] == -8  # min(W, 0) = 0 for an all-positive row: zero point at the bottom
    back = int4_codec.dequantize_int4(q, s, z)
    assert (back - w).abs().max() <= s.max() / 2 + 1e-7


@pytest.mark.parametrize("scheme,options", [("int4", {"group_size": 32}), ("int4", {"group_size": 0}), ("fp8", {})])
def test_loads_in_transformers_close_to_float(tiny_model, tmp_path, scheme, options):
    tf = _tf()
    src = tiny_model("qwen2")
    ws.quantize(src, tmp_path / "q", scheme=scheme, **options)
    model, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ref = tf.AutoModelForCausalLM.from_pretrained(src)(IDS).logits.detach()
    got = model(IDS).logits.detach()
    # the weights transformers reconstructs are exactly our dequantization
    ws.dequantize(tmp_path / "q", tmp_path / "deq")
    deq = _tensors(tmp_path / "deq")
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(model.state_dict()[name], deq[name])
    # FP8 e4m3 keeps 3 mantissa bits (relative step 2⁻³), on weights and per-token activations: a few % of the
    # logit range; int4 RTN on a 64-wide toy is coarser
    tol = {"fp8": 0.06, "int4": 0.2}[scheme]
    assert (got - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("scheme,options", [("int4", {"group_size": 32, "asymmetric": True}), ("fp8", {})])
def test_inspect_diff_and_dequantize_recognise_the_formats(tiny_model, tmp_path, scheme, options):
    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "q", scheme=scheme, **options)
    facts = ws.inspect(tmp_path / "q").details["quantization"]
    assert facts["bits"] == (4 if scheme == "int4" else 8)
    assert facts["format"] == ("pack-quantized" if scheme == "int4" else "float-quantized")
    if scheme == "int4":
        assert facts["group_size"] == 32 and facts["symmetric"] is False
    d = ws.diff(src, tmp_path / "q")
    assert d.summary["missing_in_b"] == 0 and d.summary["extra_in_b"] == 0
    assert 0 < max(r["rel_fro"] for r in d.tensors) < (0.15 if scheme == "int4" else 0.05)
    with pytest.raises(ws.WeightsmithError, match="already quantized"):
        ws.quantize(tmp_path / "q", tmp_path / "again", scheme="int8")


def test_int4_refuses_a_group_size_that_does_not_divide(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="not a multiple of group size 128"):
        ws.quantize(tiny_model("llama"), tmp_path / "q", scheme="int4")  # widths 64 and 96
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="do not apply"):
        ws.quantize(tiny_model("llama"), tmp_path / "q", scheme="fp8", group_size=32)
    assert FP8().to_dict() == {"scheme": "fp8"}
