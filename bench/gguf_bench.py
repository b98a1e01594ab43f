"""GGUF export: `weightsmith export gguf` against llama.cpp's own `convert_hf_to_gguf.py` (from the llama-cpp-python
sdist, with the gguf-py it vendors) on a Llama-shaped bf16 checkpoint of ~500 MB built here: wall, peak RSS and file
bytes for f16 and q8_0. Then, where llama-cpp-python has been built (bench/_work/llamacpp/site, see
``LLAMA_CPP_SITE``), the greedy tokens llama.cpp generates from weightsmith's F16, Q8_0 and Q4_0 files of a small
trained Llama (bench/_greedy_model.py, built once into bench/_work) against transformers' own greedy generation.

Run: .venv/bin/python bench/gguf_bench.py   (updates the "gguf" section of bench/RESULTS.md)
     .venv/bin/python bench/gguf_bench.py greedy   (only the greedy table; the speed table's text is kept)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from _common import ENV, PY, RESULTS, WORK, measure, table, write_section

HERE = Path(__file__).resolve().parent
SRC = WORK / "gguf_llama_500m"
LLAMACPP = WORK / "llamacpp"
# `pip install --target` of the sdist and of diskcache, which llama_cpp imports (a build of ~30 minutes on 2 cores,
# started by hand, not by this bench):
#   CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1 \
#     -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DGGML_OPENMP=OFF" \
#   .venv/bin/python -m pip install --no-deps --target bench/_work/llamacpp/site \
#     bench/_work/llamacpp/llama_cpp_python-*/ diskcache
LLAMA_CPP_SITE = LLAMACPP / "site"


def converter() -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py, from the llama-cpp-python sdist (downloaded and unpacked once)."""
    found = sorted(LLAMACPP.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[-1]
    LLAMACPP.mkdir(parents=True, exist_ok=True)
    pip = [PY, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps", "llama-cpp-python", "-d"]
    if subprocess.run([*pip, str(LLAMACPP)], check=False, timeout=600).returncode:
        return None
    for sdist in LLAMACPP.glob("llama_cpp_python-*.tar.gz"):
        with tarfile.open(sdist) as tar:
            tar.extractall(LLAMACPP, filter="data")
    found = sorted(LLAMACPP.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    return found[-1] if found else None


BUILD = """
import pathlib, torch, transformers as tf, sentencepiece as spm, sys
out = pathlib.Path(sys.argv[1])
text = out.parent / "spm_corpus.txt"
site = pathlib.Path(torch.__file__).parent
lines = []
for f in sorted(site.rglob("*.py"))[:400]:
    lines += [l.strip() for l in f.read_text(errors="ignore").splitlines() if l.strip()]
text.write_text("\\n".join(lines[:60000]))
spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(out.parent / "spm"), vocab_size=2000,
                               model_type="bpe", byte_fallback=True, character_coverage=1.0)
cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=14,
                     num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                     tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cpu"):
    model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(out)
tok = tf.LlamaTokenizer(vocab_file=str(out.parent / "spm.model"))
tok.save_pretrained(out)
"""


def build_checkpoint() -> None:
    """~500 MB bf16 Llama (14 layers, hidden 1024, GQA 16/8, vocab 32000) with a 2,000-piece SentencePiece BPE
    tokenizer (byte fallback) trained on torch's sources: both converters take its tokenizer.model/tokenizer.json."""
    if (SRC / "config.json").is_file():
        return
    SRC.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-c", BUILD, str(SRC)], check=True, env=ENV)


def size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6, 1)


def speed_table() -> tuple[str, list[str]]:
    build_checkpoint()
    notes: list[str] = []
    script = converter()
    rows = []
    for kind in ("f16", "q8_0"):
        ours = WORK / f"gguf_ws_{kind}.gguf"
        run = measure([PY, "-m", "weightsmith.cli", "export", "gguf", str(SRC), "-o", str(ours), "--type", kind,
                       "--force"])  # fmt: skip
        rows.append([kind, "weightsmith export gguf", round(run.seconds, 1), round(run.peak_rss_mb), size_mb(ours)])
        if script is None:
            continue
        theirs = WORK / f"gguf_llamacpp_{kind}.gguf"
        try:
            run = measure([PY, str(script), str(SRC), "--outfile", str(theirs), "--outtype", kind])
        except RuntimeError as exc:
            notes.append(f"convert_hf_to_gguf.py --outtype {kind} failed: {str(exc).strip().splitlines()[-1][:300]}")
            continue
        rows.append([kind, "llama.cpp convert_hf_to_gguf.py", round(run.seconds, 1), round(run.peak_rss_mb),
                     size_mb(theirs)])  # fmt: skip
    if script is None:
        notes.append("llama-cpp-python's sdist could not be fetched here: no convert_hf_to_gguf.py rows.")
    else:
        notes.append(f"Converter: {script.relative_to(WORK)} with the gguf-py it vendors.")
    header = ["type", "tool", "wall s", "peak RSS MB", "file MB"]
    return table(header, rows), notes


GREEDY = """
import json, pathlib, sys, torch, transformers as tf
from llama_cpp import Llama
src, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok = tf.AutoTokenizer.from_pretrained(src)
ids = tok(prompt, return_tensors="pt")["input_ids"]

def greedy(model):
    # n tokens whatever comes (llama.cpp below does not stop at eos either), each step's top-1 minus top-2 logit kept
    model.generation_config.eos_token_id = None
    out = model.generate(ids, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True)
    top2 = [torch.topk(step[0].float(), 2).values for step in out.logits]
    new = out.sequences[0, ids.shape[1]:].tolist()
    return {"tokens": new, "margins": [float(v[0] - v[1]) for v in top2], "text": tok.decode(new)}

out = {"transformers": greedy(tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval())}
for f in sys.argv[4:]:
    # the weights the file holds, as transformers' GGUF loader dequantises them: its greedy tokens are what llama.cpp
    # must reproduce when it reads the file right (a quantised type's rounding can move a near-tie from float32's)
    path = pathlib.Path(f)
    held = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    llm = Llama(model_path=f, n_ctx=256, n_threads=2, verbose=False, logits_all=False)
    toks = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    got = []
    for t in llm.generate(toks, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(int(t))
        if len(got) == n:
            break
    out[f] = {"prompt_ids_equal": toks == ids[0].tolist(), "tokens": got, "from_file": greedy(held)}
print(json.dumps(out))
"""

GREEDY_MODEL = WORK / "gguf_greedy_trained"
GREEDY_TYPES = ("f16", "q8_0", "q4_0")
GREEDY_HEADER = [
    "prompt",
    "GGUF type",
    "same prompt ids",
    "llama.cpp = transformers float32 (prefix)",
    "llama.cpp = transformers on the file's weights (prefix)",
    "float32's smallest top-1 − top-2 logit over the 32 steps",
]


def greedy_model() -> dict:
    """The trained Llama of the greedy check (bench/_greedy_model.py, built once, a few minutes) and its facts."""
    if not (GREEDY_MODEL / "prompts.json").is_file():
        subprocess.run([PY, str(HERE / "_greedy_model.py"), str(GREEDY_MODEL)], check=True, env=ENV)
    return json.loads((GREEDY_MODEL / "prompts.json").read_text())


def greedy_table() -> tuple[str, dict]:
    """llama.cpp's greedy tokens from weightsmith's F16 / Q8_0 / Q4_0 GGUF of a small trained Llama (byte-level BPE
    tokenizer with merges) vs transformers' own greedy generation, with the margin where they part."""
    if not (LLAMA_CPP_SITE / "llama_cpp").is_dir():
        return "llama-cpp-python is not built here (see LLAMA_CPP_SITE in bench/gguf_bench.py): no greedy check.", {}
    facts = greedy_model()
    files = []
    for kind in GREEDY_TYPES:
        f = WORK / f"greedy_{kind}.gguf"
        subprocess.run([PY, "-m", "weightsmith.cli", "export", "gguf", str(GREEDY_MODEL), "-o", str(f), "--type",
                        kind, "--force"], check=True, env=ENV, capture_output=True)  # fmt: skip
        files.append(str(f))
    env = {**ENV, "PYTHONPATH": str(LLAMA_CPP_SITE)}
    rows, texts = [], []
    for prompt in facts["prompts"]:
        proc = subprocess.run([PY, "-c", GREEDY, str(GREEDY_MODEL), prompt, "32", *files], env=env,
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode:
            return f"llama.cpp greedy check failed: {proc.stderr.strip().splitlines()[-1][:300]}", facts
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        texts.append(f"- `{prompt!r}` → `{result['transformers']['text']!r}`")
        for f, kind in zip(files, GREEDY_TYPES):
            got = result[f]["tokens"]
            same_ids = result[f]["prompt_ids_equal"]
            rows.append(
                [
                    repr(prompt),
                    kind.upper(),
                    same_ids,
                    _agree(result["transformers"], got),
                    _agree(result[f]["from_file"], got),
                    round(min(result["transformers"]["margins"]), 3),
                ]
            )
    continuations = "transformers' float32 continuations (32 tokens):\n\n" + "\n".join(texts)
    return table(GREEDY_HEADER, rows) + "\n\n" + continuations, facts


def _agree(ref: dict, got: list[int]) -> str:
    """How many leading tokens agree; where they part, transformers' top-1 minus top-2 logit at that step."""
    tokens = ref["tokens"]
    same = next((i for i, (a, b) in enumerate(zip(tokens, got)) if a != b), min(len(tokens), len(got)))
    if same < min(len(tokens), len(got)):
        return f"{same} of {len(tokens)} (margin {ref['margins'][same]:.3f})"
    return f"{same} of {len(tokens)}"


GREEDY_INTRO = "Greedy generation:"


def greedy_intro(facts: dict) -> str:
    return (
        f"{GREEDY_INTRO} a small trained Llama (4 layers, hidden 256, GQA 8/4, bench/_greedy_model.py): a "
        f"byte-level BPE tokenizer of the Llama 3 kind, {facts.get('vocab')} tokens and {facts.get('merges')} merges, "
        f"trained with `tokenizers` on docstrings of installed packages, and the model trained on that text "
        f"({facts.get('train_tokens')} tokens) with AdamW for {facts.get('steps')} steps of "
        f"{facts.get('batch')}×{facts.get('seq')} tokens, loss {facts.get('first_loss')} → {facts.get('final_loss')} "
        f"({facts.get('train_seconds')} s on 2 shared cores). Exported by weightsmith, run by llama-cpp-python (built "
        "here from its sdist): 32 new tokens from prompts cut from held-out docstrings, against transformers' "
        "`generate(do_sample=False)` in float32 from the checkpoint and on the weights the file holds (transformers' "
        "GGUF loader dequantises them). Where tokens part, the cell gives transformers' top-1 minus top-2 logit at "
        "that step; the last column, the smallest such margin of float32's own 32 steps, shows how close the nearest "
        "tie came. Below the table, float32's continuations: a model this small and this briefly trained is far "
        "from fluent, and mostly repeats one token."
    )


def main(argv: list[str]) -> None:
    """Both tables; with ``greedy``, only the greedy one, the speed table's text kept as RESULTS.md has it."""
    if argv == ["greedy"]:
        speed_text = _section_before_greedy()
    else:
        speed, notes = speed_table()
        intro = (
            "Llama-shaped bf16 checkpoint built here: 14 layers, hidden 1024, MLP 2816, 16 heads over 8 KV heads, "
            f"vocab 32000, {sum(f.stat().st_size for f in SRC.glob('*.safetensors')) / 1e6:.0f} MB, with a "
            "SentencePiece BPE tokenizer. Whole process (imports included), one run each, 2 shared CPU cores."
        )
        speed_text = "## GGUF export (`bench/gguf_bench.py`)\n\n" + intro + "\n\n" + speed + "\n\n" + "\n".join(notes)
    greedy, facts = greedy_table()
    write_section("gguf", speed_text + "\n\n" + greedy_intro(facts) + "\n\n" + greedy)


def _section_before_greedy() -> str:
    """The gguf section of RESULTS.md up to its greedy paragraph."""
    text = RESULTS.read_text()
    begin = text.index("<!-- begin gguf -->") + len("<!-- begin gguf -->")
    return text[begin : text.index(GREEDY_INTRO, begin)].strip()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main(sys.argv[1:])
