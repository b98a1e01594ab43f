"""GGUF export: `weightsmith export gguf` against llama.cpp's own `convert_hf_to_gguf.py` (from the llama-cpp-python
sdist, with the gguf-py it vendors) on a Llama-shaped bf16 checkpoint of ~500 MB built here: wall, peak RSS and file
bytes for f16 and q8_0. Then, where llama-cpp-python has been built (bench/_work/llamacpp/site, see
``LLAMA_CPP_SITE``), the greedy tokens llama.cpp generates from weightsmith's F16 and Q8_0 files of a small
model against transformers' own greedy generation.

Run: .venv/bin/python bench/gguf_bench.py   (updates the "gguf" section of bench/RESULTS.md)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from _common import ENV, PY, WORK, measure, table, write_section

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
model = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
ids = tok(prompt, return_tensors="pt")["input_ids"]
ref = model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
out = {"transformers": ref}
for f in sys.argv[4:]:
    # the weights the file holds, as transformers' GGUF loader dequantises them: its greedy tokens are what llama.cpp
    # must reproduce when it reads the file right (Q8_0's rounding can move a near-tie away from float32's)
    path = pathlib.Path(f)
    held = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    from_file = held.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()
    llm = Llama(model_path=f, n_ctx=256, n_threads=2, verbose=False, logits_all=False)
    toks = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    got = []
    for t in llm.generate(toks, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        got.append(int(t))
        if len(got) == n:
            break
    out[f] = {"prompt_ids_equal": toks == ids[0].tolist(), "tokens": got, "from_file": from_file}
print(json.dumps(out))
"""


GREEDY_MODEL = """
import sys, torch, transformers as tf
sys.path.insert(0, sys.argv[2])
from _tokenizers import byte_level_tokenizer
cfg = tf.LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                     tie_word_embeddings=False, initializer_range=0.08)
torch.manual_seed(0)
tf.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1])
byte_level_tokenizer(sys.argv[1])
"""


def greedy_table() -> str:
    """llama.cpp's greedy tokens from weightsmith's F16 / Q8_0 GGUF of a small Llama (random weights, byte-level
    BPE tokenizer with merges) vs transformers' own greedy generation."""
    if not (LLAMA_CPP_SITE / "llama_cpp").is_dir():
        return "llama-cpp-python is not built here (see LLAMA_CPP_SITE in bench/gguf_bench.py): no greedy check."
    model = WORK / "gguf_greedy_llama"
    if not (model / "config.json").is_file():
        subprocess.run([PY, "-c", GREEDY_MODEL, str(model), str(HERE.parent / "tests")], check=True, env=ENV)
    files = []
    for kind in ("f16", "q8_0"):
        f = WORK / f"greedy_{kind}.gguf"
        subprocess.run([PY, "-m", "weightsmith.cli", "export", "gguf", str(model), "-o", str(f), "--type", kind,
                        "--force"], check=True, env=ENV, capture_output=True)  # fmt: skip
        files.append(str(f))
    env = {**ENV, "PYTHONPATH": str(LLAMA_CPP_SITE)}
    rows = []
    for prompt in ("The function returns", "Parameters of the model", "A tokenizer splits text"):
        proc = subprocess.run([PY, "-c", GREEDY, str(model), prompt, "32", *files], env=env, capture_output=True,
                              text=True)  # fmt: skip
        if proc.returncode:
            return f"llama.cpp greedy check failed: {proc.stderr.strip().splitlines()[-1][:300]}"
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = result["transformers"]
        for f, kind in zip(files, ("F16", "Q8_0")):
            got = result[f]["tokens"]
            rows.append(
                [
                    repr(prompt),
                    kind,
                    result[f]["prompt_ids_equal"],
                    _prefix(ref, got),
                    _prefix(result[f]["from_file"], got),
                ]
            )
    header = [
        "prompt",
        "GGUF type",
        "same prompt ids",
        "llama.cpp = transformers float32 (prefix)",
        "llama.cpp = transformers on the file's weights (prefix)",
    ]
    return table(header, rows)


def _prefix(ref: list[int], got: list[int]) -> str:
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return f"{same} of {len(ref)}"


def main() -> None:
    speed, notes = speed_table()
    greedy = greedy_table()
    intro = (
        "Llama-shaped bf16 checkpoint built here: 14 layers, hidden 1024, MLP 2816, 16 heads over 8 KV heads, vocab "
        f"32000, {sum(f.stat().st_size for f in SRC.glob('*.safetensors')) / 1e6:.0f} MB, with a SentencePiece BPE "
        "tokenizer. Whole process (imports included), one run each, 2 shared CPU cores."
    )
    greedy_intro = (
        "Greedy generation: a Llama built here (4 layers, hidden 256, GQA 8/4, random weights) with a byte-level "
        "BPE tokenizer of 320 tokens, exported by weightsmith, run by llama-cpp-python (built here from its sdist): "
        "32 new tokens against transformers' `generate(do_sample=False)`, in float32 from the checkpoint and on "
        "the weights the file holds (transformers' GGUF loader dequantises them). Q8_0 rounds the weights, so its "
        "tokens part from float32's where two logits of the random model are close; on the file's own weights "
        "llama.cpp and transformers must agree."
    )
    write_section(
        "gguf",
        "## GGUF export (`bench/gguf_bench.py`)\n\n" + intro + "\n\n" + speed + "\n\n" + "\n".join(notes)
        + "\n\n" + greedy_intro + "\n\n" + greedy,
    )  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
