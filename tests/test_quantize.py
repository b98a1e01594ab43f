"""quantize/dequantize against the peers: bitsandbytes' quantize_4bit and transformers' own 4-bit save and load for
NF4; compressed-tensors' own compressor, config writer and transformers' loader for int8."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SENTENCES, embed
from safetensors.torch import load_file

import weightsmith as ws
from weightsmith.compress.quantize import Int8
from weightsmith.compress.quantize import int8 as int8_codec

LOGITS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127, 3, 2, 0, 42]])


def _tf():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _bnb_config(double_quant=False):
    return _tf().BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant
    )


def _logits(model) -> torch.Tensor:
    # Grad mode on purpose: under no_grad, bitsandbytes 0.50's AVX512-BF16 CPU path repacks the weights and fails
    # on widths that are not a multiple of the block size (the tiny models' 96-wide down_proj), for transformers'
    # own 4-bit load as much as for ours.
    return model(LOGITS).logits.detach().float()


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _qconfig(path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


# -- NF4 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,double_quant,dtype", [("llama", True, "float32"), ("qwen2", False, "float32"), ("llama", False, "bfloat16")]
)
def test_nf4_bytes_match_bitsandbytes_and_transformers_save(tiny_model, tmp_path, kind, double_quant, dtype):
    import bitsandbytes.functional as F

    src = tiny_model(kind, dtype=dtype)
    ws.quantize(src, tmp_path / "ours", scheme="nf4", double_quant=double_quant)
    ours = _tensors(tmp_path / "ours")
    float_sd = _tensors(src)
    # 1. packed bytes and absmax are exactly what quantize_4bit gives on the same weights
    quantized = [n for n in float_sd if f"{n}.absmax" in ours]
    assert len(quantized) == 14  # 7 Linear per layer × 2 layers; lm_head and embeddings stay float
    for name in quantized:
        packed, state = F.quantize_4bit(
            float_sd[name], blocksize=64, compress_statistics=double_quant, quant_type="nf4"
        )
        assert torch.equal(ours[name], packed), name
        assert torch.equal(ours[f"{name}.absmax"], state.absmax), name
    # 2. every stored tensor equals transformers' save_pretrained of its own load_in_4bit model
    tf = _tf()
    model = tf.AutoModelForCausalLM.from_pretrained(src, quantization_config=_bnb_config(double_quant))
    model.save_pretrained(tmp_path / "theirs")
    theirs = _tensors(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    qc_ours, qc_theirs = _qconfig(tmp_path / "ours"), _qconfig(tmp_path / "theirs")
    assert qc_ours.pop("llm_int8_skip_modules") == ["lm_head", "model.embed_tokens"]
    assert qc_theirs.pop("llm_int8_skip_modules") is None
    assert qc_ours == qc_theirs


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama_tied"])
def test_nf4_checkpoint_loads_with_the_logits_of_transformers_own_4bit_load(tiny_model, tmp_path, kind):
    import bitsandbytes as bnb

    tf = _tf()
    src = tiny_model(kind)
    ws.quantize(src, tmp_path / "nf4", scheme="nf4")
    ours = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4")
    theirs = tf.AutoModelForCausalLM.from_pretrained(src, quantization_config=_bnb_config())
    assert isinstance(ours.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(ours.lm_head, bnb.nn.Linear4bit)
    assert (_logits(ours) - _logits(theirs)).abs().max() <= 1e-4


def test_nf4_minilm_matches_transformers_4bit_load(minilm_path, tmp_path):
    tf = _tf()
    ws.quantize(minilm_path, tmp_path / "nf4", scheme="nf4", double_quant=True)
    ours = embed(tmp_path / "nf4")
    model = tf.AutoModel.from_pretrained(minilm_path, quantization_config=_bnb_config(True)).eval()
    theirs = embed(model, tokenizer_dir=minilm_path)
    assert (ours - theirs).abs().max() <= 1e-4
    assert (tmp_path / "nf4" / "1_Pooling").is_dir()  # sentence-transformers files carried over


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_dequantize_matches_bitsandbytes_reference_dequantization(tiny_model, tmp_path, double_quant):
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "nf4", scheme="nf4", double_quant=double_quant)
    report = ws.dequantize(tmp_path / "nf4", tmp_path / "deq")
    assert report.summary["dequantized_tensors"] == 14
    assert "quantization_config" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    stored, deq, source = _tensors(tmp_path / "nf4"), _tensors(tmp_path / "deq"), _tensors(src)
    for name in source:
        if f"{name}.absmax" not in stored:
            assert torch.equal(deq[name], source[name]), name  # float tensors pass through bit-identical
            continue
        parts = {k.removeprefix(name + "."): v for k, v in stored.items() if k.startswith(name + ".")}
        state = F.QuantState.from_dict(parts, device=torch.device("cpu"))
        absmax = state.absmax
        if state.nested:
            absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        # bitsandbytes' generic 4-bit dequantization (its CPU kernel falls back to it for odd widths)
        ref = _dequantize_4bit_compute(
            stored[name].reshape(-1), absmax.float(), state.code, 64, list(source[name].shape), torch.float32
        )
        assert torch.allclose(deq[name], ref, rtol=0, atol=1e-6), name
    d = ws.diff(src, tmp_path / "deq")
    assert d.summary["compared"] == len(source) and d.summary["missing_in_b"] == 0
    assert 0 < max(r["rel_fro"] for r in d.tensors) < 0.15


# -- int8 (compressed-tensors) -----------------------------------------------------------------------------------


def _ct_reference(model, scheme, ours: dict[str, torch.Tensor], tmp_path):
    """compressed-tensors' own path on a transformers model: apply the scheme, set our scales, compress, and write
    the config with ModelCompressor.update_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    preset = preset_name_to_scheme("W8A16" if scheme.weight_only else "W8A8", ["Linear"])
    strategy = "group" if scheme.group_size else "channel"
    preset.weights = QuantizationArgs(
        num_bits=8, type="int", symmetric=True, strategy=strategy, group_size=scheme.group_size, dynamic=False
    )
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": preset}, ignore=["lm_head"]))
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.copy_(ours[f"{name}.weight_scale"])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    (tmp_path / "ct").mkdir()
    (tmp_path / "ct" / "config.json").write_text("{}")
    compressor.update_config(str(tmp_path / "ct"))
    return model.state_dict(), _qconfig(tmp_path / "ct")


@pytest.mark.parametrize("options", [{}, {"weight_only": True}, {"group_size": 32}])
def test_int8_layout_and_config_match_compressed_tensors_own_compressor(tiny_model, tmp_path, options):
    from conftest import build_model

    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "ours", scheme="int8", ignore=["lm_head"], **options)
    ours = _tensors(tmp_path / "ours")
    theirs, config = _ct_reference(build_model("llama"), Int8(**options), ours, tmp_path)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    mine = _qconfig(tmp_path / "ours")
    assert mine.pop("ignore") == ["lm_head", "model.embed_tokens"]
    assert config.pop("ignore") == ["lm_head"]
    assert mine == config


def test_int8_config_names_the_installed_compressed_tensors_and_loads_without_it(tiny_model, tmp_path, monkeypatch):
    from importlib import metadata

    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "with", scheme="int8")
    assert _qconfig(tmp_path / "with")["version"] == metadata.version("compressed-tensors")

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(int8_codec.metadata, "version", absent)
    ws.quantize(src, tmp_path / "without", scheme="int8")
    monkeypatch.undo()
    assert "version" not in _qconfig(tmp_path / "without")
    # written where compressed-tensors is absent, the checkpoint still loads where it is present, keys complete
    model, info = _tf().AutoModelForCausalLM.from_pretrained(tmp_path / "without", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    with_model = _tf().AutoModelForCausalLM.from_pretrained(tmp_path / "with")
    assert torch.equal(_logits(model), _logits(with_model))


def test_int8_packing_matches_compressed_tensors(tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for width in (4, 7, 33, 64):
        q = torch.randint(-127, 128, (5, width), dtype=torch.int8, generator=g)
        packed = int8_codec.pack_int8(q)
        assert torch.equal(packed, pack_to_int32(q, 8))
        assert torch.equal(int8_codec.unpack_int8(packed, q.shape), q)
        assert torch.equal(unpack_from_int32(packed, 8, q.shape), q)


@pytest.mark.parametrize(
    "options,dtype",
    [({}, "float32"), ({"weight_only": True}, "float32"), ({"group_size": 16}, "float32"), ({}, "bfloat16")],
)
def test_int8_loads_in_transformers_close_to_float(tiny_model, tmp_path, options, dtype):
    tf = _tf()
    src = tiny_model("qwen2", dtype=dtype)
    ws.quantize(src, tmp_path / "int8", scheme="int8", **options)
    ref = _logits(tf.AutoModelForCausalLM.from_pretrained(src))
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    got = _logits(model)
    # the weights transformers reconstructs are exactly q·s (our dequantize)
    ws.dequantize(tmp_path / "int8", tmp_path / "deq")
    deq = _tensors(tmp_path / "deq")
    loaded = model.state_dict()
    assert torch.equal(loaded["model.layers.1.mlp.down_proj.weight"], deq["model.layers.1.mlp.down_proj.weight"])
    # the scale keeps the weight's dtype, as compressed-tensors initialises it
    assert _tensors(tmp_path / "int8")["model.layers.0.mlp.up_proj.weight_scale"].dtype == getattr(torch, dtype)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_int8_minilm_embeddings_and_size(minilm_path, tmp_path):
    report = ws.quantize(minilm_path, tmp_path / "int8", scheme="int8")
    assert report.summary["linear_bytes_ratio"] <= 0.27
    stored = _tensors(tmp_path / "int8")
    assert stored["encoder.layer.0.intermediate.dense.weight"].dtype == torch.int8
    assert stored["embeddings.word_embeddings.weight"].dtype == torch.float32
    assert stored["encoder.layer.0.output.LayerNorm.weight"].dtype == torch.float32
    linear = [
        n for n in _tensors(minilm_path) if n.endswith(("dense.weight", "query.weight", "key.weight", "value.weight"))
    ]
    fp32 = sum(_tensors(minilm_path)[n].numel() * 4 for n in linear)
    int8 = sum(stored[n].numel() + stored[n.removesuffix("weight") + "weight_scale"].numel() * 4 for n in linear)
    assert int8 / fp32 <= 0.27
    cos = (embed(tmp_path / "int8", tokenizer_dir=minilm_path) * embed(minilm_path)).sum(-1)
    assert cos.mean() >= 0.99 and len(cos) == len(SENTENCES)


# -- report, selection, inspect ------------------------------------------------------------------------------------


def test_report_errors_are_the_relative_errors_of_what_was_written(tiny_model, tmp_path):
    src = tiny_model("llama")
    report = ws.quantize(src, tmp_path / "q", scheme="int8")
    deq_path = tmp_path / "deq"
    ws.dequantize(tmp_path / "q", deq_path)
    a, b = _tensors(src), _tensors(deq_path)
    for row in report.tensors:
        w, w_hat = a[row["name"]], b[row["name"]]
        assert row["rel_error"] == pytest.approx(float((w - w_hat).norm() / w.norm()), rel=1e-5)
    assert report.summary["rel_error_max"] == report.tensors[0]["rel_error"]
    assert report.summary["bytes_out"] == sum(f.stat().st_size for f in (tmp_path / "q").glob("*.safetensors")) - sum(
        _header_size(f) for f in (tmp_path / "q").glob("*.safetensors")
    )
    assert report.summary["bytes_in"] / report.summary["bytes_out"] == pytest.approx(
        report.summary["compression_ratio"], rel=1e-3
    )


def _header_size(path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_ignore_keeps_modules_float_and_the_output_still_loads(tiny_model, tmp_path):
    tf = _tf()
    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "q", scheme="nf4", ignore=["lm_head", "model.layers.1.mlp", "o_proj"])
    stored = _tensors(tmp_path / "q")
    assert stored["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32
    assert stored["model.layers.0.self_attn.o_proj.weight"].dtype == torch.float32
    assert stored["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    skip = _qconfig(tmp_path / "q")["llm_int8_skip_modules"]
    assert {"model.layers.1.mlp.up_proj", "model.layers.0.self_attn.o_proj", "lm_head"} <= set(skip)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    theirs = tf.AutoModelForCausalLM.from_pretrained(
        src,
        quantization_config=tf.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            llm_int8_skip_modules=["lm_head", "model.layers.1.mlp", "o_proj"],
        ),
    )
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert (_logits(model) - _logits(theirs)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "scheme,options,expect",
    [
        ("nf4", {"double_quant": True}, {"bits": 4, "group_size": 64, "double_quant": True, "method": "bitsandbytes"}),
        ("int8", {"group_size": 32}, {"bits": 8, "group_size": 32, "format": "int-quantized"}),
        ("int8", {"weight_only": True}, {"bits": 8, "group_size": None, "format": "pack-quantized"}),
    ],
)
def test_inspect_and_diff_recognise_quantized_checkpoints(tiny_model, tmp_path, scheme, options, expect):
    src = tiny_model("llama")
    ws.quantize(src, tmp_path / "q", scheme=scheme, **options)
    facts = ws.inspect(tmp_path / "q").details["quantization"]
    assert {k: facts[k] for k in expect} == expect
    assert facts["quantized_modules"] == 14 and "lm_head" in facts["ignored_modules"]
    assert facts["compression_ratio"] == pytest.approx(
        sum(t.numel() * t.element_size() for t in _tensors(src).values())
        / sum(t.numel() * t.element_size() for t in _tensors(tmp_path / "q").values()),
        abs=1e-3,
    )
    d = ws.diff(src, tmp_path / "q")
    assert d.summary["compared"] == len(_tensors(src)) and d.summary["shape_mismatches"] == 0
    assert d.summary["missing_in_b"] == 0 and d.summary["extra_in_b"] == 0
    assert max(r["rel_fro"] for r in d.tensors) < (0.15 if scheme == "nf4" else 0.01)
