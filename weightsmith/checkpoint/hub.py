"""Hugging Face Hub ids as model references: ``org/name`` or ``org/name@revision`` (a branch, tag or commit) →
a local snapshot directory, through ``huggingface_hub``'s cache.

A reference that exists on disk is a path and is never looked up. Offline (``HF_HUB_OFFLINE=1``) a Hub id resolves
from the local cache only (``HF_HUB_CACHE``/``HF_HOME``), and one that is not there fails at once with one line.
Online only the files a merge needs are downloaded: configs and tokenizer files, and the weights in one format
(safetensors when the repository has them, else ``pytorch_model*.bin``).

``open_headers`` goes further for safetensors repositories: it fetches the configs, the index and the tokenizer
files, reads every shard's header (remotely through ``get_safetensors_metadata``; offline from the cached files)
and returns a ``HubHeaders`` that knows every tensor's name, shape and dtype without any weight. A merge checks its
inputs against it, then ``HubHeaders.download(names)`` fetches only the shards holding the tensors it reads.

    >>> locate("./merged")  # a path: unchanged  # doctest: +SKIP
    './merged'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from weightsmith.checkpoint.files import ST_DTYPES, SafetensorsFile, TensorInfo
from weightsmith.checkpoint.reader import Checkpoint, TensorSource, _check_config, _read_json
from weightsmith.errors import CheckpointError

if TYPE_CHECKING:
    import torch

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

    with _hub_errors(ref, revision):
        if _offline():
            return snapshot_download(repo, revision=revision, cache_dir=_cache_dir(), local_files_only=True)
        patterns = [*_META, *_weights(repo, revision)]
        return snapshot_download(repo, revision=revision, cache_dir=_cache_dir(), allow_patterns=patterns)
    raise AssertionError("unreachable")  # _hub_errors re-raises every failure as a CheckpointError


@contextmanager
def _hub_errors(ref: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's failures as one-line CheckpointErrors naming the reference."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{ref}: Hub id"
    try:
        yield
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: revision {revision!r} not found") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{where}: no such model on the Hub (or it is private or gated)") from None
    except LocalEntryNotFoundError:
        if _offline():
            repo = split_revision(ref)[0]
            raise CheckpointError(
                f"{where}: not in the local cache ({_cache_dir()}) and HF_HUB_OFFLINE is set: "
                f"download it first (hf download {repo}{f' --revision {revision}' if revision else ''}) "
                "or give a local path"
            ) from None
        raise CheckpointError(f"{where}: not in the local cache and the Hub cannot be reached") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{where}: the Hub answered {str(exc).splitlines()[0]}") from None


class HubHeaders(Mapping[str, "torch.Tensor"]):
    """A Hub model's tensors as its safetensors headers describe them (names, shapes, dtypes), with its config and
    tokenizer files downloaded into ``path`` and no weight: ``ckpt.info(name)`` works, ``ckpt[name]`` refuses.
    ``download(names)`` fetches the shards holding ``names`` and returns the ``TensorSource`` over them."""

    def __init__(self, ref: str, root: Path, infos: dict[str, TensorInfo], sharded: bool):
        self.ref, self.path, self.root, self._infos, self._sharded = ref, root, root, infos, sharded
        config = root / "config.json"
        self.config = _check_config(config, _read_json(config)) if config.is_file() else None
        self.adapter_config = None
        self.carry_files: list[Path] = []  # known once downloaded

    def __getitem__(self, name: str) -> torch.Tensor:
        raise CheckpointError(f"{self.ref}: tensor {name!r}: the weights are not downloaded yet")

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    @property
    def is_adapter(self) -> bool:
        return False

    def download(self, names: Iterable[str]) -> TensorSource:
        """The checkpoint over the shards holding ``names`` (each fetched once; the others never)."""
        files = sorted({self._infos[n].file for n in names if n in self._infos})
        repo, revision = split_revision(self.ref)
        with _hub_errors(self.ref, revision):
            for f in files:
                _fetch(repo, f, revision)
        return Checkpoint(self.root, shards=files) if self._sharded else Checkpoint(self.root)


def open_headers(ref: str) -> HubHeaders | None:
    """The ``HubHeaders`` of a Hub id whose weights are ``model.safetensors`` or sharded safetensors with their index;
    None for a path, an adapter, or a repository with other weights (``.bin``: ``locate`` then downloads them whole).
    Downloads the configs, the index and the tokenizer files only."""
    if Path(ref).exists() or not is_hub_id(ref):
        return None
    repo, revision = split_revision(ref)
    with _hub_errors(ref, revision):
        files = _repo_files(repo, revision)
        sharded = "model.safetensors.index.json" in files
        if "adapter_config.json" in files or not (sharded or "model.safetensors" in files):
            return None  # an adapter, or weights under other names: opened (and refused) as before
        meta = [f for f in files if "/" not in f and any(fnmatch(f, p) for p in _META)]
        root = Path(_fetch(repo, meta[0], revision)).parent if meta else None
        for f in meta[1:]:
            _fetch(repo, f, revision)
        if root is None:
            raise CheckpointError(f"{ref}: Hub id: no config.json or index beside its weights")
        infos = _headers(repo, revision, _index_files(root) if sharded else ["model.safetensors"], root)
    return HubHeaders(ref, root, infos, sharded)


def _repo_files(repo: str, revision: str | None) -> list[str]:
    """The repository's file names: asked of the Hub online, listed from the cached snapshot offline."""
    if not _offline():
        from huggingface_hub import list_repo_files

        return list_repo_files(repo, revision=revision)
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import LocalEntryNotFoundError

    config = try_to_load_from_cache(repo, "config.json", cache_dir=_cache_dir(), revision=revision)
    if not isinstance(config, str):
        raise LocalEntryNotFoundError(f"{repo}: config.json is not in the cache")
    snapshot = Path(config).parent
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def _fetch(repo: str, filename: str, revision: str | None) -> str:
    """One file of the repository, from the cache or downloaded."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename, revision=revision, cache_dir=_cache_dir(), local_files_only=_offline())


def _index_files(root: Path) -> list[str]:
    index = _read_json(root / "model.safetensors.index.json")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{root / 'model.safetensors.index.json'}: no weight_map")
    return sorted(set(map(str, weight_map.values())))


def _headers(repo: str, revision: str | None, files: list[str], root: Path) -> dict[str, TensorInfo]:
    """Every tensor of ``files`` as their safetensors headers describe it: read remotely online (no weight is
    downloaded), from the cached files offline."""
    infos: dict[str, TensorInfo] = {}
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        for f in files:
            cached = try_to_load_from_cache(repo, f, cache_dir=_cache_dir(), revision=revision)
            if not isinstance(cached, str):
                raise CheckpointError(f"{repo}: Hub id: {f} is not in the local cache and HF_HUB_OFFLINE is set")
            for name, (info, _, _) in SafetensorsFile(Path(cached), f).entries.items():
                infos[name] = info
        return infos
    from huggingface_hub import get_safetensors_metadata

    meta = get_safetensors_metadata(repo, revision=revision)
    for f, header in meta.files_metadata.items():
        if f not in files:
            continue  # another file's header (a consolidated copy of the weights)
        for name, t in header.tensors.items():
            if t.dtype not in ST_DTYPES:
                raise CheckpointError(f"{repo}/{f}: tensor {name!r} has the unsupported dtype {t.dtype!r}")
            infos[name] = TensorInfo(name, tuple(t.shape), ST_DTYPES[t.dtype], f)
    return infos


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
