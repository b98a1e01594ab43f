"""Multi-stage merges, as mergekit-multi writes them: one YAML file of several merge configs (documents separated
by ``---``), each named by a ``name`` key, later ones using earlier ones' names as models. Run as one job: the
stages in dependency order, each named stage into a work directory beside the output, removed at the end (also on
error), the final stage — the one without a name, else the last document — into the output.

    name: chat-math
    merge_method: linear
    models: [{model: org/chat, parameters: {weight: 0.5}}, {model: org/math, parameters: {weight: 0.5}}]
    ---
    merge_method: slerp
    base_model: chat-math
    models: [{model: chat-math}, {model: org/code}]
    parameters: {t: 0.3}
"""

from __future__ import annotations

import copy
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightsmith.errors import ConfigError
from weightsmith.yamltext import parse_documents, read_text

if TYPE_CHECKING:
    from weightsmith.report import Report


def stages_in(source: Any) -> list[tuple[str | None, dict]] | None:
    """The stages of a multi-document YAML file or text (None for an ordinary single config)."""
    if isinstance(source, Mapping):
        return None
    text, where = None, "config"
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        text, where = read_text(Path(source)), str(source)
    elif isinstance(source, str) and "\n" in source:
        text = source
    if text is None or "\n---" not in "\n" + text.lstrip():
        return None
    docs = parse_documents(text, where)
    if len(docs) < 2:
        return None
    stages: list[tuple[str | None, dict]] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: document {i + 1} is not a merge config mapping")
        doc = dict(doc)
        name = doc.pop("name", None)
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}: document {i + 1}: name must be a string, got {name!r}")
        if name in (n for n, _ in stages):
            raise ConfigError(
                f"{where}: two stages are named {name!r}" if name else f"{where}: more than one unnamed final merge"
            )
        stages.append((name, doc))
    return stages


def _references(doc: dict) -> list[str]:
    refs = [doc.get("base_model")] + [m.get("model") for m in doc.get("models") or [] if isinstance(m, dict)]
    for sl in doc.get("slices") or []:
        refs += [sl.get("base_model")] + [s.get("model") for s in sl.get("sources") or [] if isinstance(s, dict)]
    return [r for r in refs if isinstance(r, str)]


def _patched(doc: dict, paths: Mapping[str, str]) -> dict:
    """A stage's config with earlier stages' names (also as ``name+adapter``) replaced by their directories."""

    def swap(ref: Any) -> Any:
        if not isinstance(ref, str):
            return ref
        head, plus, tail = ref.partition("+")
        return paths[head] + plus + tail if head in paths else ref

    doc = copy.deepcopy(doc)
    for key in ("base_model", "tokenizer_source"):
        doc[key] = swap(doc.get(key)) if key in doc else None
    for m in doc.get("models") or []:
        if isinstance(m, dict):
            m["model"] = swap(m.get("model"))
    for sl in doc.get("slices") or []:
        if isinstance(sl, dict):
            if "base_model" in sl:
                sl["base_model"] = swap(sl["base_model"])
            for s in sl.get("sources") or []:
                if isinstance(s, dict):
                    s["model"] = swap(s.get("model"))
    return {k: v for k, v in doc.items() if v is not None or k not in ("base_model", "tokenizer_source")}


def order(stages: list[tuple[str | None, dict]], where: str = "config") -> list[tuple[str | None, dict]]:
    """The stages the final one needs, in dependency order; a cycle is refused naming its stages."""
    by_name = dict(stages)
    final = next((s for s in stages if s[0] is None), stages[-1])
    done: list[str | None] = []
    visiting: list[str | None] = []

    def visit(name: str | None) -> None:
        if name in done:
            return
        if name in visiting:
            cycle = " -> ".join(str(n) for n in visiting[visiting.index(name) :] + [name])
            raise ConfigError(f"{where}: the stages depend on each other in a cycle ({cycle})")
        visiting.append(name)
        for ref in _references(by_name[name]):
            head = ref.partition("+")[0]
            if head in by_name and head is not None:
                visit(head)
        visiting.pop()
        done.append(name)

    visit(final[0])
    return [(n, by_name[n]) for n in done]


def run_stages(stages: list[tuple[str | None, dict]], out: str | os.PathLike, **options: Any) -> Report:
    """Run every stage the final one needs; named stages go to a work directory removed at the end."""
    from weightsmith.checkpoint.writer import check_destination
    from weightsmith.merge.config import load_config
    from weightsmith.merge.engine import run as run_one

    out = Path(out)
    plan = order(stages)
    check_destination(out, bool(options.get("force")))
    for _, doc in plan:  # every stage validates before anything runs (stage names stand in for models)
        load_config(_patched(doc, {n: f"./{n}" for n, _ in stages if n is not None}))
    work = out.parent / f".{out.name}.weightsmith-stages-{uuid.uuid4().hex[:8]}"
    paths: dict[str, str] = {}
    try:
        report = None
        for name, doc in plan:
            is_final = name == plan[-1][0]
            target = out if is_final else work / str(name)
            report = run_one(_patched(doc, paths), target, **(options if is_final else {**options, "force": False}))
            if not is_final:
                paths[str(name)] = str(target)
        assert report is not None
        report.summary["stages"] = [n or "final" for n, _ in plan]
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)
