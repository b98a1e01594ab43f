"""mergekit's ``chat_template`` key: ``auto``, the bundled names and a literal template, compared with mergekit 0.1.5
run on the same models (the merged tokenizers render every conversation alike)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import yaml
from _merge_utils import make_base, make_finetune, mergekit_available
from _tokenizers import byte_level_tokenizer

import weightsmith as ws
from weightsmith.errors import ConfigError
from weightsmith.merge.chat import NAMED

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there "}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": " Four. "},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]
LITERAL = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"


def _render(tokenizer, template: str | None = None) -> list[str]:
    return [
        tokenizer.apply_chat_template(c, chat_template=template, tokenize=False, add_generation_prompt=g)
        for c in CONVERSATIONS
        for g in (False, True)
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two fine-tunes of a tiny Llama; ``a`` and ``c`` share one chat template, ``b`` has another."""
    root = tmp_path_factory.mktemp("chat")
    base = make_base(root / "base", 2)
    out = {}
    for i, (name, template) in enumerate([("a", "T1"), ("b", "T2"), ("c", "T1")]):
        out[name] = make_finetune(base, root / name, seed=i + 1)
        tok = byte_level_tokenizer(None)
        tok.chat_template = "{% for m in messages %}" + template + "{{ m['content'] }}{% endfor %}"
        tok.save_pretrained(out[name])
    return out


@pytest.mark.skipif(not mergekit_available(), reason="mergekit 0.1.5 not installed")
@pytest.mark.parametrize("name", sorted(NAMED))
def test_bundled_templates_render_as_mergekits(name):
    import mergekit._data.chat_templates as bundled

    theirs = (importlib.resources.files(bundled) / f"{name}.jinja").read_text()
    tok = byte_level_tokenizer(None)
    assert _render(tok, NAMED[name]) == _render(tok, theirs)


def _merge_both(models, chat_template: str, tmp_path: Path) -> tuple[Path, Path]:
    config = {
        "merge_method": "linear",
        "models": [{"model": str(models[m]), "parameters": {"weight": 1.0}} for m in ("a", "b", "c")],
        "dtype": "float32",
        "chat_template": chat_template,
    }
    ws.merge.run(config, tmp_path / "ours")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    options = MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False, lazy_unpickle=False)
    run_merge(cfg, str(tmp_path / "theirs"), options=options)
    return tmp_path / "ours", tmp_path / "theirs"


@pytest.mark.skipif(not mergekit_available(), reason="mergekit 0.1.5 not installed")
@pytest.mark.parametrize(
    "chat_template", ["auto", "chatml", "llama3", LITERAL], ids=["auto", "chatml", "llama3", "literal"]
)
def test_merged_tokenizer_template_equals_mergekits(models, chat_template, tmp_path):
    from transformers import AutoTokenizer

    ours, theirs = _merge_both(models, chat_template, tmp_path)
    mine, peer = AutoTokenizer.from_pretrained(ours), AutoTokenizer.from_pretrained(theirs)
    assert _render(mine) == _render(peer)
    if chat_template == "auto":  # the template a and c share, not b's
        assert mine.chat_template.strip() == "{% for m in messages %}T1{{ m['content'] }}{% endfor %}"
    if chat_template == LITERAL:
        assert mine.chat_template == LITERAL


@pytest.mark.parametrize("value", ["alpaca-ish", "{short}", 3])
def test_bad_template_refused(models, value, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": str(models["a"])}], "chat_template": value}
    with pytest.raises(ConfigError, match="chat_template"):
        ws.merge.run(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
