"""The report every operation returns: headline figures, per-tensor rows, notes and timings.

People read ``to_text()``; pipelines read ``to_json()`` (the CLI's ``--json``); ``weightsmith.report_html`` draws it.
Figures that only pictures need (a row for every tensor where the text shows the worst few, norms that cost an extra
pass) are gathered only inside ``collecting_figures()``, into ``Report.figures``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Report:
    operation: str
    output: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)  # headline figures, printed first
    tensors: list[dict[str, Any]] = field(default_factory=list)  # per-tensor rows (or the worst few)
    details: dict[str, Any] = field(default_factory=dict)  # structured extras (adapter facts, plans, sub-reports)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds
    # per-tensor and per-layer figures for the HTML report; empty unless gathered inside collecting_figures()
    figures: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = round(self.timings.get(phase, 0.0) + time.perf_counter() - start, 4)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.figures:
            del out["figures"]  # the JSON of a plain run is unchanged
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_text(self, max_rows: int = 40) -> str:
        lines = [f"{self.operation}" + (f" → {self.output}" if self.output else "")]
        lines += [f"  {key}: {_fmt(value)}" for key, value in self.summary.items()]
        for key, value in self.details.items():
            if isinstance(value, dict):
                lines.append(f"  {key}:")
                lines += [f"    {k}: {_fmt(v)}" for k, v in value.items()]
            else:
                lines.append(f"  {key}: {_fmt(value)}")
        if self.tensors:
            lines += ["", *_table(self.tensors[:max_rows])]
            if len(self.tensors) > max_rows:
                lines.append(f"… {len(self.tensors) - max_rows} more rows (the JSON report has all)")
        if self.notes:
            lines += ["", *[f"note: {n}" for n in self.notes]]
        if self.timings:
            lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items()))
        return "\n".join(lines)


_FIGURES: ContextVar[bool] = ContextVar("weightsmith_figures", default=False)


def figures_requested() -> bool:
    """Whether the running verb should gather ``Report.figures`` (read it once, in the verb's own thread: worker
    threads do not inherit the setting)."""
    return _FIGURES.get()


@contextmanager
def collecting_figures() -> Iterator[None]:
    """Verbs called inside gather the per-tensor figures an HTML report draws (``Report.figures``).

    >>> with collecting_figures():  # doctest: +SKIP
    ...     report = ws.merge.run("ties.yaml", "merged/")
    >>> weightsmith.report_html.write_html(report, "merged.html")  # doctest: +SKIP
    """
    token = _FIGURES.set(True)
    try:
        yield
    finally:
        _FIGURES.reset(token)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value) if value else "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) if value else "-"
    return "-" if value is None else str(value)


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*columns), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in cells)]
