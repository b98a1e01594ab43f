"""A merge config's ``chat_template`` (mergekit's key): the chat template the merged tokenizer is written with.

``auto`` — the template most of the merged models' tokenizers share (the first of the most common, after stripping
whitespace; none when no model has one); a bundled name (``chatml``, ``llama3``, ``mistral``); else the value is
the Jinja template itself. Read from the models' tokenizer files, without transformers.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from weightsmith.errors import ConfigError

# Each renders what mergekit 0.1.5's template of that name renders under transformers (tests/test_merge_chat.py).
NAMED = {
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3": (
        "{%- for message in messages %}"
        "{%- if loop.first %}{{- bos_token }}{%- endif %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{- message['content'] | trim }}{{- '<|eot_id|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "mistral": (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token }}"
        "{%- for message in turns %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('After the optional system message, roles must alternate user/assistant') }}"
        "{%- endif %}"
        "{%- if message['role'] == 'user' %}"
        "{{- ' [INST] ' }}"
        "{%- if loop.first and system is defined %}{{- system + '\\n\\n' }}{%- endif %}"
        "{{- message['content'] + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('Only user and assistant roles follow the optional system message') }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
}


def check_chat_template(value: object, where: str) -> str:
    """``value`` as a config's chat_template: ``auto``, a bundled name, or a Jinja template (mergekit's rule: at
    least 20 characters and a ``{``)."""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: chat_template must be a string, got {value!r}")
    if value == "auto" or value in NAMED:
        return value
    if len(value) < 20 or "{" not in value:
        raise ConfigError(
            f"{where}: chat_template {value!r} is neither auto, a bundled template ({', '.join(NAMED)}) nor a "
            "Jinja template"
        )
    return value


def model_template(directory: Path) -> str | None:
    """A tokenizer directory's chat template as transformers reads it: chat_template.jinja, else
    tokenizer_config.json's ``chat_template`` (of a list of named templates, the ``default`` one)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def resolve_chat_template(value: str, directories: Sequence[Path]) -> str | None:
    """The template text ``value`` stands for; ``directories`` are the merged models' (for ``auto``)."""
    if value == "auto":
        found = [t.strip() for t in (model_template(Path(d)) for d in directories) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(value, value)
