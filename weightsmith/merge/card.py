"""The model card (``README.md``) written with every merge, following the Hub's model-card conventions: YAML front
matter (``base_model`` lists the Hub models merged, ``library_name``, ``tags``), then the method with its paper, the
models with the revisions that were read, the configuration as given, and weightsmith's version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from weightsmith.checkpoint.hub import is_hub_id, split_revision
from weightsmith.merge.config import MergeConfig
from weightsmith.merge.table import METHODS


def revision_of(local: str) -> str | None:
    """The commit a Hub snapshot directory holds (``…/snapshots/<commit>``), or None for other paths."""
    path = Path(local)
    return path.name if path.parent.name == "snapshots" else None


def model_card(cfg: MergeConfig, models: Sequence[str], located: Mapping[str, str], version: str, title: str) -> str:
    """README.md text for a merge of ``models`` (references as the config gives them; ``located`` maps each to the
    directory that was read)."""
    hub_ids = [split_revision(m)[0] for m in models if is_hub_id(m)]
    front = {"base_model": list(dict.fromkeys(hub_ids)) or None, "library_name": "transformers"}
    front = {k: v for k, v in front.items() if v is not None}
    front["tags"] = ["merge", "weightsmith", cfg.method]
    row = METHODS[cfg.method]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"A merge of pre-trained language models made with weightsmith {version}.",
        "",
        "## Merge method",
        "",
        f"`{cfg.method}` ({row.paper})." if row.paper else f"`{cfg.method}`.",
    ]
    if cfg.base is not None:
        lines += ["", f"Base model: `{cfg.base.path}`."]
    lines += ["", "## Models merged", ""]
    for m in models:
        commit = revision_of(located.get(m, m))
        lines.append(f"- `{m}`" + (f" (revision `{commit}`)" if commit else ""))
    config = {k: v for k, v in cfg.to_dict().items() if v not in (None, {}, [])}
    lines += [
        "",
        "## Configuration",
        "",
        "```yaml",
        yaml.safe_dump(config, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
