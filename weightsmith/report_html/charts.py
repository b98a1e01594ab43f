"""Inline SVG charts for the HTML report: a layer × module heat map, horizontal bars, per-layer columns.

Pure functions from numbers to SVG text: no scripts, no fonts to fetch, no plotting library. Every mark carries a
``<title>`` with its exact value (the browser shows it on hover), so a picture never hides a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from html import escape

# Sequential palettes, light (small) to dark (large): yellow-orange-red for "how much changed / how wrong", blues
# for quantities that are neither good nor bad (parameters, bytes, kept fractions). Both stay readable in grey.
WARM = ("#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026")
COOL = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
BAR = "#4292c6"
BAR_AFTER = "#fd8d3c"
CHAR_W = 6.6  # average width of a 11px sans-serif character, for laying out labels without measuring text

Format = Callable[[float], str]


def fmt_number(value: float) -> str:
    """Four significant figures, thousands grouped for large integers."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) >= 1000):
        return f"{int(value):,}"
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e6 else f"{value:.3e}"


def fmt_bytes(value: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def colour(t: float, palette: Sequence[str]) -> str:
    """The palette's colour at t ∈ [0, 1], interpolated linearly in RGB between its stops."""
    t = min(1.0, max(0.0, t)) * (len(palette) - 1)
    i = min(int(t), len(palette) - 2)
    a, b = _rgb(palette[i]), _rgb(palette[i + 1])
    f = t - i
    return "#" + "".join(f"{round(x + (y - x) * f):02x}" for x, y in zip(a, b))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def _scale(values: Sequence[float]) -> Callable[[float], float]:
    """Value → [0, 1] over the data's range; a log scale when every value is positive and they span more than
    three decades (relative changes often do: a fold touches a few modules a lot and the rest not at all)."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if lo > 0 and hi / lo > 1e3:
        llo, lhi = math.log10(lo), math.log10(hi)
        return lambda v: (math.log10(v) - llo) / (lhi - llo) if v > 0 else 0.0
    span = hi - lo
    return (lambda v: (v - lo) / span) if span > 0 else (lambda v: 0.5)


def heatmap(
    layers: Sequence[int],
    modules: Sequence[str],
    cells: dict[tuple[str, int], float],
    *,
    label: str,
    fmt: Format = fmt_number,
    palette: Sequence[str] = WARM,
    reverse: bool = False,
) -> str:
    """Modules down, layers across, one coloured cell per tensor; a last row holds each layer's mean.

    ``reverse`` darkens small values instead (cosine: the lower, the more a tensor moved)."""
    if not cells:
        return ""
    rows = [*modules, "layer mean"]
    means: dict[tuple[str, int], float] = {}
    for layer in layers:
        vals = [cells[m, layer] for m in modules if (m, layer) in cells and math.isfinite(cells[m, layer])]
        if vals:
            means["layer mean", layer] = sum(vals) / len(vals)
    values = {**cells, **means}
    scale = _scale(list(values.values()))
    cw = max(12.0, min(40.0, 760.0 / max(1, len(layers))))
    ch = 16.0
    left = 10 + CHAR_W * max(len(r) for r in rows)
    top = 22.0
    width = max(left + cw * len(layers) + 10, left + 18 * len(palette) + 60)  # room for the legend
    height = top + ch * len(rows) + 4 + 46
    out = [_svg_open(width, height, label)]
    step = max(1, math.ceil(len(layers) * 24 / (cw * len(layers))))  # layer numbers no closer than 24px
    for j, layer in enumerate(layers):
        if j % step == 0:
            out.append(f'<text x="{left + cw * (j + 0.5):.1f}" y="{top - 6}" text-anchor="middle">{layer}</text>')
    for i, row in enumerate(rows):
        y = top + ch * i + (4 if row == "layer mean" else 0)
        out.append(f'<text x="{left - 6:.1f}" y="{y + ch - 4:.1f}" text-anchor="end">{escape(row)}</text>')
        for j, layer in enumerate(layers):
            v = values.get((row, layer))
            if v is None:
                continue
            t = scale(v) if math.isfinite(v) else 1.0
            fill = colour(1 - t if reverse else t, palette)
            out.append(
                f'<rect x="{left + cw * j:.1f}" y="{y:.1f}" width="{cw - 1:.1f}" height="{ch - 1:.1f}" '
                f'fill="{fill}"><title>{escape(row)} · layer {layer}: {escape(fmt(v))}</title></rect>'
            )
    finite = [v for v in values.values() if math.isfinite(v)]
    out.append(_legend(left, top + ch * len(rows) + 14, min(finite), max(finite), fmt, palette, reverse))
    out.append("</svg>")
    return "".join(out)


def _legend(x: float, y: float, lo: float, hi: float, fmt: Format, palette: Sequence[str], reverse: bool) -> str:
    stops = list(reversed(palette)) if reverse else list(palette)
    n = len(stops)
    parts = [f'<rect x="{x + 18 * k:.1f}" y="{y:.1f}" width="18" height="10" fill="{c}"/>' for k, c in enumerate(stops)]
    parts.append(f'<text x="{x:.1f}" y="{y + 24:.1f}">{escape(fmt(lo))}</text>')
    parts.append(f'<text x="{x + 18 * n:.1f}" y="{y + 24:.1f}" text-anchor="end">{escape(fmt(hi))}</text>')
    return "".join(parts)


def bars(
    items: Sequence[tuple[str, float]],
    *,
    label: str,
    fmt: Format = fmt_number,
    second: Sequence[float] | None = None,
    legend: tuple[str, str] | None = None,
) -> str:
    """Horizontal bars, one per (name, value), longest scaled to the width; ``second`` draws a pair per name
    (before and after)."""
    if not items:
        return ""
    top = 18.0 if legend else 0.0
    per = 26.0 if second is not None else 16.0
    left = 10 + CHAR_W * min(48, max(len(n) for n, _ in items))
    span = 420.0
    hi = max([abs(v) for _, v in items] + [abs(v) for v in second or []] + [1e-300])
    width = left + span + 90
    out = [_svg_open(width, top + per * len(items) + 4, label)]
    if legend:
        for k, (name, fill) in enumerate(zip(legend, (BAR, BAR_AFTER))):
            out.append(f'<rect x="{left + 150 * k}" y="2" width="10" height="10" fill="{fill}"/>')
            out.append(f'<text x="{left + 150 * k + 14}" y="11">{escape(name)}</text>')
    for i, (name, value) in enumerate(items):
        y = top + per * i
        shown = name if len(name) <= 48 else "…" + name[-47:]
        out.append(f'<text x="{left - 6:.1f}" y="{y + 11:.1f}" text-anchor="end">{escape(shown)}</text>')
        pairs = [(value, BAR, y)] + ([(second[i], BAR_AFTER, y + 11)] if second is not None else [])
        for v, fill, yy in pairs:
            w = max(1.0, span * abs(v) / hi) if v else 0.0
            out.append(
                f'<rect x="{left:.1f}" y="{yy:.1f}" width="{w:.1f}" height="10" fill="{fill}">'
                f"<title>{escape(name)}: {escape(fmt(v))}</title></rect>"
                f'<text x="{left + w + 4:.1f}" y="{yy + 9:.1f}">{escape(fmt(v))}</text>'
            )
    out.append("</svg>")
    return "".join(out)


def columns(labels: Sequence[str], values: Sequence[float], *, label: str, fmt: Format = fmt_number) -> str:
    """Vertical bars over an ordered axis (layers, texts), with the axis' first and last labels and the maximum."""
    if not values:
        return ""
    height, top, left = 120.0, 14.0, 64.0
    cw = max(3.0, min(28.0, 760.0 / len(values)))
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = min(0.0, *finite), max(0.0, *finite)
    span = (hi - lo) or 1.0
    zero = top + height * hi / span
    out = [_svg_open(left + cw * len(values) + 10, top + height + 20, label)]
    out.append(f'<text x="{left - 6}" y="{top + 4}" text-anchor="end">{escape(fmt(hi))}</text>')
    out.append(f'<text x="{left - 6}" y="{top + height}" text-anchor="end">{escape(fmt(lo))}</text>')
    out.append(f'<line x1="{left}" y1="{zero:.1f}" x2="{left + cw * len(values)}" y2="{zero:.1f}" stroke="#999"/>')
    for j, (name, v) in enumerate(zip(labels, values)):
        if not math.isfinite(v):
            continue
        h = height * abs(v) / span
        y = zero - h if v >= 0 else zero
        out.append(
            f'<rect x="{left + cw * j:.1f}" y="{y:.1f}" width="{max(1.0, cw - 1):.1f}" height="{max(h, 0.5):.1f}" '
            f'fill="{BAR}"><title>{escape(name)}: {escape(fmt(v))}</title></rect>'
        )
    step = max(1, math.ceil(24 / cw))
    for j, name in enumerate(labels):
        if j % step == 0:
            out.append(
                f'<text x="{left + cw * (j + 0.5):.1f}" y="{top + height + 14}" text-anchor="middle">'
                f"{escape(name)}</text>"
            )
    out.append("</svg>")
    return "".join(out)


def _svg_open(width: float, height: float, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(label)}">'
    )
