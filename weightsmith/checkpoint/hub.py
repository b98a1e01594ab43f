"""Hugging Face Hub ids as model references: ``org/name`` or ``org/name@revision`` (a branch, tag or commit) →
a local snapshot directory, through ``huggingface_hub``'s cache.

A reference that exists on disk is a path and is never looked up. Offline (``HF_HUB_OFFLINE=1``) a Hub id resolves
from the local cache only (``HF_HUB_CACHE``/``HF_HOME``), and one that is not there fails at once with one line.
Online only the files a merge needs are downloaded: configs and tokenizer files, and the weights in one format
(safetensors when the repository has them, else ``pytorch_model*.bin``).

    >>> locate("./merged")  # a path: unchanged  # doctest: +SKIP
    './merged'
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from weightsmith.errors import CheckpointError

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # the Hub's repo-id shape
_META = ["*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # configs, tokenizers, chat templates


def split_revision(ref: str) -> tuple[str, str | None]:
    """``org/name@rev`` → (``org/name``, ``rev``); a reference without ``@`` has no revision."""
    repo, sep, revision = ref.partition("@")
    return (repo, revision) if sep and revision else (ref, None)


def is_hub_id(ref: str) -> bool:
    """True for a reference that is not a path on disk and has the shape of a Hub id (with an optional revision)."""
    return not Path(ref).exists() and bool(_REPO.match(split_revision(ref)[0]))


def locate(ref: str) -> str:
    """A local path for ``ref``: the path itself, or the cached (downloaded when online) snapshot of a Hub id."""
    if Path(ref).exists() or not is_hub_id(ref):
        return ref
    repo, revision = split_revision(ref)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    where = f"{ref}: Hub id"
    try:
        if offline:
            return snapshot_download(repo, revision=revision, cache_dir=_cache_dir(), local_files_only=True)
        patterns = [*_META, *_weights(repo, revision)]
        return snapshot_download(repo, revision=revision, cache_dir=_cache_dir(), allow_patterns=patterns)
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: revision {revision!r} not found") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such model on the Hub (or it is private or gated)") from None
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(
                f"{where}: not in the local cache ({_cache_dir()}) and HF_HUB_OFFLINE is set: "
                f"download it first (hf download {repo}{f' --revision {revision}' if revision else ''}) "
                "or give a local path"
            ) from None
        raise CheckpointError(f"{where}: not in the local cache and the Hub cannot be reached") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{where}: the Hub answered {str(exc).splitlines()[0]}") from None


def _weights(repo: str, revision: str | None) -> list[str]:
    """The weight files to fetch: safetensors when the repository has them, else the PyTorch ``.bin`` files."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo, revision=revision)
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors"]
    return ["*.bin"]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> str:
    """The Hub cache as the environment names it now (``HF_HUB_CACHE``, else ``HF_HOME/hub``), else the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
