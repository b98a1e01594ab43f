"""export onnx for encoder-decoders (T5, BART, Whisper): optimum's three graphs, checked here against transformers'
own encoder and ``generate`` (the peer), independently of the export's own validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _architectures import build

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.export.to_onnx.generate import greedy_seq2seq

ort = pytest.importorskip("onnxruntime")

GRAPHS = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def _lively(model: torch.nn.Module, seed: int = 3) -> torch.nn.Module:
    """Matrices redrawn at std 2/√fan-in: a default tiny random model repeats one token, which proves little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 2 * p.shape[1] ** -0.5)
    return model


def _sessions(folder) -> list:
    return [ort.InferenceSession(str(folder / g), providers=["CPUExecutionProvider"]) for g in GRAPHS]


def _names(session, outputs: bool = False) -> list[str]:
    return [i.name for i in (session.get_outputs() if outputs else session.get_inputs())]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name → (source dir, output folder): T5 and BART through the CLI without --task, Whisper through the library."""
    cache: dict[str, tuple] = {}

    def make(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            _lively(build(name)).save_pretrained(root / "src")
            out = root / "onnx" / "model.onnx"
            assert main(["export", "onnx", str(root / "src"), "-o", str(out)]) == 0
            cache[name] = (root / "src", out.parent)
        return cache[name]

    return make


def _past(layers: int, sides=("decoder", "encoder")) -> list[str]:
    return [f"{{}}.{i}.{s}.{k}" for i in range(layers) for s in sides for k in ("key", "value")]


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_text2text_writes_optimums_three_graphs(name, exported):
    _, folder = exported(name)
    files = sorted(p.name for p in folder.iterdir())
    assert files == sorted(["config.json", "generation_config.json", *GRAPHS])  # no model.onnx for this task
    encoder, decoder, cached = _sessions(folder)
    assert _names(encoder) == ["input_ids", "attention_mask"] and _names(encoder, True) == ["last_hidden_state"]
    assert _names(decoder) == ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    assert _names(decoder, True) == ["logits", *(n.format("present") for n in _past(2))]
    assert _names(cached) == ["input_ids", "encoder_attention_mask", *(n.format("past_key_values") for n in _past(2))]
    assert _names(cached, True) == ["logits", *(n.format("present") for n in _past(2, ("decoder",)))]
    for i in cached.get_inputs()[2:]:  # batch and lengths symbolic; heads and head_dim fixed
        assert isinstance(i.shape[0], str) and isinstance(i.shape[2], str) and i.shape[1] == 4 and i.shape[3] == 16


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_text2text_greedy_equals_generate_and_encoder_matches(name, exported):
    """The ORT loop against transformers' own ``generate`` (with the model's EOS: rows end and pad) on inputs the
    export never checked, a right-padded batch included; the encoder against transformers' encoder."""
    import transformers as tf

    src, folder = exported(name)
    model = tf.AutoModelForSeq2SeqLM.from_pretrained(src).eval()
    model.generation_config.forced_eos_token_id = None  # a logits processor of generate's, not part of the graphs
    encoder, decoder, cached = _sessions(folder)
    gen = torch.Generator().manual_seed(17)
    ids = torch.randint(3, 128, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0  # right padding
    cases = [(ids[:1], mask[:1]), (ids[:1, :5], mask[:1, :5]), (ids, mask)]
    generated = set()
    for case_ids, case_mask in cases:
        with torch.no_grad():
            expected = model.generate(input_ids=case_ids, attention_mask=case_mask, max_new_tokens=12, do_sample=False)
        start = np.full((case_ids.shape[0], 1), model.config.decoder_start_token_id)
        feeds = {"input_ids": case_ids.numpy(), "attention_mask": case_mask.numpy()}
        got = greedy_seq2seq(
            encoder,
            decoder,
            cached,
            feeds,
            start,
            max_new_tokens=12,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=model.generation_config.pad_token_id,
        )
        assert got.tolist() == expected.tolist(), (case_ids.shape, got, expected)
        generated |= set(got[:, 1:].ravel().tolist())
    assert len(generated) >= 4  # the check compared real sequences, not one repeated token
    with torch.no_grad():
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    got = torch.from_numpy(encoder.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    keep = mask.bool()
    assert (got[keep] - hidden[keep]).abs().max().item() <= 1e-4


def test_bart_int8_graphs_report_quality_and_greedy_agreement(exported, tmp_path):
    import onnx

    src, _ = exported("bart")
    out = tmp_path / "int8" / "model.onnx"
    report = ws.export.onnx(src, out, quantize="int8")
    assert report.summary["task"] == "text2text-generation" and report.summary["quantize"] == "int8"
    assert report.summary["generation"].startswith("greedy = transformers generate on 4 inputs")
    quality = report.details["int8"]
    assert 0.98 <= quality["cosine_mean"] <= 1 and 0 <= quality["greedy_token_agreement"] <= 1
    assert quality["cosine_mean"] == min(quality["encoder"]["cosine_mean"], quality["decoder"]["cosine_mean"])
    assert 0.2 <= quality["size_ratio"] < 0.7
    for graph in GRAPHS:
        ops = {n.op_type for n in onnx.load(str(out.parent / graph)).graph.node}
        assert "MatMulInteger" in ops, (graph, ops)
    assert not out.exists()


def test_whisper_speech_recognition_inferred_and_greedy_from_a_fixed_prompt(exported, tmp_path):
    """Whisper: ``input_features`` in, no encoder mask; greedy from a fixed decoder prompt equals the generic
    ``GenerationMixin.generate`` (Whisper's own ``generate`` adds language and timestamp logic)."""
    import transformers as tf

    src = tmp_path / "whisper"
    _lively(build("whisper")).save_pretrained(src)
    out = tmp_path / "onnx" / "model.onnx"
    report = ws.export.onnx(src, out)
    assert report.summary["task"] == "automatic-speech-recognition"
    assert report.summary["inputs"] == ["input_features"] and report.summary["parity_max_abs"] <= 1e-4
    encoder, decoder, cached = _sessions(out.parent)
    assert _names(encoder) == ["input_features"] and _names(decoder) == ["input_ids", "encoder_hidden_states"]
    assert _names(cached) == ["input_ids", *(n.format("past_key_values") for n in _past(2))]
    model = tf.WhisperForConditionalGeneration.from_pretrained(src).eval()
    features = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(8))
    prompt = torch.tensor([[1, 5, 9], [1, 5, 9]])  # start token and two fixed tokens
    with torch.no_grad():
        expected = tf.GenerationMixin.generate(
            model, input_features=features, decoder_input_ids=prompt, max_new_tokens=10, do_sample=False
        )
    got = greedy_seq2seq(encoder, decoder, cached, {"input_features": features.numpy()}, prompt.numpy(),
                         max_new_tokens=10, eos_token_id=2, pad_token_id=0)  # fmt: skip
    assert got.tolist() == expected.tolist() and got.shape[1] > 3


REFUSALS = [
    ("t5", "automatic-speech-recognition", "exports as text2text-generation"),
    ("whisper", "text2text-generation", "exports as automatic-speech-recognition"),
]


@pytest.mark.parametrize("name, task, words", REFUSALS)
def test_a_task_the_model_cannot_serve_is_refused_in_one_line(name, task, words, tmp_path, capsys):
    src, out = tmp_path / name, tmp_path / "x" / "model.onnx"
    build(name).save_pretrained(src)
    capsys.readouterr()
    assert main(["export", "onnx", str(src), "-o", str(out), "--task", task]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and task in err and words in err, err
    assert not out.parent.exists()


def test_existing_graphs_are_refused_then_replaced_with_force_and_optimize(exported, capsys):
    """An earlier export's graphs in the folder: refused in one line without --force (nothing touched); with
    --force and --optimize the three graphs are replaced by onnxruntime-optimized ones that still pass."""
    src, folder = exported("t5")
    before = {g: (folder / g).read_bytes() for g in GRAPHS}
    capsys.readouterr()
    assert main(["export", "onnx", str(src), "-o", str(folder / "model.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "encoder_model.onnx" in err and "already exists" in err
    assert all((folder / g).read_bytes() == data for g, data in before.items())
    report = ws.export.onnx(src, folder / "model.onnx", optimize=True, force=True)
    assert report.summary["optimized"] is True and report.summary["parity_max_abs"] <= 1e-4
    assert any((folder / g).read_bytes() != data for g, data in before.items())
    assert not (folder / "model.onnx").exists()


def test_a_graph_off_pytorch_is_refused_and_nothing_written(tmp_path, capsys):
    src, out = tmp_path / "bart", tmp_path / "x" / "model.onnx"
    build("bart").save_pretrained(src)
    capsys.readouterr()
    assert main(["export", "onnx", str(src), "-o", str(out), "--atol", "1e-30"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "differs from PyTorch" in err and "graph batch×sequence:past+new" in err
    assert not out.parent.exists()
