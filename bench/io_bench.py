"""Copy-through speed and memory: weightsmith convert vs `cp` vs transformers from_pretrained + save_pretrained.

Builds a ~1 GB bf16 Llama-shaped checkpoint (GQA, 8 layers, hidden 2048) at run time in bench/_work, then runs each
contender in a fresh process and measures wall time and that process's own peak RSS (median of 3 runs for the
fast ones). Targets (issue 2): copy-through ≤1.5× the `cp` time, peak RSS ≤ 2 × largest tensor + 300 MB.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PY, WORK, measure, table, write_section  # noqa: E402

SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=8,
    num_attention_heads=16,
    num_key_value_heads=4,
    vocab_size=32000,
)

BUILD = """
import sys, torch, weightsmith as ws
from weightsmith.checkpoint import CheckpointWriter, provenance_step
h, i, L, heads, kv, V = {h}, {i}, {L}, {heads}, {kv}, {V}
hd = h // heads
config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=i,
              num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv, vocab_size=V,
              max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
g = torch.Generator().manual_seed(0)
def rnd(*shape):
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
with CheckpointWriter(sys.argv[1], steps=[provenance_step("bench-build", {{}}, [])], config=config,
                      shard_size="{shard}") as w:
    w.write("model.embed_tokens.weight", rnd(V, h))
    for l in range(L):
        p = f"model.layers.{{l}}."
        for n, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv * hd, h)),
                         ("self_attn.v_proj", (kv * hd, h)), ("self_attn.o_proj", (h, h)),
                         ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)), ("mlp.down_proj", (h, i))]:
            w.write(p + n + ".weight", rnd(*shape))
        w.write(p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
        w.write(p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))
    w.write("model.norm.weight", torch.ones(h, dtype=torch.bfloat16))
    w.write("lm_head.weight", rnd(V, h))
"""

OURS = """
import json, sys, time
t0 = time.perf_counter()
import weightsmith as ws
from weightsmith.checkpoint import Checkpoint
ckpt = Checkpoint(sys.argv[1])
t1 = time.perf_counter()
ws.convert(ckpt, sys.argv[2])
t2 = time.perf_counter()
json.dump({"import": t1 - t0, "work": t2 - t1}, open(sys.argv[3], "w"))
"""

DIGEST = """
import json, sys, time
from pathlib import Path
from weightsmith.checkpoint import file_sha256
t = time.perf_counter()
file_sha256(Path(sys.argv[1]))
json.dump({"work": time.perf_counter() - t}, open(sys.argv[2], "w"))
"""

TRANSFORMERS = """
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2])
"""


def build(path: Path, shard: str = "5GB") -> None:
    if not (path / "config.json").exists():
        code = BUILD.format(
            h=SHAPE["hidden_size"],
            i=SHAPE["intermediate_size"],
            L=SHAPE["num_hidden_layers"],
            heads=SHAPE["num_attention_heads"],
            kv=SHAPE["num_key_value_heads"],
            V=SHAPE["vocab_size"],
            shard=shard,
        )
        measure([PY, "-c", code, str(path)])


def main() -> None:
    WORK.mkdir(exist_ok=True)
    src = WORK / "io_llama_1g"
    build(src)
    import weightsmith as ws

    ckpt = ws.open(src)
    largest = max(i.nbytes for i in ckpt.infos()) / 2**20
    total = ckpt.nbytes / 2**20
    out = WORK / "io_out"

    def fresh():
        shutil.rmtree(out, ignore_errors=True)

    rows, timings = [], {}
    for name, cmd in [
        ("cp -r", ["cp", "-r", str(src), str(out)]),
        ("weightsmith convert (CLI)", [str(Path(PY).parent / "weightsmith"), "convert", str(src), "-o", str(out)]),
    ]:
        runs = []
        for _ in range(3):
            fresh()
            runs.append(measure(cmd))
        timings[name] = (statistics.median(r.seconds for r in runs), max(r.peak_rss_mb for r in runs))
    work_times = []
    for _ in range(3):
        fresh()
        stats_file = WORK / "io_stats.json"
        run = measure([PY, "-c", OURS, str(src), str(out), str(stats_file)])
        work_times.append((json.loads(stats_file.read_text())["work"], run.peak_rss_mb))
    timings["weightsmith convert (in-process work)"] = (
        statistics.median(t for t, _ in work_times),
        max(r for _, r in work_times),
    )
    digest_times = []
    for _ in range(3):
        stats_file = WORK / "io_stats.json"
        measure([PY, "-c", DIGEST, str(src / "model.safetensors"), str(stats_file)])
        digest_times.append(json.loads(stats_file.read_text())["work"])
    timings["of which: sha256 of the input (provenance)"] = (statistics.median(digest_times), float("nan"))
    fresh()
    run = measure([PY, "-c", TRANSFORMERS, str(src), str(out)])
    timings["transformers from_pretrained + save_pretrained"] = (run.seconds, run.peak_rss_mb)
    fresh()

    cp_time = timings["cp -r"][0]
    for name, (seconds, rss) in timings.items():
        rss_cells = ["-", "-"] if rss != rss else [round(rss), round(rss / total, 2)]  # NaN: not a process of its own
        rows.append([name, round(seconds, 2), round(seconds / cp_time, 2), *rss_cells])
    budget = 2 * largest + 300
    md = (
        f"## Copy-through (`bench/io_bench.py`)\n\n"
        f"{total:.0f} MiB bf16 Llama-shaped checkpoint (8 layers, hidden 2048, GQA), one 1 GB file; largest tensor "
        f"{largest:.0f} MiB; RSS budget 2 × largest + 300 MB = {budget:.0f} MiB. Warm page cache, medians of 3 "
        f"(transformers: 1 run).\n\n"
        + table(["contender", "wall s", "× cp", "peak RSS MiB", "RSS ÷ model size"], rows)
        + "\n\nThe CLI row includes interpreter start-up and `import torch` (≈1–2 s here); the in-process row is "
        "the copy itself, which is what the ≤1.5× cp target is about. Unchanged tensors are copied file to file "
        "in the kernel (`copy_file_range`), as `cp` does; the in-process time is bounded by the sha256 of the "
        "input that provenance records, hashed on a second thread beside the copy.\n"
    )
    write_section("io_bench", md)


if __name__ == "__main__":
    main()
