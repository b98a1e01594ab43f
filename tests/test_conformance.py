"""The conformance matrix: every verb on 20 transformers architectures (tiny random models, ``_architectures``).

Per architecture and verb, a cell either passes its checks against the peer (transformers' loader with no missing,
mismatched or unexpected key; PEFT; mergekit 0.1.5; bitsandbytes; transformers' own model classes for orientation)
or the verb refuses with one clear line that ``REFUSED`` expects. A refusal nobody expects fails, and so does an
expected refusal that no longer happens. With ``WEIGHTSMITH_SUPPORT_JSON`` set, the results are written there and
``tools/support_table.py`` renders the support table (``make support``).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from _architectures import ARCHS, build, inputs, linear_modules, model_class, output
from _loading import load_checked
from _merge_utils import make_finetune, mergekit_available, run_mergekit
from safetensors.torch import load_file, save_file

import weightsmith as ws
from weightsmith import architecture
from weightsmith.errors import WeightsmithError

NAMES = list(ARCHS)
_STRUCTURED = f"structured pruning supports {', '.join(architecture.PRUNE_FAMILIES)} models"
_NOT_TEXT = "is not supported for model_type"
# (architecture, verb) → the words of the one-line refusal. Everything else must pass.
REFUSED: dict[tuple[str, str], str] = {
    **{(a, "prune structured"): _STRUCTURED for a in NAMES if a not in architecture.PRUNE_FAMILIES},
    ("gpt2", "quantize int8"): "no 2-D Linear weights to quantize",
    ("gpt2", "quantize nf4"): "no 2-D Linear weights to quantize",
    ("mixtral", "quantize int8"): "stores its experts one by one",
    ("mixtral", "export onnx"): "torch.onnx.export failed",
    ("llava", "export onnx"): "only text models are exported",
    ("mamba", "export onnx"): "the exported graph does not run on inputs of shape",
}
# Architectures mergekit 0.1.5 merges as transformers 5 writes them. Its definitions for the others expect tensors
# these checkpoints lack: GPT-NeoX's attention.bias buffers, BERT's pooler (a BertForMaskedLM has none), T5 v1.1's
# wi_0, Whisper's "model.decoderembed_tokens" (a missing dot); it has none for opt, bart, vit, clip, llava.
MERGEKIT = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "roberta", "distilbert", "mamba"}

# The reason the support table gives for each refusal.
WHY = {
    _STRUCTURED: "structured-pruning units are defined for the " + ", ".join(architecture.PRUNE_FAMILIES) + " families",
    "stores its experts one by one": "transformers fuses per-expert weights on load, which its compressed-tensors "
    "loader cannot do beside quantized modules (nf4 works)",
    "no 2-D Linear weights to quantize": "Conv1D projections are not nn.Linear; neither format quantizes them",
    "torch.onnx.export failed": "torch.onnx.export cannot export the model (MoE routing)",
    "only text models are exported": "not a text model: the export takes input_ids and attention_mask only",
    "the exported graph does not run on inputs of shape": "the traced graph fixes the sequence length, so the "
    "validation refuses it (Mamba; with a cache: no attention keys and values to export)",
}
# (architecture, verb) → why the cell fails today: the verb neither works nor refuses in one line. The cell must
# keep failing (a fix makes it fail here, to be moved out), and the table shows it as failing.
KNOWN: dict[tuple[str, str], str] = {}

RESULTS: dict[str, dict[str, str]] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_results():
    yield
    path = os.environ.get("WEIGHTSMITH_SUPPORT_JSON")
    if path:
        previous = json.loads(open(path).read()) if os.path.exists(path) else {}
        for arch, cells in RESULTS.items():
            previous.setdefault(arch, {}).update(cells)
        with open(path, "w") as f:
            json.dump({a: previous[a] for a in NAMES if a in previous}, f, indent=1, ensure_ascii=False)


@pytest.fixture(scope="session")
def arch(tmp_path_factory):
    """Factory: name → (saved model directory, the model in memory)."""
    cache: dict[str, tuple] = {}

    def make(name: str):
        if name not in cache:
            model = build(name)
            out = tmp_path_factory.mktemp(name)
            model.save_pretrained(out)
            cache[name] = (out, model)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def finetunes(arch, tmp_path_factory):
    cache: dict[str, list] = {}

    def make(name: str):
        if name not in cache:
            src, _ = arch(name)
            root = tmp_path_factory.mktemp(f"{name}-ft")
            cache[name] = [str(make_finetune(src, root / f"ft{i}", seed=i + 1)) for i in range(2)]
        return cache[name]

    return make


def cell(name: str, verb: str, check) -> None:
    """Run one cell: ``check()`` passes, or the verb refuses with the one line ``REFUSED`` expects."""
    expected, known = REFUSED.get((name, verb)), KNOWN.get((name, verb))
    if known is not None:
        with pytest.raises(Exception):  # noqa: B017 - any failure: the cell is known not to work
            check()
        RESULTS.setdefault(name, {})[verb] = f"fails: {known}"
        return
    try:
        check()
    except WeightsmithError as exc:
        message = str(exc)
        assert "\n" not in message, f"a refusal is one line: {message!r}"
        if expected is None or expected not in message:
            raise
        RESULTS.setdefault(name, {})[verb] = f"refused: {WHY.get(expected, expected)}"
        return
    assert expected is None, f"{name} {verb}: expected a refusal ({expected!r}), but it passed"
    RESULTS.setdefault(name, {})[verb] = "✓"


def _tensors(path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    err = float((a - b).norm() / b.norm().clamp_min(1e-12))
    assert err <= rel, f"relative difference {err:.3g} > {rel}"


# -- convert -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_round_trip(arch, tmp_path, name):
    src, model = arch(name)

    def check():
        ws.convert(src, tmp_path / "out")
        a, b = _tensors(src), _tensors(tmp_path / "out")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
        loaded = load_checked(model_class(name), tmp_path / "out")
        with torch.no_grad():
            assert torch.equal(output(loaded, inputs(name)), output(model, inputs(name)))

    cell(name, "convert", check)


# -- lora merge ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_lora_merge_equals_peft(arch, tmp_path, name):
    from peft import LoraConfig, PeftModel, get_peft_model

    src, model = arch(name)
    targets = linear_modules(model)
    assert targets, name

    if name == "mamba":  # PEFT refuses Mamba's out_proj (and conv1d)
        targets = [t for t in targets if t != "out_proj"]

    def check():
        torch.manual_seed(1)
        fan_in_fan_out = any(architecture.is_conv1d(model.config.to_dict(), t) for t in targets)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                          fan_in_fan_out=fan_in_fan_out)  # fmt: skip
        peft_model = get_peft_model(build(name), lora)
        with torch.no_grad():
            for _n, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        peft_model.save_pretrained(tmp_path / "adapter")
        ws.lora.merge(src, [tmp_path / "adapter"], tmp_path / "out")
        # compared as transformers loads both (the file may keep older names, e.g. Mixtral's per-expert weights)
        ours = load_checked(model_class(name), tmp_path / "out").state_dict()
        base = load_checked(model_class(name), src)
        theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
        assert ours.keys() == theirs.keys()
        assert any(not torch.equal(ours[n], model.state_dict()[n]) for n in ours), "the adapter changed nothing"
        worst = max(float((ours[n].float() - theirs[n].float()).abs().max()) for n in ours)
        assert worst <= 1e-6, worst

    cell(name, "lora merge", check)


# -- merge -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "ties"])
@pytest.mark.parametrize("name", NAMES)
def test_merge_loads_and_equals_mergekit(arch, finetunes, tmp_path, name, method):
    src, _ = arch(name)
    a, b = finetunes(name)
    if method == "linear":
        config = {
            "merge_method": "linear",
            "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.4}}],
            "dtype": "float32",
        }
    else:
        config = {
            "merge_method": "ties",
            "base_model": str(src),
            "models": [
                {"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.5, "density": 0.7}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        }

    def check():
        ws.merge.run(json.loads(json.dumps(config)), tmp_path / "out")
        load_checked(model_class(name), tmp_path / "out")
        if name in MERGEKIT and mergekit_available():
            run_mergekit(config, tmp_path / "mk")
            ours, theirs = _tensors(tmp_path / "out"), _tensors(tmp_path / "mk")
            common = ours.keys() & theirs.keys()
            assert common and ours.keys() >= theirs.keys(), sorted(theirs.keys() - ours.keys())
            worst = max(float((ours[n].double() - theirs[n].double()).abs().max()) for n in common)
            assert worst <= 1e-6, worst

    cell(name, f"merge {method}", check)


# -- quantize --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
@pytest.mark.parametrize("name", NAMES)
def test_quantize_loads_without_key_problems(arch, tmp_path, name, scheme):
    import transformers

    src, model = arch(name)
    batch = inputs(name)

    def check():
        ws.quantize(src, tmp_path / "out", scheme)
        qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        kept = qc.get("ignore") or qc.get("llm_int8_skip_modules") or []
        # every tied head and every float32-kept module is left float, and named as such
        facts = architecture.model_facts(json.loads((src / "config.json").read_text()))
        for tied in facts.tied:
            assert tied.removesuffix(".weight") in kept or tied.removesuffix(".weight") not in facts.linear, tied
        stored = _tensors(tmp_path / "out")
        for pattern in facts.keep_fp32:
            hits = [n for n in stored if n.removesuffix(".weight").endswith(pattern) and n.endswith(".weight")]
            assert all(stored[n].dtype == torch.float32 for n in hits), pattern
        loaded = load_checked(model_class(name), tmp_path / "out")
        if scheme == "nf4":  # transformers' own 4-bit quantization of the float model is the reference
            bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
            ref = load_checked(model_class(name), src, quantization_config=bnb)
            # grad mode: bitsandbytes' CPU inference path repacks weights under no_grad. Tolerance: transformers
            # quantizes the heads weightsmith keeps float by default (RoBERTa's lm_head.dense); most cells are ≤ 1e-4
            try:
                expected = output(ref, batch)
            except RuntimeError as exc:  # transformers' own 4-bit model does not run here (Mamba's dt_proj on CPU)
                with pytest.raises(RuntimeError, match=re.escape(str(exc)[:40])):
                    output(loaded, batch)
                return
            _close(output(loaded, batch), expected, 0.1)
        else:
            with torch.no_grad():
                _close(output(loaded, batch), output(model, batch), 0.05)

    cell(name, f"quantize {scheme}", check)


# -- prune -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["magnitude", "2:4"])
@pytest.mark.parametrize("name", NAMES)
def test_prune_exact_sparsity_along_inputs(arch, tmp_path, name, mode):
    from transformers.pytorch_utils import Conv1D

    src, model = arch(name)
    # orientation from transformers' own modules: Conv1D stores [in, out]
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}

    def check():
        options = {"sparsity": 0.5} if mode == "magnitude" else {"pattern": mode}
        ws.prune(src, tmp_path / "out", **options)
        before, after = _tensors(src), _tensors(tmp_path / "out")
        pruned = [n for n in after if not torch.equal(after[n], before[n])]
        assert pruned
        for n in pruned:
            w = after[n]
            assert w.dim() == 2, n
            if mode == "magnitude":
                assert int((w == 0).sum()) == round(0.5 * w.numel()), n
            else:
                rows = w.t() if n in conv1d else w  # [out, in]
                assert bool(((rows.reshape(-1, 4) != 0).sum(-1) <= 2).all()), f"{n}: a group of 4 inputs keeps > 2"
                assert int((w == 0).sum()) == w.numel() // 2, n
        load_checked(model_class(name), tmp_path / "out")

    cell(name, f"prune {mode}", check)


@pytest.mark.parametrize("name", NAMES)
def test_structured_prune_shrinks_or_refuses(arch, tmp_path, name):
    from weightsmith.compress.prune.structured import parse_ranges

    src, model = arch(name)

    def check():
        report = ws.prune(src, tmp_path / "out", structured="ffn", ratio=0.25)
        small = load_checked(model_class(name), tmp_path / "out")
        # the reference: the original file with every removed neuron's output column zeroed, loaded the same way
        stored = _tensors(src)
        for stack in architecture.PRUNE_FAMILIES[model.config.model_type].stacks:
            down = stack.units.ffn_cols[0]
            prefix = next(p for p in architecture.block_prefixes(stored, down) if stack.scope in p)
            for key, ranges in report.details["kept"].items():
                label, _, i = key.rpartition(" layer ")
                if label != stack.label:  # "layer 3" (one stack) or "encoder layer 3"
                    continue
                weight = stored[f"{prefix}{int(i.removeprefix('layer '))}.{down}.weight"]
                keep = set(parse_ranges(ranges))
                weight[:, [u for u in range(weight.shape[1]) if u not in keep]] = 0
        masked = tmp_path / "masked"
        shutil.copytree(src, masked)
        for f in masked.glob("*.safetensors"):
            f.unlink()
        save_file(stored, masked / "model.safetensors", metadata={"format": "pt"})
        ref = load_checked(model_class(name), masked)
        with torch.no_grad():
            batch = inputs(name)
            assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in ref.parameters())
            assert float((output(small, batch) - output(ref, batch)).abs().max()) <= 1e-5

    cell(name, "prune structured", check)


# -- export ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_export_onnx_natural_task(arch, tmp_path, name):
    src, _ = arch(name)
    task = ARCHS[name].onnx_task

    def check():
        # no natural task among the export's text tasks: feature extraction is the one it must take or refuse
        report = ws.export.onnx(src, tmp_path / "model.onnx", task=task or "feature-extraction")
        graphs = [f for f in report.details["files"] if f.endswith(".onnx")]  # encoder-decoders: optimum's three
        assert graphs and all(os.path.isfile(f) for f in graphs) and report.summary["parity_max_abs"] <= 1e-4

    cell(name, "export onnx", check)


# -- the architecture facts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_name_facts_agree_with_transformers(arch, name):
    """Orientation and Linear-ness judged from names (what the streaming verbs use) match the model's own modules."""
    from transformers.pytorch_utils import Conv1D

    src, model = arch(name)
    config = json.loads((src / "config.json").read_text())
    kinds = {n: type(m) for n, m in model.named_modules()}
    for pname, p in model.named_parameters():
        module = pname.rsplit(".", 1)[0]
        if not pname.endswith(".weight") or p.dim() != 2:
            continue
        assert architecture.is_conv1d(config, pname) == (kinds[module] is Conv1D), pname
        if kinds[module] is torch.nn.Embedding:
            assert architecture.is_embedding(module), pname
