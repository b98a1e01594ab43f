"""Training text: tokenising into examples, and a deterministic, sharded example order.

The order is a pure function of (seed, step, rank): every process computes its own slice of each global batch, so
ranks never see the same example within an epoch, and a resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def tokenize(texts: list[str], tokenizer, *, causal: bool, seq_len: int) -> list[list[int]]:
    """Token-id examples of at most ``seq_len`` tokens.

    Causal LM: documents joined with the EOS token and packed into blocks of exactly ``seq_len`` (GPT-style packing,
    nothing wasted on padding; a short tail block is kept). Encoders and masked LM: one example per document, with
    the tokenizer's special tokens, truncated to ``seq_len``.
    """
    if not texts:
        return []
    if causal:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += ids + eos
        blocks = [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]
        return [b for b in blocks if len(b) >= 2]  # a causal example needs one next-token target
    encoded = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    return [ids for ids in encoded if ids]


@dataclass(frozen=True)
class Order:
    """Which examples each rank takes at each step: epochs are seeded orders of all examples, concatenated.

    Global position p = step·(B·W) + rank·B + j (B per-process batch, W processes) maps to example
    order_{p // n}[p mod n], where order_e is randperm(n, seed + e), or with ``lengths`` that permutation grouped by
    length (``grouped_order``).
    """

    num_examples: int
    batch_size: int
    world_size: int
    seed: int
    lengths: tuple[int, ...] | None = None  # example lengths: put similar lengths into the same global batch
    _epochs: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def steps_for_epochs(self, epochs: float) -> int:
        return int(epochs * self.num_examples // self.global_batch)

    def batch(self, step: int, rank: int) -> list[int]:
        start = step * self.global_batch + rank * self.batch_size
        return [self._example(p) for p in range(start, start + self.batch_size)]

    def _example(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_examples)
        if epoch not in self._epochs:
            perm = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + epoch))
            self._epochs[epoch] = (
                perm
                if self.lengths is None
                else grouped_order(perm, self.lengths, self.global_batch, self.seed + epoch)
            )
        return int(self._epochs[epoch][offset])


GROUP_CHUNK = 64  # global batches per length-sorted chunk


def grouped_order(perm: torch.Tensor, lengths: tuple[int, ...], global_batch: int, seed: int) -> torch.Tensor:
    """A permutation regrouped so that each global batch holds examples of similar length (less padding).

    As transformers' ``group_by_length`` sampler: cut ``perm`` into chunks of GROUP_CHUNK global batches, sort each
    chunk by length (longest first), then shuffle the order of the whole global batches with ``seed`` (a partial
    tail batch stays last). Still a permutation, and a pure function of its arguments.
    """
    size = global_batch * GROUP_CHUNK
    ordered = [
        i
        for start in range(0, len(perm), size)
        for i in sorted(perm[start : start + size].tolist(), key=lambda i: -lengths[i])
    ]
    full = len(ordered) // global_batch
    blocks = torch.randperm(full, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    out = [i for b in blocks for i in ordered[b * global_batch : (b + 1) * global_batch]]
    return torch.tensor(out + ordered[full * global_batch :], dtype=torch.long)


def collate(examples: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) input ids and their (B, L) attention mask."""
    length = max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[row, : len(e)] = 1
    return ids, mask


def mask_tokens(
    ids: torch.Tensor,
    attention: torch.Tensor,
    special: torch.Tensor,
    *,
    mask_id: int,
    vocab: int,
    seed: int,
    probability: float = 0.15,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking (Devlin et al. 2019): pick 15% of the real, non-special tokens; of those 80% become [MASK], 10% a
    random token, 10% stay. Returns the corrupted (B, L) ids and the (B, L) mask of picked positions (the loss
    positions). Deterministic in ``seed``; ``ids`` is not modified.
    """
    gen = torch.Generator().manual_seed(seed)
    eligible = attention.bool() & ~special.bool()
    picked = (torch.rand(ids.shape, generator=gen) < probability) & eligible
    roll = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(vocab, ids.shape, generator=gen)
    out = ids.clone()
    out[picked & (roll < 0.8)] = mask_id
    swap = picked & (roll >= 0.8) & (roll < 0.9)
    out[swap] = random_ids[swap]
    return out, picked.long()


def image_examples(folder, processor) -> list[tuple[torch.Tensor, int]]:
    """(pixel values (C, H, W), class index) per image of a class_name/*.png folder, prepared by the teacher's own
    image processor (its preprocessor_config.json: resize, rescale, normalise)."""
    from weightsmith import hf

    images, labels, _ = hf.read_image_folder(folder)
    pixels = hf.pixel_values(processor, images)  # (N, C, H, W)
    return [(pixels[i], labels[i]) for i in range(len(labels))]


def pair_examples(
    sources: list[str], targets: list[str] | list[list[int]], tokenizer, *, seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) per pair, each with the tokenizer's special tokens (T5 ends both in EOS) and
    truncated to ``seq_len``; ``targets`` are texts or ids already (the teacher's own outputs). Pairs with an empty
    side are dropped."""
    if not sources:
        return []
    src = tokenizer(sources, truncation=True, max_length=seq_len)["input_ids"]
    if targets and isinstance(targets[0], str):
        tgt = tokenizer(text_target=targets, truncation=True, max_length=seq_len)["input_ids"]
    else:
        tgt = [list(t)[:seq_len] for t in targets]
    return [(s, t) for s, t in zip(src, tgt, strict=True) if s and t]
