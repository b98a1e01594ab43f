"""weightsmith merge vs mergekit 0.1.5 (mergekit-yaml) on the same YAML: wall time and peak RSS per method.

Inputs, built here at run time into bench/_work/merge: a Llama-shaped base of ~700 MB in bf16 (22 layers, hidden
1024, vocab 32000, untied head) and three fine-tunes (base + small Gaussian noise). One run per tool and method,
each in a fresh process (start-up included, as a user sees it). Usage: ``python bench/merge_bench.py [--small]
[METHOD…]``; ``--small`` builds 4-layer models with a 8000-token vocabulary (~120 MB), where mergekit's slowest
methods (sce, karcher, ramplus_tl) finish in a minute or three.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ENV, PY, WORK, measure, table, write_section  # noqa: E402

HERE = WORK / "merge"
BIN = Path(sys.executable).parent
CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=22,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
SMALL = dict(vocab_size=8000, num_hidden_layers=4)  # --small
METHODS = ["linear", "task_arithmetic", "slerp", "ties", "dare_ties", "della"]
NEW_METHODS = ["sce", "karcher", "multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]


def _shapes() -> dict[str, tuple[int, ...]]:
    h, i, v, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 4 * 64
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


class _Synthetic:
    """A lazy tensor dict: the base (noise = 0) or a fine-tune of it, generated one tensor at a time."""

    def __init__(self, noise_seed: int | None):
        self.shapes, self.noise_seed = _shapes(), noise_seed

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, name):
        shape = self.shapes[name]
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))  # same base tensor in every model
        base = (
            torch.ones(shape) + 0.1 * torch.randn(shape, generator=g)
            if len(shape) == 1
            else 0.02 * torch.randn(shape, generator=g)
        )
        if self.noise_seed is not None:
            gn = torch.Generator().manual_seed(self.noise_seed * 100003 + zlib.crc32(name.encode()))
            base += 0.002 * torch.randn(shape, generator=gn)
        return base.to(torch.bfloat16)


def build() -> dict[str, Path]:
    import weightsmith as ws

    paths = {"base": HERE / "base", **{f"ft{i}": HERE / f"ft{i}" for i in range(3)}}
    for key, path in paths.items():
        if (path / "config.json").is_file():
            continue
        ws.save(
            _Synthetic(None if key == "base" else int(key[2:]) + 1), path, config=CONFIG, force=True, shard_size="2GB"
        )
    return paths


def configs(p: dict[str, Path]) -> dict[str, dict]:
    fts = [str(p[f"ft{i}"]) for i in range(3)]
    base = str(p["base"])
    tv = lambda extra: [
        {"model": f, "parameters": {"weight": w, **extra}}  # noqa: E731
        for f, w in zip(fts, (0.5, 0.3, 0.2))
    ]
    return {
        "linear": {"merge_method": "linear", "models": tv({})},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": tv({})},
        "slerp": {
            "merge_method": "slerp",
            "base_model": fts[0],
            "models": [{"model": fts[0]}, {"model": fts[1]}],
            "parameters": {"t": [0, 0.5, 1]},
        },
        "ties": {"merge_method": "ties", "base_model": base, "models": tv({"density": 0.5})},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "models": tv({"density": 0.5})},
        "della": {"merge_method": "della", "base_model": base, "models": tv({"density": 0.5})},
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": f} for f in fts],
            "parameters": {"select_topk": 0.5},
        },
        "karcher": {"merge_method": "karcher", "models": [{"model": f} for f in fts]},
        "multislerp": {"merge_method": "multislerp", "base_model": base, "models": tv({})},
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": fts[0]}],
            "parameters": {"t": 0.001},
        },
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": fts[0]}]},
        "ram": {"merge_method": "ram", "base_model": base, "models": [{"model": f} for f in fts]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": [{"model": f} for f in fts]},
    }


def main(methods: list[str]) -> None:
    import yaml

    HERE.mkdir(parents=True, exist_ok=True)
    paths = build()
    size_mb = sum(f.stat().st_size for f in paths["base"].glob("*.safetensors")) / 1e6
    # a second column: the inputs' sha256 (provenance) already in weightsmith's cache, as when the same models are
    # merged again with another method or other weights
    cached = {**ENV, "WEIGHTSMITH_CACHE": str(HERE / ".digests")}
    files = [str(f) for p in paths.values() for f in sorted(Path(p).glob("*.safetensors"))]
    prime = "import sys; from pathlib import Path; from weightsmith.digests import file_sha256\n"
    prime += "for f in sys.argv[1:]: file_sha256(Path(f))"
    subprocess.run([PY, "-c", prime, *files], check=True, env=cached)
    rows = []
    for method in methods:
        cfg_path = HERE / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(configs(paths)[method]))
        runs = {}
        for tool, cmd in (
            (
                "mergekit",
                [
                    str(BIN / "mergekit-yaml"),
                    str(cfg_path),
                    str(HERE / f"out-mk-{method}"),
                    "--random-seed",
                    "0",
                    "--no-copy-tokenizer",
                    "--no-write-model-card",
                ],
            ),
            (
                "weightsmith",
                [
                    PY,
                    "-m",
                    "weightsmith.cli",
                    "merge",
                    str(cfg_path),
                    "-o",
                    str(HERE / f"out-ws-{method}"),
                    "--seed",
                    "0",
                ],
            ),
        ):
            out = HERE / f"out-{'mk' if tool == 'mergekit' else 'ws'}-{method}"
            shutil.rmtree(out, ignore_errors=True)
            runs[tool] = measure(cmd)
            shutil.rmtree(out, ignore_errors=True)
            print(f"{method:16s} {tool:12s} {runs[tool].seconds:7.1f} s {runs[tool].peak_rss_mb:7.0f} MB", flush=True)
            if tool == "weightsmith":
                runs["cached"] = measure(cmd, env=cached)
                shutil.rmtree(out, ignore_errors=True)
        mk, ws_, again = runs["mergekit"], runs["weightsmith"], runs["cached"]
        rows.append(
            [
                method,
                round(mk.seconds, 1),
                round(ws_.seconds, 1),
                f"{mk.seconds / ws_.seconds:.1f}×",
                round(again.seconds, 1),
                f"{mk.seconds / again.seconds:.1f}×",
                round(mk.peak_rss_mb),
                round(ws_.peak_rss_mb),
                f"{mk.peak_rss_mb / ws_.peak_rss_mb:.1f}×",
            ]
        )
        _write(rows, size_mb)  # after each method: a long run that is cut short still leaves its table


def _write(rows: list, size_mb: float) -> None:
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    small = HERE.name.endswith("small")
    title = "merge, new methods" if small else "merge"
    md = (
        f"## {title}: weightsmith vs mergekit 0.1.5\n\nThree bf16 fine-tunes + base, {size_mb:.0f} MB each "
        f"(Llama shape, {CONFIG['num_hidden_layers']} layers, hidden 1024, vocab {CONFIG['vocab_size']}); "
        "same YAML; one fresh process per run, start-up "
        f"included; 2 CPU cores (load average {load} at the end: the machine was shared); weightsmith with "
        f'--workers 1. Inputs in the page cache (mergekit reads them first). "digests cached": the same run with the '
        "inputs' sha256 (the output's provenance) already in weightsmith's cache, as when the same models are merged "
        "again; the first run hashes every input file beside the merge.\n\n"
        + table(
            [
                "method",
                "mergekit s",
                "weightsmith s",
                "speed-up",
                "weightsmith s, digests cached",
                "speed-up, cached",
                "mergekit MB",
                "weightsmith MB",
                "RSS ratio",
            ],
            rows,
        )  # fmt: skip
    )
    write_section("merge_bench_small" if small else "merge_bench", md)
    (HERE / "results.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--small" in args:
        args.remove("--small")
        CONFIG.update(SMALL)
        HERE = WORK / "merge-small"
    main(args or METHODS + NEW_METHODS)
