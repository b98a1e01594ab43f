"""Small real tokenizers trained on the test sentences, for checkpoints that need a vocabulary llama.cpp can take."""

from __future__ import annotations

from pathlib import Path

import transformers as tf
from conftest import SENTENCES


def byte_level_tokenizer(directory: Path | None = None, vocab_size: int = 320):
    """A byte-level BPE tokenizer (the Llama 3 / Qwen kind) trained on the test sentences, with a chat template;
    saved into ``directory`` when one is given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin|>", "<|end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SENTENCES, trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>")
    fast.chat_template = "{% for m in messages %}<|begin|>{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
    if directory is not None:
        fast.save_pretrained(directory)
    return fast
