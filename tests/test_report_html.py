"""The HTML report: the figures the verbs gather on request are the true ones, every kind of report is one
self-contained file of bounded size, and a real headless Chromium, offline, shows every section of each without a
console error and paints a non-blank page."""

from __future__ import annotations

import argparse
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

import weightsmith as ws
from weightsmith.cli import main
from weightsmith.report import Report, collecting_figures
from weightsmith.report_html import render
from weightsmith.report_html.names import layer_and_module, module_type

LLAMA_MODULES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


class _Sections(HTMLParser):
    """Section titles, and any tag or attribute that would make the page reach outside itself."""

    def __init__(self):
        super().__init__()
        self.sections: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-section" in attrs:
            self.sections.append(attrs["data-section"])
        if tag in ("script", "link", "img", "iframe", "object", "embed"):
            self.external.append(tag)
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith("#"):
                self.external.append(f"{tag} {key}={value}")


def sections_of(path: Path) -> _Sections:
    parser = _Sections()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    """A tiny Llama (with a tokenizer), two fine-tunes of it, a PEFT LoRA adapter and an evaluation text."""
    import peft
    from _merge_utils import make_finetune
    from _prune_utils import with_tokenizer, write_lines
    from conftest import SENTENCES, build_model

    root = tmp_path_factory.mktemp("report-inputs")
    base = with_tokenizer(tiny_model("llama"), root / "base")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft.get_peft_model(build_model("llama"), cfg).save_pretrained(root / "adapter")
    return {
        "base": base,
        "ft_a": make_finetune(base, root / "ft-a", seed=1),
        "ft_b": make_finetune(base, root / "ft-b", seed=2),
        "adapter": root / "adapter",
        "texts": write_lines(root / "texts.txt", SENTENCES[:4]),
    }


@pytest.fixture(scope="module")
def reports(inputs, tmp_path_factory) -> dict[str, Path]:
    """Every kind of report, made through the command line's --report (and a recipe's ``report:``)."""
    root = tmp_path_factory.mktemp("reports")
    base, a, b = inputs["base"], inputs["ft_a"], inputs["ft_b"]
    commands = {
        "inspect": ["inspect", base],
        "inspect-adapter": ["inspect", inputs["adapter"]],
        "diff": ["diff", base, a],
        "lora-merge": ["lora", "merge", base, inputs["adapter"], "-o", root / "folded"],
        "ties": [
            "merge",
            "--method",
            "ties",
            "--base",
            base,
            "--model",
            f"{a}@0.5",
            "--model",
            f"{b}@0.5",
            "--density",
            "0.5",
            "-o",
            root / "ties",
        ],
        "slerp": ["merge", "--method", "slerp", "--base", base, "--model", a, "--t", "0.5", "-o", root / "slerp"],
        "quantize": ["quantize", base, "-o", root / "int8", "--scheme", "int8"],
        "prune": ["prune", base, "-o", root / "pruned", "--sparsity", "0.5", "--eval-data", inputs["texts"]],
        "prune-ffn": ["prune", base, "-o", root / "ffn", "--structured", "ffn", "--ratio", "0.25"],
        "eval": ["eval", root / "pruned", "--ref", base, "--data", inputs["texts"]],
        "convert": ["convert", base, "-o", root / "bf16", "--dtype", "bfloat16"],
        "lora-unmerge": ["lora", "unmerge", root / "folded", inputs["adapter"], "-o", root / "unfolded"],
        "lora-extract": ["lora", "extract", base, a, "-o", root / "extracted", "--rank", "4"],
    }
    out = {}
    for kind, argv in commands.items():
        out[kind] = root / f"{kind}.html"
        code = main([str(x) for x in [*argv, "--report", out[kind]]])
        assert code == 0, kind
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "input": str(base),
                "output": str(root / "shipped"),
                "report": str(root / "recipe.html"),
                "steps": [
                    {"lora_merge": {"adapters": [str(inputs["adapter"])]}},
                    {"convert": {"dtype": "bfloat16"}},
                    {"quantize": {"scheme": "int8"}},
                ],
            }
        )
    )
    assert main(["run", str(recipe)]) == 0
    out["recipe"] = root / "recipe.html"
    return out


# -- the figures the verbs gather ------------------------------------------------------------------------------


def test_figures_are_gathered_only_on_request(inputs, tmp_path):
    plain = ws.lora.merge(inputs["base"], [inputs["adapter"]], tmp_path / "plain")
    assert plain.figures == {} and "figures" not in json.loads(plain.to_json())  # --json output unchanged
    with collecting_figures():
        drawn = ws.lora.merge(inputs["base"], [inputs["adapter"]], tmp_path / "drawn")
    rows = {r["name"]: r for r in drawn.figures["tensors"]}
    assert set(rows) == {r["name"] for r in plain.tensors}  # every folded tensor, nothing else
    before, after = ws.open(inputs["base"]), ws.open(tmp_path / "drawn")
    for name, row in rows.items():
        w, w2 = before[name].double(), after[name].double()
        assert row["rel_change"] == pytest.approx(float((w2 - w).norm() / w.norm()), rel=1e-4)
        assert row["cosine"] == pytest.approx(float((w * w2).sum() / (w.norm() * w2.norm())), abs=1e-6)
        assert row["rel_change"] > 0


def test_merge_figures_match_the_output(inputs, tmp_path):
    cfg = {
        "merge_method": "ties",
        "base_model": str(inputs["base"]),
        "models": [
            {"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in (inputs["ft_a"], inputs["ft_b"])
        ],
    }
    with collecting_figures():
        report = ws.merge.run(cfg, tmp_path / "ties", workers=2)  # figures gathered in the worker threads too
    rows = {r["name"]: r for r in report.figures["tensors"]}
    diff = {r["name"]: r for r in ws.diff(inputs["base"], tmp_path / "ties").tensors}
    layered = [n for n in rows if layer_and_module(n)[0] is not None and n.endswith("proj.weight")]
    assert len(layered) == 2 * len(LLAMA_MODULES)
    for name in layered:
        assert rows[name]["rel_change"] == pytest.approx(diff[name]["rel_fro"], rel=1e-5)
        assert 0.4 < rows[name]["kept"] < 0.85  # density 0.5 per model; the union of two masks keeps more
        assert 0 < rows[name]["sign_conflict"] < 0.5

    with collecting_figures():
        slerp = ws.merge.quick("slerp", [str(inputs["ft_a"])], tmp_path / "slerp", base=str(inputs["base"]), t=0.5)
    name = "model.layers.0.self_attn.q_proj.weight"
    x, y = ws.open(inputs["base"])[name].double(), ws.open(inputs["ft_a"])[name].double()
    angle = math.degrees(math.acos(float((x * y).sum() / (x.norm() * y.norm()))))
    row = next(r for r in slerp.figures["tensors"] if r["name"] == name)
    assert row["angle"] == pytest.approx(angle, rel=1e-4) and row["angle"] > 0.1


def test_eval_figures_are_per_text(inputs):
    with collecting_figures():
        report = ws.evaluate(inputs["base"], inputs["texts"])
    texts = report.figures["texts"]
    assert len(texts) == 4
    tokens = [t["tokens"] - 1 for t in texts]  # perplexity: geometric mean over all predicted tokens
    pooled = math.exp(sum(n * math.log(t["perplexity"]) for n, t in zip(tokens, texts)) / sum(tokens))
    assert pooled == pytest.approx(report.summary["perplexity"], rel=1e-6)


def test_names_locate_layers_and_modules():
    assert layer_and_module("model.layers.3.self_attn.q_proj.weight") == (3, "self_attn.q_proj")
    assert layer_and_module("h.11.attn.c_attn.bias") == (11, "attn.c_attn.bias")
    assert layer_and_module("encoder.layer.0.attention.self.query.weight") == (0, "attention.self.query")
    assert layer_and_module("model.embed_tokens.weight") == (None, "model.embed_tokens")
    kinds = {
        "model.layers.0.self_attn.o_proj.weight": "attention",
        "model.layers.0.mlp.down_proj.weight": "MLP",
        "model.layers.0.input_layernorm.weight": "norm",
        "encoder.layer.1.attention.output.LayerNorm.weight": "norm",
        "encoder.layer.1.attention.output.dense.weight": "attention",
        "encoder.layer.1.output.dense.weight": "MLP",
        "model.embed_tokens.weight": "embeddings",
        "lm_head.weight": "heads",
    }
    assert {n: module_type(n) for n in kinds} == kinds


# -- the files -------------------------------------------------------------------------------------------------

EXPECTED = {  # sections each kind of report must have, beyond Summary
    "inspect": ["Composition", "Parameters"],
    "inspect-adapter": ["Composition", "Adapter", "Parameters"],
    "diff": ["Relative difference ‖A − B‖ / ‖A‖", "Cosine to the original (darker: moved more)", "Tensors"],
    "lora-merge": ["Relative change ‖W′ − W‖ / ‖W‖", "Cosine to the original (darker: moved more)", "Provenance"],
    "ties": [
        "Relative change ‖W′ − W‖ / ‖W‖",
        "Kept fraction of the task vectors",
        "Sign-conflict rate (entries whose sign lost the election)",
        "Provenance",
        "Timings",
    ],
    "slerp": ["SLERP angle between the two endpoints (degrees)", "Relative change ‖W′ − W‖ / ‖W‖"],
    "quantize": ["Bytes before and after", "Relative error ‖W − Q(W)‖ / ‖W‖", "Tensors", "Provenance"],
    "prune": ["Sparsity (fraction of zeros)", "Quality before and after", "Provenance"],
    "prune-ffn": ["Structure: FFN neurons", "Provenance"],
    "eval": ["Per text"],
    "convert": ["Provenance", "Timings"],
    "lora-unmerge": ["Relative change ‖W′ − W‖ / ‖W‖", "Provenance"],
    "lora-extract": [
        "Energy of ΔW kept by the low-rank factors",
        "Rank",
        "Residual ‖ΔW − B·A‖ / ‖ΔW‖ of the extracted factors",
    ],
    "recipe": ["Plan", "Step 0 lora_merge", "Step 1 convert", "Step 2 quantize", "Provenance", "Timings"],
}


def test_every_report_is_self_contained_with_its_sections(reports):
    for kind, path in reports.items():
        found = sections_of(path)
        assert found.external == [], (kind, found.external)
        assert "Summary" in found.sections, kind
        missing = [s for s in EXPECTED[kind] if s not in found.sections]
        assert not missing, (kind, missing, found.sections)
        assert path.stat().st_size < 150_000, (kind, path.stat().st_size)
    ranks = reports["inspect-adapter"].read_text()
    assert "Rank per adapted module" in ranks and "mlp.down_proj · layer 1: 4<" in ranks  # r=4 on each target
    ffn = reports["prune-ffn"].read_text()  # 96 neurons, ratio 0.25: 72 kept and 24 removed in each layer
    assert ffn.count("<title>0: 72</title>") == ffn.count("<title>1: 72</title>") == 1
    assert ffn.count("<title>1: 24</title>") == 1
    heat = reports["ties"].read_text()
    assert heat.count("<rect") > 2 * 2 * len(LLAMA_MODULES)  # a cell per layer × module, per figure
    assert "layer 1: " in heat


def test_recipe_report_draws_each_step_from_its_own_report(reports):
    text = reports["recipe"].read_text()
    assert "streamed into the next step as a lazy view" in text  # the fold streamed into convert
    step2 = text[text.index('id="step-2-quantize"') :]
    assert "Relative error ‖W − Q(W)‖ / ‖W‖" in step2 and "<svg" in step2


def test_report_path_is_checked_before_any_work(inputs, tmp_path, capsys):
    out = tmp_path / "merged"
    existing = tmp_path / "r.html"
    existing.write_text("mine")
    argv = ["lora", "merge", str(inputs["base"]), str(inputs["adapter"]), "-o", str(out)]
    assert main([*argv, "--report", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not out.exists() and existing.read_text() == "mine"
    assert main([*argv, "--report", str(tmp_path / "r.txt")]) == 2
    assert not out.exists()
    assert main(["inspect", str(inputs["base"]), "--report", str(existing), "--force"]) == 0
    assert "Composition" in sections_of(existing).sections
    assert not list(tmp_path.glob(".*.partial"))


def test_every_command_takes_report():
    from weightsmith.cli import build_parser

    def leaves(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [(prefix, parser)]
        return [leaf for name, child in subs[0].choices.items() for leaf in leaves(child, f"{prefix} {name}")]

    commands = leaves(build_parser(), "weightsmith")
    assert len(commands) >= 15
    assert [name for name, p in commands if "--report" not in p._option_string_actions] == []


def _synthetic(layers: int) -> Report:
    """A merge of a 7B-shaped model (32 layers × 7 Linear modules + norms, embeddings, head), every figure drawn."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(layers):
        for m in [*LLAMA_MODULES, "input_layernorm", "post_attention_layernorm"]:
            rows.append(
                {
                    "name": f"model.layers.{i}.{m}.weight",
                    "rel_change": float(rng.uniform(0, 0.1)),
                    "cosine": float(1 - rng.uniform(0, 0.01)),
                    "kept": float(rng.uniform(0.3, 0.7)),
                    "sign_conflict": float(rng.uniform(0, 0.3)),
                }
            )
    rows += [{"name": n, "rel_change": 0.01, "cosine": 0.999} for n in ("model.embed_tokens.weight", "lm_head.weight")]
    return Report(
        "merge",
        output="merged",
        summary={"method": "ties", "tensors": len(rows)},
        details={"parameters": {"top-level": {"density": 0.5}}},
        tensors=sorted(rows, key=lambda r: -r.get("sign_conflict", 0))[:10],
        timings={"open": 0.2, "merge": 310.0},
        figures={"tensors": rows},
    )


def test_report_size_of_a_7b_merge_is_bounded():
    size_7b = len(render(_synthetic(32)).encode())
    size_70b = len(render(_synthetic(80)).encode())
    assert size_7b < 300_000, size_7b  # a few hundred kB at most
    assert size_70b < 2.6 * size_7b  # grows with the cells, not with the parameters


# -- in a real browser -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from _browser import Browser, find_chromium

    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; .ci/run installs it)")
    b = Browser(binary)
    yield b
    b.close()


SHOWN = """Array.from(document.querySelectorAll('section[data-section]')).map(s => {
  const r = s.getBoundingClientRect(), st = getComputedStyle(s);
  return [s.dataset.section, r.width > 0 && r.height > 0 && st.display !== 'none' && st.visibility !== 'hidden',
          Array.from(s.querySelectorAll(':scope > .figure > svg, :scope > div > svg'))
            .every(g => g.getBBox().width > 0 && g.getBBox().height > 0)];
})"""


def _non_blank(png: bytes) -> tuple[float, float]:
    from _browser import decode_png

    pixels = decode_png(png)[..., :3].reshape(-1, 3).astype(np.int32)
    grey = pixels.mean(1)
    values, counts = np.unique(pixels[:, 0] * 65536 + pixels[:, 1] * 256 + pixels[:, 2], return_counts=True)
    return float(grey.std()), 1 - counts.max() / len(pixels)


def test_every_report_shows_every_section_in_a_browser_offline(reports, browser, tmp_path):
    for kind, path in reports.items():
        browser.open(path)
        shown = browser.evaluate(SHOWN)
        assert [s for s, *_ in shown] == sections_of(path).sections, kind
        assert all(visible and drawn for _, visible, drawn in shown), (kind, shown)
        assert browser.console_errors() == [], kind
        assert browser.requests() == [], kind
        png = browser.screenshot()
        (tmp_path / f"{kind}.png").write_bytes(png)
        spread, not_background = _non_blank(png)
        assert spread > 10 and not_background > 0.05, (kind, spread, not_background)


def test_the_browser_check_catches_errors_requests_and_blank_pages(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><img src="https://example.com/x.png">'
        "<script>console.error('boom'); undefined_call();</script></body></html>"
    )
    browser.open(bad)
    assert any("boom" in e for e in browser.console_errors())
    assert any("undefined_call" in e or "Uncaught" in e for e in browser.console_errors())
    assert "https://example.com/x.png" in browser.requests()
    spread, not_background = _non_blank(browser.screenshot())
    assert spread < 10 and not_background < 0.05  # a white page is judged blank
