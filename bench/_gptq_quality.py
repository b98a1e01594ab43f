"""Helpers of quantize_bench.py's GPTQ figure: a small byte-level Llama trained here (bench/merge_quality.py's
recipe and corpus, widths that a group of 32 divides), saved with a byte tokenizer (token id = byte value), and
byte perplexity of each quantized copy on held-out text."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_quality import corpora, perplexity, split, train  # noqa: E402

STEPS = 500


def byte_tokenizer():
    """A fast tokenizer whose ids are the UTF-8 bytes of the text (GPT-2's byte-to-character map, no merges)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok)


def build(root: Path) -> None:
    """Train (once) the model into root/float, and write root/calib.txt (training text) and root/held.txt."""
    import transformers as tf

    if (root / "float" / "config.json").is_file():
        return
    torch.manual_seed(0)
    text = corpora()["general"]
    train_bytes, held_bytes = split(text)
    cfg = tf.LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    train(model, train_bytes, STEPS, 3e-3, seed=1)
    model.save_pretrained(root / "float")
    tok = byte_tokenizer()
    assert tok("abc")["input_ids"] == [97, 98, 99]
    tok.save_pretrained(root / "float")
    raw = bytes(train_bytes.tolist()).decode(errors="ignore")
    lines = [raw[i : i + 512].replace("\n", " ") for i in range(0, 512 * 128, 512)]
    (root / "calib.txt").write_text("\n".join(lines) + "\n")
    torch.save(held_bytes, root / "held.pt")


def build_scale(root: Path) -> None:
    """An untrained byte-level Llama of about 100M parameters (hidden 1024, 8 layers, MLP 2816; 0.4 GB in fp32) in
    root/scale, with the byte tokenizer: GPTQ's memory and time where the model, not the imports, is the size."""
    import transformers as tf

    if (root / "scale" / "config.json").is_file():
        return
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    tf.LlamaForCausalLM(cfg).save_pretrained(root / "scale")
    byte_tokenizer().save_pretrained(root / "scale")


def scores(root: Path, names: list[str]) -> dict[str, float]:
    """Byte perplexity on held-out text of each model directory under root (transformers loads the quantized ones
    through compressed-tensors)."""
    import transformers as tf

    held = torch.load(root / "held.pt")
    out = {}
    for name in names:
        model = tf.LlamaForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()
        out[name] = round(perplexity(model, held), 4)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[2])
    if sys.argv[1] == "build":
        build(root)
    elif sys.argv[1] == "build-scale":
        build_scale(root)
    else:
        print(json.dumps(scores(root, sys.argv[3:])))
        sys.stdout.flush()
