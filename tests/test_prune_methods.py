"""Pruning methods as config values: they validate themselves, round-trip through their dicts, equal the keyword
form on disk, and the CLI's flags are their fields (built without importing torch)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import weightsmith as ws
from weightsmith.cli import build_parser
from weightsmith.compress.prune import (
    CONFIGS,
    NM,
    RUNNERS,
    Magnitude,
    StructuredFFN,
    StructuredHeads,
    Wanda,
    keyword_options,
    make_method,
)
from weightsmith.errors import ConfigError


@pytest.mark.parametrize(
    "config",
    [
        Magnitude(sparsity=0.5),
        Magnitude(sparsity=0.3, scope="global"),
        Wanda(sparsity=0.5, calibration="c.txt", samples=8),
        NM(n=1, m=4),
        NM(criterion="wanda", calibration="c.txt"),
        StructuredFFN(ratio=0.25),
        StructuredHeads(keep_heads=2, calibration="c.txt"),
    ],
)
def test_configs_round_trip_through_their_dicts(config):
    assert make_method(config.to_dict()) == config
    assert make_method(config) is config


@pytest.mark.parametrize(
    "keywords, expected",
    [
        ({"sparsity": 0.5}, Magnitude(sparsity=0.5)),
        ({"sparsity": 0.5, "scope": "global"}, Magnitude(sparsity=0.5, scope="global")),
        ({"method": "wanda", "sparsity": 0.5, "calibration": "c"}, Wanda(sparsity=0.5, calibration="c")),
        ({"pattern": "2:4"}, NM()),
        ({"pattern": "1:4", "method": "wanda", "calibration": "c"}, NM(n=1, criterion="wanda", calibration="c")),
        ({"structured": "ffn", "ratio": 0.25}, StructuredFFN(ratio=0.25)),
        ({"structured": "heads", "keep_heads": 2}, StructuredHeads(keep_heads=2)),
        ({"sparsity": 0.5, "scope": None, "ratio": None}, Magnitude(sparsity=0.5)),  # None = not given (a CLI flag)
    ],
)
def test_keyword_form_builds_the_config(keywords, expected):
    assert make_method(**keywords) == expected


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Magnitude(sparsity=1.0), "sparsity 1.0: must be in [0, 1)"),
        (lambda: Magnitude(sparsity=0.5, scope="row"), "scope 'row': expected one of layer, global"),
        (lambda: Wanda(sparsity=0.5, calibration="c", samples=0), "need samples ≥ 1"),
        (lambda: NM(n=4, m=2), "expected N:M with 0 < N < M"),
        (lambda: NM(criterion="wanda"), "wanda needs `calibration`"),
        (lambda: NM(calibration="c"), "magnitude pruning is data-free"),
        (lambda: StructuredFFN(ratio=-0.1), "ratio -0.1: must be in [0, 1)"),
        (lambda: StructuredHeads(), "needs `ratio` or `keep_heads`"),
        (lambda: StructuredHeads(ratio=0.5, keep_heads=2), "give `ratio` or `keep_heads`, not both"),
        (lambda: make_method(sparsity="half"), "parameter 'sparsity' must be float, got str 'half'"),
        (lambda: make_method(sparsity=0.5, colour="red"), "unknown parameter 'colour'"),
        (lambda: make_method(sparsity=0.5, ratio=0.5), "`ratio` is for `structured` pruning"),
        (lambda: make_method(Magnitude(sparsity=0.5), scope="global"), "pass options inside the config"),
        (lambda: make_method({"method": "ffn", "sparsity": 0.5}), "option(s) sparsity do not apply"),
        (lambda: make_method(structured="ffn", ratio=0.5, pattern="2:4"), "not `sparsity`/`pattern`"),
    ],
)
def test_configs_refuse_in_one_line(build, message):
    with pytest.raises(ConfigError) as caught:
        build()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_configs_are_frozen_and_keyword_only():
    config = Magnitude(sparsity=0.5)
    with pytest.raises(AttributeError):
        config.sparsity = 0.1  # type: ignore[misc]
    with pytest.raises(TypeError):
        Magnitude(0.5)  # type: ignore[misc]


def test_every_config_has_a_runner():
    assert set(RUNNERS) == set(CONFIGS)


def test_config_and_keyword_form_write_the_same_checkpoint(tiny_model, tmp_path):
    src = tiny_model("llama")
    ws.prune(src, tmp_path / "config", Magnitude(sparsity=0.4, scope="global"))
    ws.prune(src, tmp_path / "keywords", sparsity=0.4, scope="global")
    a, b = load_file(tmp_path / "config" / "model.safetensors"), load_file(tmp_path / "keywords" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    report = ws.prune(src, tmp_path / "nm", NM(n=1, m=4))
    assert report.summary["sparsity_pruned_tensors"] == 0.75


def test_cli_flags_are_the_keyword_options():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["prune"]
    flags = {a.dest: a for a in sub._actions if a.option_strings}
    for name, spec in keyword_options().items():
        assert name in flags, name
        assert flags[name].type is spec["type"] and flags[name].help == spec["help"]
        assert tuple(flags[name].choices or ()) == tuple(spec.get("choices") or ())
    names = {f.name for cls in CONFIGS for f in dataclasses.fields(cls)} - {"n", "m", "criterion"}
    assert names <= set(keyword_options())


def test_prune_help_and_configs_import_no_torch():
    code = (
        "import sys, weightsmith.cli as c; from weightsmith.compress.prune import Magnitude, make_method; "
        "c.build_parser(); make_method(sparsity=0.5); "
        "print([m for m in ('torch', 'numpy', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_recipe_step_is_checked_by_building_its_config(tmp_path):
    from weightsmith.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"recipe step 0 \(prune\): `keep_heads` is for `structured` heads"):
        load_recipe({"input": "x", "output": str(tmp_path / "o"), "steps": [{"prune": {"structured": "ffn",
                     "ratio": 0.5, "keep_heads": 2}}]})  # fmt: skip
    recipe = load_recipe({"input": "x", "output": "o", "steps": [{"prune": {"sparsity": 0.5, "eval_data": "h.txt"}}]})
    assert recipe.steps[0].params == {"sparsity": 0.5, "eval_data": "h.txt"}
