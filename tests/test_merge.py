"""weightsmith merge against mergekit 0.1.5 itself, plus determinism, refusals, the short form and the report.

mergekit runs once per module (all configs in one fixture) because its start-up is slow.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _merge_utils import load, make_base, make_finetune, max_diff, mergekit_available, run_mergekit, write_yaml

import weightsmith as ws
from weightsmith.cli import build_parser, main

LAYERS = 5  # enough layers for a gradient to interpolate between its points


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 5-layer fp32 Llama base and three fine-tunes (one leaves the norms untouched: exact zeros in its δ)."""

    root = tmp_path_factory.mktemp("merge-models")
    make_base(root / "base", LAYERS)
    fts = [
        make_finetune(root / "base", root / f"ft{i}", seed=i + 1, frozen=("norm",) if i == 2 else ()) for i in range(3)
    ]
    return {"root": root, "base": str(root / "base"), "ft": [str(f) for f in fts]}


def _configs(m) -> dict[str, dict]:
    base, (a, b, c) = m["base"], m["ft"]
    grad_t = [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.4},
    ]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.7}},
                {"model": b, "parameters": {"weight": 0.2}},
                {"model": c, "parameters": {"weight": 0.4}},
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": grad_t},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": -0.3}},
                {"model": c, "parameters": {"weight": [0.2, 0.9]}},
            ],
            "parameters": {"lambda": 0.9},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.3, "density": [0.2, 0.8]}},
                {"model": c, "parameters": {"weight": 0.8, "density": 0.7}},
            ],
        },
        "ties_short": {
            "merge_method": "ties",
            "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": c, "parameters": {"weight": 0.4}}],
            "parameters": {"density": 0.5},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
                {"model": b, "parameters": {"weight": 0.7, "density": 0.8}},
            ],
        },
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": [{"model": x} for x in (a, b, c)]},
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [{"model": a, "parameters": {"weight": 0.3}}, {"model": b, "parameters": {"weight": 0.7}}],
        },
        "dare_ties_d1": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": [
                {"model": x, "parameters": {"weight": w, "density": 1.0}} for x, w in ((a, 0.6), (b, 0.5), (c, 0.3))
            ],
        },
        "dare_linear_d1": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": [{"model": x, "parameters": {"weight": w, "density": 1.0}} for x, w in ((a, 0.6), (b, 0.5))],
        },
        "della_d1": {
            "merge_method": "della",
            "base_model": base,
            "models": [
                {"model": x, "parameters": {"weight": w, "density": 1.0}} for x, w in ((a, 0.6), (b, 0.5), (c, 0.3))
            ],
            "parameters": {"lambda": 1.2},
        },
    }


@pytest.fixture(scope="module")
def mk(models):
    """mergekit's output for every config, produced in one process."""
    if not mergekit_available():
        pytest.skip("mergekit is not installed (pip install -e .[peers])")
    out = {}
    for name, cfg in _configs(models).items():
        out[name] = run_mergekit(copy.deepcopy(cfg), models["root"] / f"mk-{name}")
    return out


PARITY = [
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "breadcrumbs",
    "model_stock",
    "nuslerp",
    "dare_ties_d1",
    "dare_linear_d1",
    "della_d1",
]


@pytest.mark.parametrize("name", PARITY)
def test_parity_with_mergekit(models, mk, name, tmp_path):
    ws.merge.run(_configs(models)[name], tmp_path / "out")
    ours, theirs = load(tmp_path / "out"), load(mk[name])
    diff, where = max_diff(ours, theirs)
    assert diff <= 1e-6, f"{name}: max |Δ| {diff} at {where}"
    changed, _ = max_diff(ours, load(models["base"]))
    assert changed > 1e-3  # the merge did something


def test_slerp_gradient_and_filters_take_effect(models, mk, tmp_path):
    """Each layer got its own t: the merged attention moves away from model a as the gradient rises."""
    merged, a, b = load(mk["slerp"]), load(models["ft"][0]), load(models["ft"][1])
    q = "model.layers.{}.self_attn.q_proj.weight"
    share = [
        float((merged[q.format(i)] - a[q.format(i)]).norm() / (b[q.format(i)] - a[q.format(i)]).norm())
        for i in range(LAYERS)
    ]
    assert share[0] < 1e-6 and share[-1] > 0.99 and 0.2 < share[1] < 0.8 and share[2] < share[1] < share[3]


def test_yaml_file_through_cli_matches_mergekit(models, mk, tmp_path):
    cfg = write_yaml(_configs(models)["ties"], tmp_path / "ties.yaml")
    assert main(["merge", str(cfg), "-o", str(tmp_path / "out")]) == 0
    assert max_diff(load(tmp_path / "out"), load(mk["ties"]))[0] <= 1e-6


def test_short_form_matches_mergekit(models, mk, tmp_path):
    a, c = models["ft"][0], models["ft"][2]
    rc = main(
        [
            "merge",
            "--method",
            "ties",
            "--base",
            models["base"],
            "--model",
            f"{a}@0.6",
            "--model",
            f"{c}@0.4",
            "--density",
            "0.5",
            "-o",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    assert max_diff(load(tmp_path / "out"), load(mk["ties_short"]))[0] <= 1e-6


def test_ties_report_has_kept_fraction_and_conflicts(models, tmp_path):
    report = ws.merge.run(_configs(models)["ties"], tmp_path / "out")
    assert 0.3 < report.summary["kept_fraction"] < 0.8
    assert 0 < report.summary["sign_conflict_rate"] < 1
    assert report.tensors and {"tensor", "kept", "sign_conflict"} <= set(report.tensors[0])
    assert report.details["parameters"]


def test_workers_give_byte_identical_output(models, tmp_path):
    cfg = {
        "merge_method": "dare_ties",
        "base_model": models["base"],
        "models": [{"model": x, "parameters": {"weight": 0.5, "density": 0.4}} for x in models["ft"]],
    }
    for n in (1, 3):
        ws.merge.run(cfg, tmp_path / f"w{n}", workers=n, seed=7)
    ws.merge.run(cfg, tmp_path / "other-seed", seed=8)
    one = (tmp_path / "w1" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "w3" / "model.safetensors").read_bytes()
    assert one != (tmp_path / "other-seed" / "model.safetensors").read_bytes()


def test_compute_threads_leave_a_core_to_the_writer_and_restore(monkeypatch):
    from weightsmith.stream import compute_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(8)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)), raising=False)
        with compute_threads(1) as threads:
            assert threads == torch.get_num_threads() == 5  # six cores, one for the writer
        assert torch.get_num_threads() == 8
        with compute_threads(2) as threads:
            assert threads == 2  # five cores shared by two workers
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
        with compute_threads(4) as threads:
            assert threads == torch.get_num_threads() == 1  # never below one
        torch.set_num_threads(3)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)
        with compute_threads(1) as threads:
            assert threads == 3  # never above what the caller set
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_out_dtype_casts_once(models, tmp_path):
    cfg = {**_configs(models)["linear"], "out_dtype": "bfloat16"}
    ws.merge.run(_configs(models)["linear"], tmp_path / "fp32")
    ws.merge.run(cfg, tmp_path / "bf16")
    ours, ref = load(tmp_path / "bf16"), load(tmp_path / "fp32")
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert all(torch.equal(ours[n], ref[n].to(torch.bfloat16)) for n in ref)
    assert ws.open(tmp_path / "bf16").config["dtype"] == "bfloat16"


# ---------------------------------------------------------------------------------------------------------------
# Refusals: one line, exit 2, nothing written


@pytest.fixture(scope="module")
def odd_vocab(models):
    """A fine-tune whose embedding and head have a different vocabulary size."""
    ckpt = ws.open(models["ft"][0])
    tensors = {n: ckpt[n] for n in ckpt}
    tensors["model.embed_tokens.weight"] = torch.cat([tensors["model.embed_tokens.weight"], torch.zeros(2, 32)])
    tensors["lm_head.weight"] = torch.cat([tensors["lm_head.weight"], torch.zeros(2, 32)])
    out = models["root"] / "odd-vocab"
    ws.save(tensors, out, config={**ckpt.config, "vocab_size": 66})
    return str(out)


def _bad_configs(m, odd):
    base, (a, b, c) = m["base"], m["ft"]
    ta = {"merge_method": "ties", "base_model": base, "models": [{"model": a, "parameters": {"weight": 1}}]}
    return {
        "unknown method": ({"merge_method": "frankenmerge", "models": [{"model": a}]}, "unknown merge_method"),
        "missing base": (
            {"merge_method": "ties", "models": [{"model": a, "parameters": {"weight": 1}}]},
            "needs a base_model",
        ),
        "slerp of three": (
            {
                "merge_method": "slerp",
                "base_model": a,
                "models": [{"model": x} for x in (a, b, c)],
                "parameters": {"t": 0.5},
            },
            "slerp takes 1 models besides the base, got 2",
        ),
        "zero weights": (
            {
                "merge_method": "linear",
                "models": [{"model": a, "parameters": {"weight": 1}}, {"model": b, "parameters": {"weight": -1}}],
            },
            "weights sum to 0",
        ),
        "mismatched shapes": (
            {
                "merge_method": "linear",
                "models": [{"model": a, "parameters": {"weight": 1}}, {"model": odd, "parameters": {"weight": 1}}],
            },
            "inputs do not match",
        ),
        "slices": ({**ta, "slices": []}, "give exactly one of 'models' and 'slices'"),
        "unknown parameter": ({**ta, "parameters": {"densty": 0.5}}, "parameter 'densty' is not a parameter of ties"),
        "missing weight": (
            {"merge_method": "ties", "base_model": base, "models": [{"model": a}]},
            "no value for parameter 'weight'",
        ),
        "bad density": ({**ta, "parameters": {"density": 1.5}}, "density 1.5"),
        "unknown tokenizer source": (
            {**ta, "tokenizer_source": "nowhere"},
            "tokenizer_source 'nowhere' is not a known tokenizer source",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown method",
        "missing base",
        "slerp of three",
        "zero weights",
        "mismatched shapes",
        "slices",
        "unknown parameter",
        "missing weight",
        "bad density",
        "unknown tokenizer source",
    ],
)
def test_bad_config_refused_through_cli(models, odd_vocab, case, tmp_path, capsys):
    cfg, expected = _bad_configs(models, odd_vocab)[case]
    path = write_yaml(cfg, tmp_path / "bad.yaml")
    out = tmp_path / "out"
    assert main(["merge", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_mismatch_lists_every_offender(models, odd_vocab):
    from weightsmith.errors import IncompatibleError

    cfg = _bad_configs(models, odd_vocab)["mismatched shapes"][0]
    with pytest.raises(IncompatibleError) as err:
        ws.merge.run(cfg, models["root"] / "never")
    msg = str(err.value)
    assert "model.embed_tokens.weight" in msg and "lm_head.weight" in msg and "vocab_size 66" in msg


def test_help_examples_parse():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["merge"]
    examples = [line.strip() for line in sub.epilog.splitlines()[1:] if line.strip()]
    assert len(examples) >= 4
    for example in examples:
        args = parser.parse_args(example.split()[1:])
        assert args.command == "merge" and args.out


def test_merge_imports_neither_transformers_nor_peft(models, tmp_path):
    """A streaming verb: torch and safetensors only, at run time."""
    import subprocess
    import sys

    cfg = write_yaml(_configs(models)["ties"], tmp_path / "ties.yaml")
    code = (
        "import sys; from weightsmith.cli import main; "
        f"rc = main(['merge', {str(cfg)!r}, '-o', {str(tmp_path / 'out')!r}]); "
        "bad = [m for m in ('transformers', 'peft', 'mergekit') if m in sys.modules]; "
        "sys.exit(rc or (3 if bad else 0))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
