"""The small trained Llama of the GGUF greedy check, built once into bench/_work and reused.

A byte-level BPE tokenizer with merges, of the Llama 3 kind (the Llama 3 split regex, then bytes mapped to
characters; whole words in the vocabulary taken as they are), is trained with the `tokenizers` library on docstrings
of installed packages (``merge_quality.corpora()``); a Llama of 4 layers, hidden 256, GQA 8/4 is trained with AdamW
on that text, tokenized, for a few hundred steps on the CPU, seed fixed. Both are saved with ``save_pretrained``,
with prompts cut from held-out docstrings beside them (``prompts.json``).

Run: .venv/bin/python bench/_greedy_model.py OUT_DIR   (bench/gguf_bench.py does, when OUT_DIR has no model)
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_quality import corpora  # noqa: E402

VOCAB, SEQ, BATCH, STEPS, LR = 768, 128, 12, 200, 3e-3
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# Llama 3's pre-tokenizer regex: what llama.cpp applies for `tokenizer.ggml.pre = llama-bpe`, the value weightsmith
# writes for a Llama's byte-level vocabulary
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def train_tokenizer(text: list[str], out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(out)
    return fast


def prompts(held_out: list[str], n: int = 4) -> list[str]:
    """The first words (up to ~40 characters) of ``n`` held-out docstrings, evenly spaced, that open with a letter."""
    starts = [d for d in held_out if d[:1].isalpha() and " " in d[:40]]
    picked = [starts[i * len(starts) // n] for i in range(n)]
    return [p[:40].rsplit(" ", 1)[0] for p in picked]


def train(model, ids: torch.Tensor, eos: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    rng = random.Random(1)
    losses = []
    model.train()
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        starts = [rng.randrange(0, len(ids) - SEQ - 1) for _ in range(BATCH)]
        batch = torch.stack([ids[i : i + SEQ + 1] for i in starts])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == STEPS - 1:
            print(f"step {step} loss {losses[-1]:.3f}", flush=True)
    model.eval()
    return losses


def main(out: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    torch.set_num_threads(2)
    docs = corpora()["general"].split("\n\n")
    cut = int(0.9 * len(docs))
    train_docs, held_out = docs[:cut], docs[cut:]
    tok = train_tokenizer(train_docs, out)
    eos = tok.convert_tokens_to_ids(EOS)
    ids = torch.tensor(
        [t for d in train_docs for t in [*tok(d, add_special_tokens=False)["input_ids"], eos]], dtype=torch.long
    )
    cfg = tf.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
    )
    model = tf.LlamaForCausalLM(cfg)
    t = time.perf_counter()
    losses = train(model, ids, eos)
    model.save_pretrained(out)
    facts = {
        "prompts": prompts(held_out),
        "train_tokens": len(ids),
        "steps": STEPS,
        "batch": BATCH,
        "seq": SEQ,
        "vocab": len(tok),
        "merges": len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]),
        "first_loss": round(losses[0], 3),
        "final_loss": round(sum(losses[-20:]) / 20, 3),
        "train_seconds": round(time.perf_counter() - t),
    }
    (out / "prompts.json").write_text(json.dumps(facts, indent=1))
    print(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
