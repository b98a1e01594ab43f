"""A transformers tokenizer (``tokenizer.json`` + ``tokenizer_config.json``) as GGUF tokenizer metadata.

Two of llama.cpp's vocabulary kinds are written, chosen from the tokenizer's model:
- ``gpt2``: byte-level BPE (Llama 3, Qwen 2/3, Mistral Nemo…): tokens, token types and merges ("a b").
- ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral 7B, Gemma, Phi-3): tokens, scores and
  types, the 256 ``<0xXX>`` byte tokens typed BYTE. A SentencePiece BPE model scores piece i as −i (earlier pieces
  merge first); that is the score written, and the order llama.cpp merges in.
Token types follow gguf-py's ``TokenType``: NORMAL 1, UNKNOWN 2, CONTROL 3 (special added tokens), USER_DEFINED 4
(other added tokens), UNUSED 5 (padding up to the model's vocabulary size), BYTE 6.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError, IncompatibleError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
# the pre-tokenizer llama.cpp should use, by family (llama.cpp names regexes this way; "default" is its fallback),
# when tokenizer.json's own split is not one of those below
_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "mistral": "llama-bpe"}
# tokenizer.json's split regexes that llama.cpp knows by name (its llama-vocab.cpp applies the same expressions):
# Llama 3's, and Qwen 2's, which takes digits one at a time rather than up to three
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_PRE_BY_REGEX = {_LLAMA3_SPLIT: "llama-bpe", _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2"}


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad → id
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None


def _content(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def read_vocab(directory: Path, model_type: str, vocab_size: int) -> Vocab | None:
    """The GGUF vocabulary of the tokenizer saved in ``directory``; None when there is no ``tokenizer.json``."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        tj = json.loads(path.read_text())
        tc_path = directory / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(
            f"{path}: a {model.get('type')} tokenizer; weightsmith writes BPE vocabularies (byte-level or "
            f"SentencePiece-style) to GGUF"
        )
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in tj.get("added_tokens") or []}
    for i, t in added.items():
        by_id[i] = t["content"]
    n = max(vocab_size, max(by_id) + 1)
    spm = bool(model.get("byte_fallback"))
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(n):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(text)
            if spm and _BYTE_TOKEN.match(text):  # byte-fallback pieces, wherever the tokenizer lists them
                types.append(BYTE)
            elif i in added:
                types.append(CONTROL if added[i].get("special") else USER_DEFINED)
            elif text == unk:
                types.append(UNKNOWN)
            else:
                types.append(NORMAL)
        scores.append(0.0 if i in added or text is None else -float(i))
    if unk is not None and unk in model["vocab"]:
        types[model["vocab"][unk]] = UNKNOWN
    ids = {t: i for i, t in enumerate(tokens)}
    special = {}
    for key in ("bos", "eos", "unk", "pad"):
        text = _content(tc.get(f"{key}_token"))
        if text is not None and text in ids:
            special[key] = ids[text]
    template = tc.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    if isinstance(template, list):  # several named templates: llama.cpp takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    merges = None
    if not spm:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if not merges:  # gguf-py does not write an empty array, and llama.cpp will not load a BPE without the key
            raise IncompatibleError(
                f"{directory / 'tokenizer.json'}: a BPE vocabulary without merges, which llama.cpp cannot load"
            )
    add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
    if add_bos is None:  # not in tokenizer_config.json: what tokenizer.json's post-processor does
        add_bos = _template_adds(tj.get("post_processor"), _content(tc.get("bos_token")), first=True)
    if add_eos is None:
        add_eos = _template_adds(tj.get("post_processor"), _content(tc.get("eos_token")), first=False)
    return Vocab(
        model="llama" if spm else "gpt2",
        pre=None if spm else pre_tokenizer_name(tj.get("pre_tokenizer"), model_type),
        tokens=tokens,
        types=types,
        scores=scores if spm else None,
        merges=merges,
        special=special,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=template,
    )


def pre_tokenizer_name(pre_tokenizer: Any, model_type: str) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for how a byte-level BPE splits text before merging: read from
    tokenizer.json's pre-tokenizer where llama.cpp knows the split (GPT-2's, the regex built into a ByteLevel step,
    is ``gpt-2``; Llama 3's and Qwen 2's Split regexes are ``llama-bpe`` and ``qwen2``), else the family's name."""
    steps = [pre_tokenizer] if isinstance(pre_tokenizer, dict) else []
    if steps and steps[0].get("type") == "Sequence":
        steps = steps[0].get("pretokenizers") or []
    for step in steps:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            return _PRE_BY_REGEX.get(str(regex)) or _PRE.get(model_type, "default")
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"
    return _PRE.get(model_type, "default")


def _template_adds(processor: Any, token: str | None, first: bool) -> bool:
    """Whether a tokenizers post-processor puts ``token`` first (bos) or last (eos) of a single sequence."""
    if not isinstance(processor, dict) or token is None:
        return False
    if processor.get("type") == "Sequence":
        return any(_template_adds(p, token, first) for p in processor.get("processors") or [])
    if processor.get("type") != "TemplateProcessing":
        return False
    single = processor.get("single") or []
    if not single:
        return False
    edge = single[0] if first else single[-1]
    return isinstance(edge, dict) and (edge.get("SpecialToken") or {}).get("id") == token


def write_vocab(writer: Any, vocab: Vocab) -> None:
    """Add ``vocab`` to a ``gguf.GGUFWriter``."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    if vocab.add_bos is not None:
        writer.add_add_bos_token(bool(vocab.add_bos))
    if vocab.add_eos is not None:
        writer.add_add_eos_token(bool(vocab.add_eos))
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
