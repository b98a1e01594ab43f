"""One self-contained HTML page per report: the verbs' ``Report`` drawn as layer × module heat maps and bar charts.

The page holds its style and its pictures (inline SVG) and nothing else: no script, no font, no request when it
is opened, so it reads offline and can be attached to an issue or a model card. The verbs know nothing of HTML;
they fill ``Report.figures`` when called inside ``collecting_figures()`` and this module draws what it finds.

>>> from weightsmith.report import collecting_figures
>>> with collecting_figures():  # doctest: +SKIP
...     report = ws.lora.merge("llama", ["adapter"], "merged")
>>> write_html(report, "merged.html")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from weightsmith.errors import ConfigError, WeightsmithError
from weightsmith.report import Report
from weightsmith.report_html import charts
from weightsmith.report_html.names import layer_and_module, module_type

# What each per-tensor figure means and how to colour it: (row key, title, palette, darker when smaller).
METRICS = (
    ("rel_change", "relative change ‖W′ − W‖ / ‖W‖", charts.WARM, False),
    ("rel_fro", "relative difference ‖A − B‖ / ‖A‖", charts.WARM, False),
    ("cosine", "cosine to the original (darker: moved more)", charts.WARM, True),
    ("max_abs", "max |Δ|", charts.WARM, False),
    ("angle", "SLERP angle between the two endpoints (degrees)", charts.WARM, False),
    ("kept", "kept fraction of the task vectors", charts.COOL, False),
    ("sign_conflict", "sign-conflict rate (entries whose sign lost the election)", charts.WARM, False),
    ("rel_error", "relative error ‖W − Q(W)‖ / ‖W‖", charts.WARM, False),
    ("sparsity", "sparsity (fraction of zeros)", charts.WARM, False),
    ("energy_kept", "energy of ΔW kept by the low-rank factors", charts.COOL, True),
    ("rank", "rank", charts.COOL, False),
    ("params", "parameters", charts.COOL, False),
)
# where one row key means something else for one verb
TITLES = {("lora extract", "rel_error"): "residual ‖ΔW − B·A‖ / ‖ΔW‖ of the extracted factors"}
MAX_TABLE_ROWS = 25
CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b9c0cc}nav{padding:8px 28px;background:#e6e9ef;font-size:13px}
nav a{margin-right:14px;color:#234;text-decoration:none}main{padding:8px 28px 40px;max-width:1180px}
section{background:#fff;border-radius:6px;padding:12px 18px;margin:14px 0;box-shadow:0 1px 2px #0002}
section section{box-shadow:none;border:1px solid #e3e6eb}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 10px 2px 0;text-align:left;vertical-align:top}
th{color:#556;font-weight:600;border-bottom:1px solid #ccd}tbody tr:nth-child(even){background:#f7f8fa}
td.num{text-align:right;font-variant-numeric:tabular-nums}th+td.num{text-align:left}code{font-size:12px;word-break:break-all}
svg{display:block;margin:6px 0 10px;max-width:100%;height:auto}svg text{font:11px sans-serif;fill:#333}
.figure{overflow-x:auto}.note{color:#555}.muted{color:#778}
"""


def check_report_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse a report path before any work is done: not .html, no parent directory, or an existing file
    without ``force``."""
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{p}: a report is an .html file")
    if not p.parent.is_dir():
        raise ConfigError(f"{p}: directory {p.parent} does not exist")
    if p.exists() and not force:
        raise ConfigError(f"{p}: already exists (pass force to replace it)")
    return p


def write_html(report: Report, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write ``report`` as one self-contained HTML file, atomically (a temporary sibling renamed into place)."""
    p = check_report_path(path, force)
    tmp = p.with_name(f".{p.name}.partial")
    try:
        tmp.write_text(render(report), encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def render(report: Report | Mapping[str, Any]) -> str:
    """The whole page as text."""
    from weightsmith import __version__

    data = report.to_dict() if isinstance(report, Report) else dict(report)
    title = data["operation"] + (f" → {data['output']}" if data.get("output") else "")
    sections = _body(data, level=2)
    nav = "".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name, _ in sections)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>weightsmith {escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>weightsmith {escape(title)}</h1><p>weightsmith {escape(__version__)} · {stamp}</p></header>"
        f"<nav>{nav}</nav><main>{''.join(html for _, _, html in sections)}</main></body></html>\n"
    )


# -- sections --------------------------------------------------------------------------------------------------

Section = tuple[str, str, str]  # (id, title, html)


def _section(sid: str, name: str, inner: str, level: int) -> Section:
    return (
        sid,
        name,
        f'<section id="{sid}" data-section="{escape(name)}"><h{level}>{escape(name)}</h{level}>{inner}</section>',
    )


def _body(data: dict, level: int, prefix: str = "") -> list[Section]:
    """The sections of one report; a recipe's report holds one nested body per step."""
    op = data["operation"]
    figures = data.get("figures") or {}
    details = dict(data.get("details") or {})
    out: list[Section] = []
    if data.get("summary"):
        out.append(_section(f"{prefix}summary", "Summary", _kv_table(data["summary"]), level))
    out += _specific(op, data, details, figures, level, prefix)
    out += _tensor_sections(data, figures, level, prefix)
    if op == "run":
        out += _steps(details, figures, level, prefix)
    if details:
        out.append(_section(f"{prefix}details", "Details", _details(details), level))
    if data.get("notes"):
        notes = "".join(f"<li>{escape(str(n))}</li>" for n in data["notes"])
        out.append(_section(f"{prefix}notes", "Notes", f'<ul class="note">{notes}</ul>', level))
    provenance = _provenance(data.get("output")) if not prefix else ""
    if provenance:
        out.append(_section(f"{prefix}provenance", "Provenance", provenance, level))
    if data.get("timings"):
        items = [(k, float(v)) for k, v in data["timings"].items()]
        svg = charts.bars(items, label="seconds per phase", fmt=lambda v: f"{v:.2f} s")
        out.append(_section(f"{prefix}timings", "Timings", _figure(svg), level))
    return out


def _specific(op: str, data: dict, details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """Pictures that belong to one verb."""
    out: list[Section] = []
    for sections in (_inspect_sections, _quantize_sections, _prune_sections, _quality_section, _eval_sections):
        out += sections(op, data, details, figures, level, prefix)
    return out


def _inspect_sections(op: str, data: dict, details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """Composition by module type, layer and dtype; an adapter's facts and ranks."""
    rows = figures.get("tensors") or []
    out: list[Section] = []
    if op == "inspect" and rows:
        by_type: dict[str, int] = {}
        by_dtype: dict[str, int] = {}
        by_layer: dict[int, int] = {}
        for r in rows:
            by_type[module_type(r["name"])] = by_type.get(module_type(r["name"]), 0) + r["params"]
            by_dtype[r["dtype"]] = by_dtype.get(r["dtype"], 0) + r["bytes"]
            layer = layer_and_module(r["name"])[0]
            if layer is not None:
                by_layer[layer] = by_layer.get(layer, 0) + r["params"]
        html = "<h3>Parameters by module type</h3>" + _figure(
            charts.bars(sorted(by_type.items(), key=lambda kv: -kv[1]), label="parameters by module type")
        )
        if by_layer:
            layers = sorted(by_layer)
            html += "<h3>Parameters by layer</h3>" + _figure(
                charts.columns([str(i) for i in layers], [by_layer[i] for i in layers], label="parameters by layer")
            )
        html += "<h3>Bytes by dtype</h3>" + _figure(
            charts.bars(sorted(by_dtype.items(), key=lambda kv: -kv[1]), label="bytes by dtype", fmt=charts.fmt_bytes)
        )
        out.append(_section(f"{prefix}composition", "Composition", html, level))
        if "adapter" in details:
            html = _kv_table(details.pop("adapter")) + _adapter_ranks(rows)
            out.append(_section(f"{prefix}adapter", "Adapter", html, level))
    return out


def _quantize_sections(op: str, data: dict, details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """Bytes before and after, per module type."""
    out: list[Section] = []
    if op == "quantize" and data.get("tensors"):
        before: dict[str, int] = {}
        after: dict[str, int] = {}
        for r in data["tensors"]:
            kind = module_type(r["name"])
            before[kind] = before.get(kind, 0) + r["bytes_in"]
            after[kind] = after.get(kind, 0) + r["bytes_out"]
        s = data.get("summary", {})
        items = [("whole checkpoint", s.get("bytes_in", 0)), *sorted(before.items(), key=lambda kv: -kv[1])]
        second = [s.get("bytes_out", 0), *(after[k] for k, _ in items[1:])]
        svg = charts.bars(
            items, label="bytes before and after", fmt=charts.fmt_bytes, second=second, legend=("before", "after")
        )
        out.append(_section(f"{prefix}bytes", "Bytes before and after", _figure(svg), level))
    return out


def _prune_sections(op: str, data: dict, details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """Structured pruning: units kept and removed per layer."""
    out: list[Section] = []
    if op == "prune" and "kept" in details and isinstance(details["kept"], dict):
        from weightsmith.compress.prune.structured import parse_ranges

        kept = {k: len(parse_ranges(v)) for k, v in details.pop("kept").items()}
        total = data.get("summary", {}).get("units_before")
        labels = [k.removeprefix("layer ") for k in kept]
        html = "<h3>Units kept per layer</h3>" + _figure(
            charts.columns(labels, list(kept.values()), label="units kept per layer")
        )
        if isinstance(total, int):
            html += "<h3>Units removed per layer</h3>" + _figure(
                charts.columns(labels, [total - v for v in kept.values()], label="units removed per layer")
            )
        unit = "attention heads" if data.get("summary", {}).get("structured") == "heads" else "FFN neurons"
        out.append(_section(f"{prefix}structure", f"Structure: {unit}", html, level))
    return out


def _quality_section(op: str, data: dict, details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """A quality figure before and after."""
    out: list[Section] = []
    if "quality" in details and isinstance(details["quality"], dict):
        q = details.pop("quality")
        svg = charts.bars(
            [(str(q.get("metric", "quality")), float(q["before"]))],
            label="quality",
            second=[float(q["after"])],
            legend=("before", "after"),
        )
        note = f'<p class="muted">{escape(str(q.get("texts", "")))} texts</p>'
        out.append(_section(f"{prefix}quality", "Quality before and after", _figure(svg) + note, level))
    return out


def _eval_sections(op: str, data: dict, details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """Per-text perplexity, KL, cosine and tokens."""
    out: list[Section] = []
    texts = figures.get("texts") or []
    if op == "eval" and texts:
        html = ""
        if all("ref_perplexity" in t for t in texts if "perplexity" in t) and any("perplexity" in t for t in texts):
            pairs = [(f"text {i}", t) for i, t in enumerate(texts) if "perplexity" in t]
            html += "<h3>perplexity per text</h3>" + _figure(
                charts.bars(
                    [(n, float(t["perplexity"])) for n, t in pairs],
                    label="perplexity per text",
                    second=[float(t["ref_perplexity"]) for _, t in pairs],
                    legend=("model", "reference"),
                )
            )
            texts = [{k: v for k, v in t.items() if k not in ("perplexity", "ref_perplexity")} for t in texts]
        for key in ("perplexity", "kl_per_token", "embedding_cosine", "tokens"):
            values = [float(t[key]) for t in texts if key in t]
            if values:
                labels = [str(i) for i, t in enumerate(texts) if key in t]
                html += f"<h3>{escape(key.replace('_', ' '))} per text</h3>" + _figure(
                    charts.columns(labels, values, label=f"{key} per text")
                )
        out.append(_section(f"{prefix}per-text", "Per text", html, level))
    return out


def _adapter_ranks(rows: list[dict]) -> str:
    """The rank of every adapted module (the first dimension of its lora_A), per layer × module."""
    cells: dict[tuple[str, int], float] = {}
    loose: list[tuple[str, float]] = []
    for r in rows:
        if ".lora_A." in r["name"] and r.get("shape"):
            layer, module = layer_and_module(r["name"].split(".lora_A.")[0])
            if layer is None:
                loose.append((module, float(r["shape"][0])))
            else:
                cells[module, layer] = float(r["shape"][0])
    layers = sorted({layer for _, layer in cells})
    if len(layers) > 1:
        modules = sorted(dict.fromkeys(m for m, _ in cells), key=_module_order)
        svg = charts.heatmap(layers, modules, cells, label="rank per module", palette=charts.COOL)
    else:
        svg = charts.bars([*loose, *((f"{m} · layer {i}", v) for (m, i), v in cells.items())], label="rank")
    return "<h3>Rank per adapted module</h3>" + _figure(svg) if svg else ""


def _tensor_sections(data: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """A layer × module heat map per figure the rows carry, the tensors outside the blocks as bars, the table."""
    rows = [r for r in (figures.get("tensors") or data.get("tensors") or []) if _name(r)]
    out: list[Section] = []
    primary = None
    for key, title, palette, reverse in METRICS:
        title = TITLES.get((data["operation"], key), title)
        cells: dict[tuple[str, int], float] = {}
        loose: list[tuple[str, float]] = []
        for r in rows:
            v = r.get(key)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            layer, module = layer_and_module(_name(r))
            if layer is None:
                loose.append((_name(r), float(v)))
            else:
                cells[module, layer] = float(v)
        if not cells and not loose:
            continue
        primary = primary or (key, reverse)
        layers = sorted({layer for _, layer in cells})
        modules = sorted(dict.fromkeys(m for m, _ in cells), key=_module_order)
        html = ""
        if len(layers) > 1:
            html += _figure(charts.heatmap(layers, modules, cells, label=title, palette=palette, reverse=reverse))
        else:
            loose += [(f"{m} · layer {layer}", v) for (m, layer), v in cells.items()]
        if loose:
            loose.sort(key=lambda kv: kv[1], reverse=not reverse)
            shown = loose[:40]
            html += f"<h3>{'outside the blocks' if len(layers) > 1 else 'per tensor'}"
            html += f"{'' if len(loose) <= 40 else f' (the {len(shown)} largest of {len(loose)})'}</h3>"
            html += _figure(charts.bars(shown, label=title))
        out.append(_section(f"{prefix}m-{key}", title[0].upper() + title[1:], html, level))
    table_rows = list(rows)
    if primary and figures.get("tensors"):  # all rows were gathered: list the worst by the first figure
        key, reverse = primary
        table_rows = sorted(
            (r for r in rows if isinstance(r.get(key), (int, float))), key=lambda r: r[key], reverse=not reverse
        )
    tensors = table_rows or data.get("tensors") or []
    if tensors:
        first = tensors[:MAX_TABLE_ROWS]
        caption = f"the first {len(first)} of {len(tensors)} rows" if len(tensors) > len(first) else ""
        html = (f'<p class="muted">{caption}</p>' if caption else "") + _table(first)
        out.append(_section(f"{prefix}tensors", "Tensors", html, level))
    return out


def _steps(details: dict, figures: dict, level: int, prefix: str) -> list[Section]:
    """A recipe's steps, each drawn from its own report (or its summary, for a step streamed as a lazy view)."""
    out: list[Section] = []
    plan = details.pop("plan", None)
    if isinstance(plan, dict) and plan:
        out.append(_section(f"{prefix}plan", "Plan", _table(list(plan.values())), level))
    sub_reports = figures.get("steps") or {}
    for key in [k for k in details if re.match(r"step \d+ ", k)]:
        facts = details.pop(key)
        sid = f"{prefix}{key.replace(' ', '-')}"
        sub = sub_reports.get(key)
        if sub is None:
            inner = _kv_table(facts) if isinstance(facts, dict) else escape(str(facts))
            if isinstance(facts, dict) and "streamed" in facts:
                inner += (
                    '<p class="muted">streamed into the next step as a lazy view: nothing was written and this step '
                    "has no figures of its own</p>"
                )
        else:
            inner = "".join(html for _, _, html in _body(sub, level + 1, prefix=f"{sid}-"))
        out.append(_section(sid, key[0].upper() + key[1:], inner, level))
    return out


def _provenance(output: str | None) -> str:
    """The steps recorded in the output's safetensors metadata: operations, parameters, inputs and their digests."""
    if not output or not Path(output).exists():
        return ""
    try:
        from weightsmith.checkpoint import Checkpoint

        history = Checkpoint(output).history
    except (WeightsmithError, OSError, ValueError):
        return ""
    rows = []
    for i, step in enumerate(history):
        inputs = "<br>".join(
            f"<code>{escape(str(x.get('path')))}</code> <span class='muted'>sha256 "
            f"{escape(str(x.get('sha256') or '-')[:16])}…</span>"
            for x in step.get("inputs", [])
            if isinstance(x, dict)
        )
        params = escape(json.dumps(step.get("parameters", {}), default=str)[:600])
        rows.append(
            f"<tr><td>{i}</td><td>{escape(str(step.get('operation')))}</td><td><code>{params}</code></td>"
            f"<td>{inputs}</td></tr>"
        )
    if not rows:
        return ""
    head = "<tr><th>#</th><th>operation</th><th>parameters</th><th>inputs</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


# -- small HTML pieces ------------------------------------------------------------------------------------------


_TYPE_ORDER = {"attention": 0, "MLP": 1, "norm": 2}


def _module_order(module: str) -> tuple[int, str]:
    """Attention modules first, then the MLP, then norms, each group in name order (as the block computes)."""
    return _TYPE_ORDER.get(module_type(f"x.layers.0.{module}"), 3), module


def _name(row: dict) -> str:
    return str(row.get("name") or row.get("tensor") or row.get("module") or "")


def _figure(svg: str) -> str:
    return f'<div class="figure">{svg}</div>' if svg else ""


def _cell(value: Any) -> str:
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        return f'<td class="num">{escape(charts.fmt_number(value))}</td>'
    if isinstance(value, (list, tuple)):
        text = ", ".join(map(str, value[:12])) + (f", … ({len(value)} in all)" if len(value) > 12 else "")
        return f"<td>{escape(text) or '-'}</td>"
    if isinstance(value, dict):
        return f"<td><code>{escape(json.dumps(value, default=str)[:400])}</code></td>"
    return f"<td>{escape('-' if value is None else str(value))}</td>"


def _kv_table(mapping: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th>{_cell(v)}</tr>" for k, v in mapping.items())
    return f"<table><tbody>{rows}</tbody></table>"


def _table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _details(details: dict) -> str:
    """Whatever else the verb reported: mappings as tables, lists of rows as tables (a loss curve also drawn)."""
    html = ""
    for key, value in details.items():
        html += f"<h3>{escape(str(key))}</h3>"
        if isinstance(value, dict):
            html += _kv_table(value)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            numeric = [
                k for k in ("loss", "eval_loss", "cosine") if all(isinstance(v.get(k), (int, float)) for v in value)
            ]
            for k in numeric[:1]:
                labels = [str(v.get("step", i)) for i, v in enumerate(value)]
                html += _figure(charts.columns(labels, [float(v[k]) for v in value], label=f"{key}: {k}"))
            html += _table(value[:MAX_TABLE_ROWS])
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            finite = [float(v) for v in value if math.isfinite(float(v))]
            html += _figure(charts.columns([str(i) for i in range(len(finite))], finite, label=str(key)))
        else:
            html += f"<table><tbody><tr>{_cell(value)}</tr></tbody></table>"
    return html
