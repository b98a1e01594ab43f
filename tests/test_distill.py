"""Distillation: losses against torch's own definitions, layer selection against transformers, training end to end,
exact resume, two-process data parallelism under accelerate launch, and the refusals through the CLI."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from _distill_utils import english_lines, with_tokenizer, write_corpus
from _loading import load_checked
from conftest import build_model, embed

import weightsmith as ws
from weightsmith.checkpoint import Checkpoint
from weightsmith.cli import build_parser, main
from weightsmith.compress.distill import data as D
from weightsmith.compress.distill import losses as L
from weightsmith.compress.distill import student as S
from weightsmith.compress.distill import train as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = english_lines()
    assert len(lines) > 600
    return {
        "train": write_corpus(d / "train.txt", lines[:400]),
        "eval": write_corpus(d / "eval.jsonl", lines[400:440], jsonl=True),
        "empty": write_corpus(d / "empty.txt", ["", "   "]),
    }


@pytest.fixture(scope="module")
def llama(tiny_model, tmp_path_factory):
    return with_tokenizer(tiny_model("llama"), tmp_path_factory.mktemp("t") / "llama", causal=True)


@pytest.fixture(scope="module")
def bert(tiny_model, tmp_path_factory):
    return with_tokenizer(tiny_model("bert"), tmp_path_factory.mktemp("t") / "bert", causal=False)


def _masked_lm(dest: Path, hidden: int, layers: int) -> Path:
    config = tf.BertConfig(
        vocab_size=128,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(hidden)
    tf.BertForMaskedLM(config).save_pretrained(dest / "raw")
    return with_tokenizer(dest / "raw", dest / "model", causal=False)


# -- losses ------------------------------------------------------------------------------------------------------


def test_kd_loss_matches_torch_kl_div_and_cross_entropy():
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 11), torch.randn(3, 5, 11) * 2
    labels = torch.randint(11, (3, 5))
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    keep = mask.bool()
    temp, alpha = 2.0, 0.3
    loss, parts = L.kd_loss(s, t, labels, mask, temperature=temp, alpha=alpha)
    # torch's KLDivLoss over the kept tokens: sum over vocabulary, mean over tokens, times T²
    kl = (
        F.kl_div(
            F.log_softmax(s[keep] / temp, -1), F.log_softmax(t[keep] / temp, -1), log_target=True, reduction="batchmean"
        )
        * temp**2
    )
    ce = F.cross_entropy(s[keep], labels[keep])
    torch.testing.assert_close(parts["kl"], kl)
    torch.testing.assert_close(parts["ce"], ce)
    torch.testing.assert_close(loss, alpha * kl + (1 - alpha) * ce)
    assert float(L.soft_kl(s, s.clone(), mask, temp)) == pytest.approx(0.0, abs=1e-6)


def test_hidden_and_feature_losses():
    torch.manual_seed(1)
    h = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    zero, _ = L.hidden_loss(h, h.clone(), mask)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 4, 8)
    loss, parts = L.hidden_loss(h, other, mask)
    keep = mask.bool()
    torch.testing.assert_close(parts["mse"], F.mse_loss(h[keep], other[keep]))
    torch.testing.assert_close(parts["cos_tok"], (1 - F.cosine_similarity(h[keep], other[keep], dim=-1)).mean())
    pooled = [torch.stack([x[i][keep[i]].mean(0) for i in range(2)]) for x in (h, other)]
    torch.testing.assert_close(parts["cos_pool"], (1 - F.cosine_similarity(*pooled, dim=-1)).mean())
    proj = torch.nn.Linear(8, 6)
    target = torch.randn(2, 4, 6)
    with torch.no_grad():
        expected = F.mse_loss(proj(h)[keep], target[keep])
    torch.testing.assert_close(L.feature_loss([h], [target], [proj], mask), expected)


def test_length_grouped_order_is_a_permutation_with_less_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = tuple(torch.randint(3, 60, (1000,), generator=gen).tolist())
    grouped, plain = D.Order(1000, 16, 1, 0, lengths), D.Order(1000, 16, 1, 0)
    steps = 2 * 1000 // 16  # two epochs
    batches = [grouped.batch(s, 0) for s in range(steps)]
    flat = [i for b in batches for i in b]
    assert sorted(flat[:1000]) == sorted(flat[1000:]) == list(range(1000))  # each epoch sees every example once
    assert flat[:1000] != flat[1000:]  # and epochs differ
    assert batches == [D.Order(1000, 16, 1, 0, lengths).batch(s, 0) for s in range(steps)]  # deterministic

    def padded(bs):  # tokens in the padded (B, L) batches
        return sum(len(b) * max(lengths[i] for i in b) for b in bs)

    assert padded(batches) < 0.8 * padded([plain.batch(s, 0) for s in range(steps)])
    # two ranks split each grouped global batch without overlap
    two = D.Order(1000, 8, 2, 0, lengths)
    assert [two.batch(s, 0) + two.batch(s, 1) for s in range(steps)] == batches


def test_feature_layers_map_to_the_teacher_layer_the_next_kept_layer_reads():
    assert [S.teacher_counterpart(i, [0, 2, 4], 6, 3) for i in range(3)] == [1, 3, 5]
    assert [S.teacher_counterpart(i, [0, 1, 2, 3], 4, 4) for i in range(4)] == [0, 1, 2, 3]  # all kept: itself
    assert [S.teacher_counterpart(i, None, 6, 3) for i in range(3)] == [1, 3, 5]  # any student: proportional
    assert [S.teacher_counterpart(i, None, 12, 4) for i in range(4)] == [2, 5, 8, 11]


# -- student initialisation --------------------------------------------------------------------------------------


def test_layer_selection_equals_transformers_with_layers_removed(tiny_model, tmp_path):
    teacher = Checkpoint(tiny_model("llama"))
    out = S.write_student(teacher, tmp_path / "s", [1])
    student = load_checked(tf.AutoModelForCausalLM, out).eval()
    assert student.config.num_hidden_layers == 1
    reference = build_model("llama")  # the teacher, with layer 0 dropped by hand
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[1]])
    reference.config.num_hidden_layers = 1
    ids = torch.randint(128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(student(ids, use_cache=False).logits, reference(ids, use_cache=False).logits)
    assert Checkpoint(out).config["num_hidden_layers"] == 1


# -- training ----------------------------------------------------------------------------------------------------


def test_causal_distill_writes_a_loadable_student(llama, corpus, tmp_path):
    out = tmp_path / "student"
    report = ws.distill(
        llama,
        out,
        corpus["train"],
        layers=[0],
        steps=12,
        lr=2e-3,
        seq_len=32,
        batch_size=4,
        eval_data=corpus["eval"],
        eval_every=5,
    )
    assert report.summary["loss_finite"] and report.summary["loss_last"] < report.summary["loss_first"]
    assert [e["step"] for e in report.details["evals"]] == [5, 10, 12]
    model = load_checked(tf.AutoModelForCausalLM, out)
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    initial = Checkpoint(llama)["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight.detach(), initial)  # it trained
    # the reported held-out CE is the written model's
    ids = tok(english_lines()[400], return_tensors="pt")["input_ids"][:, :32]
    with torch.no_grad():
        assert torch.isfinite(model(ids, labels=ids).loss)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # nothing else left beside it


def test_masked_lm_with_a_narrower_student_and_projected_features(corpus, tmp_path):
    teacher = _masked_lm(tmp_path / "teacher", hidden=64, layers=2)
    student = _masked_lm(tmp_path / "student", hidden=32, layers=1)
    out = tmp_path / "out"
    report = ws.distill(
        teacher,
        out,
        corpus["train"],
        student=student,
        steps=6,
        seq_len=32,
        batch_size=4,
        feature_layers=[0],
        eval_data=corpus["eval"],
    )
    assert report.summary["kind"] == "masked" and report.summary["loss_finite"]
    assert "eval_ce" in report.summary
    written = Checkpoint(out)
    assert not any("projection" in n for n in written)  # the learned projection is training-only
    assert load_checked(tf.BertForMaskedLM, out).config.hidden_size == 32


def test_resume_equals_an_uninterrupted_run(bert, corpus, tmp_path, monkeypatch):
    common = dict(layers=[1], steps=8, save_every=3, seq_len=32, batch_size=4, lr=1e-3, seed=3)
    ws.distill(bert, tmp_path / "a", corpus["train"], **common)

    calls = {"n": 0}
    real = T._teacher_out

    def interrupted(*args, **kw):  # Ctrl-C during step 7, after the state of step 6 was saved
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(T, "_teacher_out", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ws.distill(bert, tmp_path / "b", corpus["train"], **common)
    assert not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "b.distill-state").iterdir()] == ["step-00000006"]
    monkeypatch.setattr(T, "_teacher_out", real)
    report = ws.distill(bert, tmp_path / "b", corpus["train"], resume=True, **common)
    assert report.summary["resumed_from"] == 6
    a, b = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert set(a) == set(b)
    worst = max(float((a[n].float() - b[n].float()).abs().max()) for n in a)
    assert worst <= 1e-6
    # a resume with other parameters is refused
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(bert),
                "-o",
                str(tmp_path / "c"),
                "--data",
                str(corpus["train"]),
                "--layers",
                "1",
                "--steps",
                "8",
                "--save-every",
                "3",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--lr",
                "5e-4",
                "--seed",
                "3",
                "--resume",
                "--state-dir",
                str(tmp_path / "b.distill-state"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "c").exists()


def test_minilm_student_gets_closer_to_the_teacher(minilm_path, corpus, tmp_path):
    before = S.write_student(Checkpoint(minilm_path), tmp_path / "init", [0, 2, 4])
    out = tmp_path / "out"
    report = ws.distill(
        minilm_path,
        out,
        corpus["train"],
        layers=[0, 2, 4],
        steps=8,
        lr=1e-4,
        seq_len=32,
        batch_size=8,
        eval_data=corpus["eval"],
    )
    teacher = embed(minilm_path)
    cos_before = float((embed(before) * teacher).sum(-1).mean())
    cos_after = float((embed(out) * teacher).sum(-1).mean())
    assert cos_after > cos_before + 0.005, (cos_before, cos_after)
    assert 0 < report.summary["eval_cosine"] <= 1
    assert (out / "modules.json").is_file() and (out / "1_Pooling").is_dir()  # still a sentence-transformers dir


def test_frozen_embeddings_and_bf16_autocast(bert, corpus, tmp_path):
    out = tmp_path / "out"
    report = ws.distill(
        bert,
        out,
        corpus["train"],
        layers=[1],
        steps=4,
        seq_len=32,
        batch_size=4,
        lr=1e-3,
        freeze_embeddings=True,
        mixed_precision="bf16",
        eval_data=corpus["eval"],
    )
    assert report.summary["loss_finite"] and 0 < report.summary["eval_cosine"] <= 1
    teacher, student = Checkpoint(bert), Checkpoint(out)
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(student[name], teacher[name])  # frozen
    layer = "encoder.layer.0.attention.self.query.weight"  # student layer 0 = teacher layer 1, trained
    assert not torch.equal(student[layer], teacher["encoder.layer.1.attention.self.query.weight"])
    assert student[layer].dtype == torch.float32  # autocast leaves the weights in float32


def test_two_processes_under_accelerate_launch(llama, corpus, tmp_path):
    # accelerate 1.x's --cpu flag selects its single-process launcher (multi-CPU needs MPI); --multi_gpu starts the
    # processes with torchrun, and on this GPU-less machine distill trains them on CPU over gloo
    out = tmp_path / "out"
    cmd = [
        str(ROOT / ".venv/bin/accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29631",
        "-m",
        "weightsmith.cli",
        "distill",
        "--teacher",
        str(llama),
        "-o",
        str(out),
        "--data",
        str(corpus["train"]),
        "--layers",
        "0",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--json",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WEIGHTSMITH_QUIET": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # exactly one report: only the main process prints
    summary = report["summary"]
    assert summary["processes"] == 2 and summary["loss_finite"]
    ranks = report["details"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["examples_seen"] == 6 * 4 for r in ranks)
    assert summary["rank_overlap"] == 0 and ranks[0]["first_batch"] != ranks[1]["first_batch"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    load_checked(tf.AutoModelForCausalLM, out)
    # 2 processes × 4 examples see the same global batches as 1 process × 8, and DDP averages the gradients: the
    # weights must match a single-process run. Compared as updates (trained − initial): Adam's first steps move every
    # weight by ±lr whatever its gradient's size, so reduction-order noise flips single elements; the update as a
    # whole must agree.
    single = tmp_path.parent / f"{tmp_path.name}-single"
    ws.distill(llama, single, corpus["train"], layers=[0], steps=6, batch_size=8, seq_len=32)
    init = Checkpoint(S.write_student(Checkpoint(llama), tmp_path.parent / f"{tmp_path.name}-init", [0]))
    a, b = Checkpoint(out), Checkpoint(single)
    assert set(a) == set(b) == set(init)
    gap = torch.cat([(a[n] - b[n]).flatten() for n in a]).norm()
    update = torch.cat([(b[n] - init[n]).flatten() for n in a]).norm()
    assert gap <= 0.02 * update, (float(gap), float(update))


# -- refusals through the CLI ------------------------------------------------------------------------------------


def _refused(args: list[str], out: Path, capsys, needle: str) -> None:
    assert main(["distill", "-o", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert not list(out.parent.glob(f"{out.name}*"))


def test_refusals(llama, bert, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--teacher", str(llama), "--layers", "0"]
    _refused([*base, "--data", str(tmp_path / "missing.txt"), "--steps", "2"], out, capsys, "data file not found")
    _refused([*base, "--data", str(corpus["empty"]), "--steps", "2"], out, capsys, "data file is empty")
    _refused(
        ["--teacher", str(llama), "--layers", "0,5", "--data", str(corpus["train"]), "--steps", "2"],
        out,
        capsys,
        "out of range",
    )
    _refused([*base, "--data", str(corpus["train"]), "--steps", "0"], out, capsys, "steps 0")
    _refused([*base, "--data", str(corpus["train"]), "--epochs", "0.001"], out, capsys, "zero steps")
    other_vocab = tmp_path / "gpt2"
    tf.GPT2LMHeadModel(
        tf.GPT2Config(vocab_size=200, n_embd=32, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(other_vocab)
    capsys.readouterr()  # the save's progress bar
    _refused(
        ["--teacher", str(llama), "--student", str(other_vocab), "--data", str(corpus["train"]), "--steps", "2"],
        out,
        capsys,
        "vocabulary",
    )
    _refused(
        ["--teacher", str(llama), "--student", str(bert), "--data", str(corpus["train"]), "--steps", "2"],
        out,
        capsys,
        "cannot be distilled",
    )


def test_help_examples_parse():
    parser = build_parser()
    epilog = parser._subparsers._group_actions[0].choices["distill"].epilog
    examples = [line.strip() for line in epilog.splitlines()[1:]]
    assert len(examples) >= 4
    for example in examples:
        argv = shlex.split(example)
        argv = argv[argv.index("distill") :]  # also the accelerate launch form
        args = parser.parse_args(argv)
        assert args.command == "distill"


def test_cli_stays_torch_free():
    code = "import sys, weightsmith.cli as c; c.build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
