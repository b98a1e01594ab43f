"""The one sparsifier: exactly k selected, and among equal values the lower index selected first — for the merge
methods' cuts and for pruning's masks alike (pruning drops what it selects)."""

from __future__ import annotations

import pytest
import torch

from weightsmith import sparsify as sp
from weightsmith.compress.prune import masks


@pytest.mark.parametrize("largest", [True, False])
def test_equal_magnitudes_select_the_lower_flat_indices(largest):
    flat = sp.select_mask(torch.full((4, 5), 0.5), 7, largest=largest)
    assert flat.reshape(-1).tolist() == [True] * 7 + [False] * 13
    per_row = sp.select_mask(torch.full((3, 6), -2.0), 2, largest=largest, dim=1)
    assert per_row.tolist() == [[True, True, False, False, False, False]] * 3


def test_ties_only_at_the_cut_and_counts_are_exact():
    scores = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.0, 3.0])
    assert sp.select_mask(scores, 3).tolist() == [True, False, True, True, False, False, False]
    assert sp.select_indices(scores, 3).tolist() == [0, 2, 3]
    assert sp.select_mask(scores, 3, largest=False).tolist() == [False, True, True, False, False, True, False]
    big = torch.randint(0, 4, (300_000,)).float()  # past the sampled bracket: the same rule on the chunked path
    kept = sp.select_mask(big, 100_000)
    assert int(kept.sum()) == 100_000
    cut = big[kept].min()
    equal = torch.nonzero(big == cut).reshape(-1)
    taken = int((kept & (big == cut)).sum())
    assert kept[equal[:taken]].all() and not kept[equal[taken:]].any()


def test_magnitude_and_wanda_pruning_drop_by_the_same_rule():
    weight = torch.full((4, 8), 0.25)
    dropped = ~masks.magnitude_mask(weight, 0.25)
    assert dropped.reshape(-1).tolist() == [True] * 8 + [False] * 24
    dropped = ~masks.wanda_mask(weight, torch.ones(8), 0.5)
    assert dropped.tolist() == [[True] * 4 + [False] * 4] * 4


def test_the_tie_rule_agrees_with_topk_where_there_are_no_ties():
    x = torch.randn(50, 40)
    by_topk = torch.zeros(2000, dtype=torch.bool).index_fill_(0, torch.topk(x.reshape(-1), 123).indices, True)
    assert torch.equal(sp.select_mask(x, 123).reshape(-1), by_topk)
    rows = torch.topk(x, 7, dim=1, largest=False).indices.sort(dim=1).values
    assert torch.equal(sp.select_indices(x, 7, largest=False, dim=1).sort(dim=1).values, rows)
