"""Merging models whose vocabularies differ, as mergekit's ``tokenizer_source``/``tokenizer:`` define it: build
the output tokenizer, then re-index every token-indexed tensor (input embeddings, output head) of every model by
token string into the output vocabulary before the method merges them.

Output vocabulary: ``base`` — the base model's tokenizer (the first model's without a base); ``<model>`` — that
model's; ``union`` — the base tokenizer, then every other token of the models (tokens at or beyond a model's
``vocab_size`` ignored) added in model order and, within a model, by token id, plain tokens first and special
(added) tokens after. (mergekit adds them in the iteration order of the tokenizer's vocabulary dict, which is not
stable across processes: its ids for the added tokens can differ, the row of every token string is the same.)

A token a model lacks takes, in every model: the configured ``tokens:`` source if any; else the row of the one model
that has it; else the base model's row when the base has it; else the mean of the rows of the models that have it
(a token no model has gets zeros). ``force: true`` uses the configured source even in models that have the token.
Rows added by ``pad_to_multiple_of`` take the mean of the real rows. Building the tokenizers needs transformers,
which is imported here only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightsmith.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where rows are moved, so that configs validate without it
    from torch import Tensor

# Tensors indexed by token along dim 0 (input embeddings and output heads, as transformers names them).
_VOCAB_TENSORS = (
    "embed_tokens.weight",
    "lm_head.weight",
    "wte.weight",
    "embed_in.weight",
    "embed_out.weight",
    "word_embeddings.weight",
)
# Files of a tokenizer (not carried from an input when the merge writes its own tokenizer).
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "vocab.", "merges.txt", "added_tokens", "spiece", "chat_template")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(_VOCAB_TENSORS)


@dataclass(frozen=True)
class TokenSource:
    """Where a token's row comes from: a model (its row of the token, or of ``token``/``token_id``) or zeros."""

    model: str | None  # None: zeros
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSpec:
    """mergekit's ``tokenizer:`` section (``tokenizer_source: X`` is ``tokenizer: {source: X}``)."""

    source: str  # "union" | "base" | a model reference
    tokens: Mapping[str, TokenSource] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


def parse_tokenizer(raw: Any, models: Sequence[str], where: str) -> TokenizerSpec:
    """Validate a ``tokenizer:`` section against the models the config references."""
    if not isinstance(raw, dict) or set(raw) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ConfigError(f"{where}: 'tokenizer' takes source, tokens and pad_to_multiple_of")
    source = check_source(raw.get("source", "union"), models, where, "tokenizer.source")
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(f"{where}: tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = {}
    for tok, entry in (raw.get("tokens") or {}).items():
        at = f"{where}: tokenizer.tokens[{tok!r}]"
        if not isinstance(entry, dict) or set(entry) - {"source", "force"}:
            raise ConfigError(f"{at}: expected {{source: MODEL | {{kind: zero}} | {{kind: model_token, …}}, force}}")
        src, force = entry.get("source"), bool(entry.get("force", False))
        if isinstance(src, str):
            tokens[tok] = TokenSource(check_source(src, models, at, "source", plain=True), force=force)
        elif isinstance(src, dict) and src.get("kind") == "zero":
            tokens[tok] = TokenSource(None, force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            model = check_source(str(src.get("model")), models, at, "source.model", plain=True)
            if (src.get("token") is None) == (src.get("token_id") is None):
                raise ConfigError(f"{at}: a model_token source takes exactly one of token and token_id")
            tokens[tok] = TokenSource(model, src.get("token"), src.get("token_id"), force)
        else:
            raise ConfigError(f"{at}: unknown source {src!r}")
    return TokenizerSpec(source, tokens, pad)


def check_source(value: Any, models: Sequence[str], where: str, key: str, plain: bool = False) -> str:
    """``union``, ``base`` or one of the models; anything else is refused naming the key and the choices."""
    if not plain and value in ("union", "base"):
        return value
    if isinstance(value, str) and value in models:
        return value
    choices = ("" if plain else "union, base, or ") + "one of the models: " + ", ".join(models)
    raise ConfigError(f"{where}: {key} {value!r} is not a known tokenizer source (use {choices})")


@dataclass
class Vocabulary:
    """The output tokenizer and, per model, the source row of every output token (−1: the model lacks it)."""

    tokenizer: Any
    vocab: dict[str, int]
    size: int  # rows in the output (padded)
    rows: dict[str, Tensor]  # model → (len(vocab),) int64
    original: dict[str, dict[str, int]]
    spec: TokenizerSpec
    base: str

    def permute(self, pairs: Sequence[tuple[str, Tensor]]) -> list[Tensor]:
        """Each (model, token-indexed tensor) re-indexed into the output vocabulary (tokens along dim 0)."""
        import torch

        models = [m for m, _ in pairs]
        tensors = [t for _, t in pairs]
        present = [self.rows[m] >= 0 for m in models]
        n = len(self.vocab)
        forced = torch.zeros(n, dtype=torch.bool)
        for tok, src in self.spec.tokens.items():
            if src.force and tok in self.vocab:
                forced[self.vocab[tok]] = True
        needs = forced.clone()
        for p in present:
            needs |= ~p
        like = tensors[0]
        defaults = {i: self._default(i, models, tensors, present, like) for i in needs.nonzero()[:, 0].tolist()}
        out = []
        for m, t, p in zip(models, tensors, present):
            new = torch.zeros((self.size, *like.shape[1:]), dtype=like.dtype)
            take = p & ~forced
            new[:n][take] = t[self.rows[m][take]]
            for token_id, row in defaults.items():
                if not take[token_id]:
                    new[token_id] = row
            if self.size > n:  # padding rows: the mean of the real ones
                new[n:] = new[:n].mean(dim=0)
            out.append(new)
        return out

    def _default(
        self, token_id: int, models: list[str], tensors: list[Tensor], present: list[Tensor], like: Tensor
    ) -> Tensor:
        """The row every model lacking ``token_id`` (or forced) gets: mergekit's rule (see the module)."""
        import torch

        token = self._token(token_id)
        configured = self.spec.tokens.get(token)
        holders = [k for k in range(len(models)) if bool(present[k][token_id])]
        if configured is None:
            base_holds = [k for k in holders if models[k] == self.base]
            if len(holders) == 1:
                configured = TokenSource(models[holders[0]])
            elif not holders:
                configured = TokenSource(None)
            elif base_holds:
                configured = TokenSource(self.base)
            else:
                total = torch.zeros(like.shape[1:], dtype=like.dtype)
                for k in holders:
                    total = total + tensors[k][int(self.rows[models[k]][token_id])]
                return total / len(holders)
        if configured.model is None:
            return torch.zeros(like.shape[1:], dtype=like.dtype)
        if configured.model not in models:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: model {configured.model} is not an input of this tensor")
        k = models.index(configured.model)
        if configured.token is not None or configured.token_id is not None:
            idx = configured.token_id
            if idx is None:
                if configured.token not in self.original[configured.model]:
                    raise ConfigError(
                        f"tokenizer.tokens[{token!r}]: {configured.model} has no token {configured.token!r}"
                    )
                idx = self.original[configured.model][configured.token]
            return tensors[k][idx]
        idx = int(self.rows[configured.model][token_id])
        if idx < 0:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: {configured.model} has no such token")
        return tensors[k][idx]

    def _token(self, token_id: int) -> str:
        if not hasattr(self, "_by_id"):
            self._by_id = {i: t for t, i in self.vocab.items()}
        return self._by_id[token_id]

    def files(self) -> dict[str, bytes]:
        """The output tokenizer's files, as ``save_pretrained`` writes them."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def build(
    spec: TokenizerSpec,
    base: str,
    models: Sequence[str],
    dirs: Mapping[str, str],
    vocab_sizes: Mapping[str, int | None],
) -> Vocabulary:
    """The output tokenizer and the row maps. ``models`` are references (base first), ``dirs`` their directories."""
    import torch
    from transformers import AutoTokenizer

    def load(model: str):
        try:
            return AutoTokenizer.from_pretrained(dirs[model])
        except Exception as exc:  # transformers raises many kinds here
            raise ConfigError(f"{model}: no tokenizer could be loaded ({type(exc).__name__}: {exc})") from None

    tokenizers = {base: load(base)}
    for m in models:
        if m not in tokenizers:
            tokenizers[m] = load(m)
    if spec.source == "base":
        out = tokenizers[base]
    elif spec.source == "union":
        out = _union(tokenizers, vocab_sizes, dirs[base])
    else:
        out = tokenizers[spec.source]
    for tok in spec.tokens:  # a configured token the output lacks is added to it
        if tok not in out.get_vocab():
            out.add_tokens(tok)
    vocab = dict(out.get_vocab())
    rows = {}
    for m in models:
        own = tokenizers[m].get_vocab()
        limit = vocab_sizes.get(m) or len(own)
        ids = torch.full((len(vocab),), -1, dtype=torch.int64)
        for tok, i in vocab.items():
            j = own.get(tok)
            if j is not None and j < limit:
                ids[i] = j
        rows[m] = ids
    size = len(vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    original = {m: dict(t.get_vocab()) for m, t in tokenizers.items()}
    return Vocabulary(out, vocab, size, rows, original, spec, base)


def _union(tokenizers: Mapping[str, Any], vocab_sizes: Mapping[str, int | None], base_dir: str) -> Any:
    """The base tokenizer with every other model's tokens added (plain ones first, then special ones)."""
    from transformers import AutoTokenizer

    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    for model, tok in tokenizers.items():
        limit = vocab_sizes.get(model) or tok.vocab_size
        added = tok.added_tokens_decoder
        added_names = {info.content for info in added.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda item: item[1]):  # by id: a stated, stable order
            if i < limit and t not in added_names:
                plain.setdefault(t, None)
        for i, info in added.items():
            if i < limit:
                special.setdefault(info.content, info)
    out = AutoTokenizer.from_pretrained(base_dir)  # a fresh copy: the base's own object stays as it is
    base_vocab = out.get_vocab()
    for t in plain:
        if t not in special and t not in base_vocab:
            out.add_tokens(t)
    for info in special.values():
        out.add_tokens(info)
    return out


def vocab_size_of(config: Mapping | None) -> int | None:
    value = (config or {}).get("vocab_size")
    return value if isinstance(value, int) else None
