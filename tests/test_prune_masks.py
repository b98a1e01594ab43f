"""Pure mask functions: exact counts, per-row and per-group rules, global radix selection against a full sort."""

from __future__ import annotations

import pytest
import torch

from weightsmith.compress.prune import masks
from weightsmith.compress.prune.structured import _ranges, keep_heads_gqa, parse_ranges


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_exact_count_and_order(sparsity):
    w = torch.randn(37, 53)
    mask = masks.magnitude_mask(w, sparsity)
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if 0 < sparsity:
        assert w[~mask].abs().max() <= w[mask].abs().min()


def test_magnitude_mask_exact_with_ties():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 3.0]])
    mask = masks.magnitude_mask(w, 0.5)
    assert int((~mask).sum()) == 4 and bool(mask[1, 2]) and bool(mask[1, 3])


def test_wanda_mask_per_row_matches_bruteforce():
    torch.manual_seed(1)
    w, norm = torch.randn(8, 20), torch.rand(20) * 3
    mask = masks.wanda_mask(w, norm, 0.5)
    for i in range(8):
        score = w[i].abs() * norm
        expected = set(torch.argsort(score)[10:].tolist())
        assert set(torch.nonzero(mask[i]).reshape(-1).tolist()) == expected
    assert not torch.equal(mask, masks.magnitude_mask(w, 0.5))  # activations changed the choice


def test_nm_mask_every_group():
    torch.manual_seed(2)
    scores = torch.rand(6, 16)
    mask = masks.nm_mask(scores, 2, 4)
    groups_m, groups_s = mask.reshape(6, 4, 4), scores.reshape(6, 4, 4)
    assert bool((groups_m.sum(-1) == 2).all())
    kept_min = torch.where(groups_m, groups_s, torch.inf).amin(-1)
    dropped_max = torch.where(~groups_m, groups_s, -torch.inf).amax(-1)
    assert bool((dropped_max <= kept_min).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_radix_threshold_equals_full_sort(dtype):
    torch.manual_seed(3)
    tensors = [(torch.randn(50, 40) * s).to(dtype) for s in (0.5, 1.0, 3.0)]
    flat = torch.cat([t.float().abs().reshape(-1) for t in tensors])
    k = round(0.6 * flat.numel())
    hist = sum(masks.global_bin_histogram(t, level=0) for t in tensors)
    high, below = masks.select_bin(hist, k)
    hist = sum(masks.global_bin_histogram(t, level=1, prefix=high) for t in tensors)
    low, below_low = masks.select_bin(hist, k - below)
    threshold = (high << 16) | low
    assert torch.tensor([threshold], dtype=torch.int32).view(torch.float32).item() == torch.sort(flat).values[k - 1]
    quota, dropped = k - below - below_low, 0
    for t in tensors:
        mask, used = masks.threshold_mask(t, threshold, quota)
        quota -= used
        dropped += int((~mask).sum())
    assert dropped == k and quota == 0


def test_gqa_head_selection_keeps_groups_regular():
    scores = torch.tensor([5.0, 1.0, 2.0, 9.0, 0.5, 0.6, 7.0, 8.0])  # 8 query heads, 4 KV heads: groups of 2
    q, kv = keep_heads_gqa(scores, kv_heads=4, keep=4)  # one per group, the best of each pair
    assert q.tolist() == [0, 3, 5, 7] and kv.tolist() == [0, 1, 2, 3]
    q, kv = keep_heads_gqa(scores, kv_heads=4, keep=6)  # 6 % 4 != 0: whole groups, the weakest (heads 4,5) goes
    assert q.tolist() == [0, 1, 2, 3, 6, 7] and kv.tolist() == [0, 1, 3]


def test_ranges_round_trip():
    idx = torch.tensor([0, 1, 2, 5, 7, 8, 11])
    assert _ranges(idx) == "0-2,5,7-8,11" and parse_ranges(_ranges(idx)) == idx.tolist()
