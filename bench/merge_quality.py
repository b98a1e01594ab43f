"""Does merging work on a real model? Per-domain perplexity of merges of two domain fine-tunes.

A small byte-level Llama (~0.9M parameters) is trained here on English gathered offline (docstrings of installed
Python packages), then fine-tuned twice: on torch's docstrings (domain A) and on the standard library's (domain B).
Each method merges the two fine-tunes (with the base where the method uses one); the table gives byte-level
perplexity on held-out text of each domain. Training takes about ten minutes on two cores; the trained models
stay in bench/_work/merge_quality and later runs only merge and score.
"""

from __future__ import annotations

import ast
import json
import math
import random
import sys
import sysconfig
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, table, write_section  # noqa: E402

HERE = WORK / "merge_quality"
SEQ, BATCH = 128, 16
STEPS_BASE, STEPS_FT = 700, 300


def docstrings(root: Path, limit: int) -> str:
    """Docstrings (at least 200 characters, ASCII) of the .py files under ``root``, up to ``limit`` characters."""
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200 and doc.isascii():
                    out.append(doc)
                    total += len(doc)
        if total >= limit:
            break
    return "\n\n".join(out)[:limit]


def corpora() -> dict[str, str]:
    site = Path(torch.__file__).parent.parent
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    general = "\n\n".join(
        docstrings(site / pkg, 300_000) for pkg in ("transformers", "numpy", "scipy", "pandas") if (site / pkg).is_dir()
    )
    return {"general": general, "A": docstrings(Path(torch.__file__).parent, 600_000), "B": docstrings(stdlib, 600_000)}


def split(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def batches(data: torch.Tensor, rng: random.Random):
    while True:
        idx = [rng.randrange(0, len(data) - SEQ - 1) for _ in range(BATCH)]
        yield torch.stack([data[i : i + SEQ + 1] for i in idx])


def train(model, data: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for step, batch in zip(range(steps), batches(data, rng)):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        logits = model(input_ids=batch[:, :-1]).logits  # (batch, seq, 256)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def perplexity(model, data: torch.Tensor) -> float:
    losses = []
    for start in range(0, min(len(data) - SEQ - 1, 64 * SEQ), SEQ):
        chunk = data[start : start + SEQ + 1].unsqueeze(0)
        logits = model(input_ids=chunk[:, :-1]).logits
        losses.append(float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:])))
    return math.exp(sum(losses) / len(losses))


def main() -> None:
    import transformers as tf

    import weightsmith as ws

    torch.manual_seed(0)
    HERE.mkdir(parents=True, exist_ok=True)
    texts = corpora()
    data = {k: split(v) for k, v in texts.items()}
    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    trained = all((HERE / n / "config.json").is_file() for n in ("base", "ftA", "ftB"))
    if not trained:  # the trained models are the fixture (deterministic, seeded): built once, reused after
        model = tf.LlamaForCausalLM(cfg)
        mixed = torch.cat([data["general"][0], data["A"][0][:50_000], data["B"][0][:50_000]])
        train(model, mixed, STEPS_BASE, 3e-3, seed=1)
        model.save_pretrained(HERE / "base")
        for dom, seed in (("A", 2), ("B", 3)):
            ft = tf.LlamaForCausalLM.from_pretrained(HERE / "base")
            train(ft, data[dom][0], STEPS_FT, 1e-3, seed=seed)
            ft.save_pretrained(HERE / f"ft{dom}")
    base, a, b = (str(HERE / n) for n in ("base", "ftA", "ftB"))
    two = lambda extra: [
        {"model": a, "parameters": {"weight": 1.0, **extra}},  # noqa: E731
        {"model": b, "parameters": {"weight": 1.0, **extra}},
    ]
    merges = {
        "linear": {"merge_method": "linear", "models": two({})},
        "slerp (t=0.5)": {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": 0.5},
        },
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "models": two({})},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": base, "models": two({})},
        "ties (d=0.5)": {"merge_method": "ties", "base_model": base, "models": two({"density": 0.5})},
        "dare_linear (d=0.5)": {"merge_method": "dare_linear", "base_model": base, "models": two({"density": 0.5})},
        "dare_ties (d=0.5)": {"merge_method": "dare_ties", "base_model": base, "models": two({"density": 0.5})},
        "breadcrumbs (d=0.5)": {"merge_method": "breadcrumbs", "base_model": base, "models": two({"density": 0.5})},
        "della (d=0.5)": {"merge_method": "della", "base_model": base, "models": two({"density": 0.5})},
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": a}, {"model": b}]},
    }
    rows = []

    def score(label: str, path: str) -> None:
        m = tf.LlamaForCausalLM.from_pretrained(path).eval()
        pa, pb = perplexity(m, data["A"][1]), perplexity(m, data["B"][1])
        rows.append([label, round(pa, 3), round(pb, 3), round(math.sqrt(pa * pb), 3)])
        print(rows[-1], flush=True)

    score("base", base)
    score("fine-tune A (torch docs)", a)
    score("fine-tune B (stdlib docs)", b)
    for label, cfg_ in merges.items():
        out = HERE / ("merged-" + label.split()[0])
        ws.merge.run(cfg_, out, force=True, seed=0)
        score(label, str(out))
    md = (
        "## merge quality: per-domain perplexity of merged fine-tunes\n\n"
        f"Byte-level Llama ({tf.LlamaForCausalLM(cfg).num_parameters() / 1e6:.2f}M parameters) trained here for "
        f"{STEPS_BASE} steps on docstrings of installed packages, then fine-tuned {STEPS_FT} steps on torch's "
        "docstrings (A) and on the standard library's (B). Held-out byte perplexity (lower is better); the last "
        "column is the geometric mean of the two domains.\n\n" + table(["model", "ppl A", "ppl B", "geo-mean"], rows)
    )
    write_section("merge_quality", md)
    (HERE / "results.json").write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
