"""The merge methods and masks on plain tensors: selection vs a full sort, DARE and DELLA statistics against
mergekit's own sparsifiers, both rescale conventions, and a LoRA folded on the fly as a merge input."""

from __future__ import annotations

import pytest
import torch
from _merge_utils import load, make_finetune, max_diff

import weightsmith as ws
from weightsmith import sparsify as sp
from weightsmith.merge import methods as M
from weightsmith.merge.table import METHODS

N = 400_000  # large enough for the sampled-bracket path of the selection (> 4 × 65536)


def _delta(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(400, N // 400, generator=g) * torch.rand(400, 1, generator=g)  # rows of different scales


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_ties_trim_equals_full_sort(density):
    """One model on a zero base: TIES keeps exactly the k = ⌊dN⌋ largest |δ| and nothing else."""
    x = _delta()
    k = max(1, int(density * x.numel()))
    expected = torch.zeros(x.numel(), dtype=torch.bool)
    expected[x.abs().reshape(-1).argsort(descending=True)[:k]] = True
    out = M.ties(torch.zeros_like(x), [x], [1.0], [density])
    assert torch.equal(out, x * expected.reshape(x.shape))


def _cut(x: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    return sp.count_cut(lambda: [x], lambda step: x[::step], x.numel(), k, largest).mask(x)


def test_cut_counts_exact_with_ties():
    x = torch.tensor([0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 1.0, 3.0])
    assert _cut(x, 4, largest=True).tolist() == [False, True, True, False, True, False, False, True]  # by index
    assert _cut(x, 3, largest=False).tolist() == [True, True, False, False, False, True, False, False]
    assert int(_cut(torch.zeros(300_000), 1234, largest=False).sum()) == 1234  # sampled bracket, all equal
    assert not _cut(x, 0, largest=True).any() and _cut(x, 8, largest=False).all()


def test_ties_trim_across_blocks_breaks_ties_by_position():
    """Few distinct magnitudes (as bf16 task vectors have) spread over many row blocks: the kept set is exactly the
    k largest |δ| with equal values taken in index order, as a stable full sort orders them."""
    g = torch.Generator().manual_seed(9)
    delta = torch.randint(-3, 4, (700, 1024), generator=g).float()  # 7 values, ~100k of each
    assert delta.numel() > 2 * M._BLOCK
    out = M.ties(torch.zeros_like(delta), [delta], [1.0], [0.37])
    k = int(0.37 * delta.numel())
    expected = torch.zeros(delta.numel(), dtype=torch.bool)
    expected[delta.abs().reshape(-1).argsort(descending=True, stable=True)[:k]] = True
    assert torch.equal(out, delta * expected.reshape(delta.shape))


def test_breadcrumbs_keeps_the_band_below_the_outliers():
    """Model Breadcrumbs on one model: drop the ⌊γN⌋ largest |δ| and the smallest, keeping ⌊dN⌋ in between."""
    x = _delta(1)
    out = M.breadcrumbs(torch.zeros_like(x), [x], [1.0], [0.5], gamma=0.02)
    order = x.abs().reshape(-1).argsort()
    n = x.numel()
    n_bottom = n - int(0.5 * n) - int(0.02 * n)
    expected = torch.zeros(n, dtype=torch.bool)
    expected[order[n_bottom : n_bottom + int(0.5 * n)]] = True
    assert torch.equal(out, x * expected.reshape(x.shape))


def test_dare_paper_rescale_is_unbiased():
    """1/p: kept fraction ≈ p, and the survivors ×1/p keep the sum (in expectation; N large)."""
    base, delta = torch.zeros(400, 1000), _delta(2).abs()
    out = M.dare_linear(base, [delta], [1.0], [0.3], [0], rescale_mode="1/p")
    kept = (out != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.005
    assert torch.allclose(out[out != 0], delta[out != 0] / 0.3)
    assert abs(float(out.sum() / delta.sum()) - 1) < 0.01


def test_dare_l1_rescale_matches_mergekit_statistics():
    """mergekit's convention: the survivors are scaled so the L1 norm is unchanged — compare with mergekit's own
    Bernoulli sparsifier on the same tensor."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    base, delta = torch.zeros(400, 1000), _delta(3)
    ours = M.dare_linear(base, [delta], [1.0], [0.3], [0], rescale_mode="l1")
    torch.manual_seed(0)
    theirs = sparsify.bernoulli(delta, 0.3, sparsify.RescaleNorm.l1)
    for out in (ours, theirs):
        assert abs(float((out != 0).float().mean()) - 0.3) < 0.005
        assert abs(float(out.abs().sum() / delta.abs().sum()) - 1) < 1e-5
    scale_ours = float((ours[ours != 0] / delta[ours != 0]).mean())
    scale_theirs = float((theirs[theirs != 0] / delta[theirs != 0]).mean())
    assert abs(scale_ours - scale_theirs) < 0.01 * scale_theirs


def test_dare_ties_at_density_one_is_ties_without_trim():
    base = torch.zeros(50, 40)
    tuned = [_delta(s)[:50, :40] for s in (4, 5, 6)]
    out = M.dare_ties(base, tuned, [0.5, 0.3, 0.2], [1.0] * 3, [0, 1, 2])
    ties = METHODS["ties"].family
    ref = M.merge_task_vectors(ties, base, tuned, [0.5, 0.3, 0.2], densities=[1.0] * 3, normalize=False)[0]
    assert torch.equal(out, ref)


def test_della_keeps_large_entries_more_often_like_mergekit():
    """MagPrune: overall kept fraction ≈ density; the largest half is kept more than the smallest half, by the
    same margin as in mergekit's della_magprune on the same tensor."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    delta = _delta(7)
    base = torch.zeros_like(delta)
    ours = M.della(base, [delta], [1.0], [0.4], [0], epsilon=0.2, rescale_mode="l1")
    torch.manual_seed(0)
    theirs = sparsify.della_magprune(delta, 0.4, 0.2, sparsify.RescaleNorm.l1)
    big = delta.abs() >= delta.abs().median(dim=1, keepdim=True).values

    def stats(out):
        kept = out != 0
        return float(kept.float().mean()), float(kept[big].float().mean()), float(kept[~big].float().mean())

    (k1, b1, s1), (k2, b2, s2) = stats(ours), stats(theirs)
    assert abs(k1 - 0.4) < 0.005 and abs(k2 - 0.4) < 0.005
    assert abs(b1 - b2) < 0.01 and abs(s1 - s2) < 0.01 and b1 - s1 > 0.15


def test_della_paper_rescale_divides_by_each_probability():
    delta = _delta(8)[:20]
    p = sp.rank_keep_probability(delta, 0.5, 0.1)
    assert float(p.min()) == pytest.approx(0.4) and float(p.max()) == pytest.approx(0.6)
    out = M.della(torch.zeros_like(delta), [delta], [1.0], [0.5], [0], epsilon=0.1, rescale_mode="1/p")
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] / p[kept])


def test_methods_do_not_mutate_inputs():
    base, a, b = (torch.randn(8, 8) for _ in range(3))
    copies = [t.clone() for t in (base, a, b)]
    M.ties(base, [a, b], [1.0, 1.0], [0.5, 0.5])
    M.dare_linear(base, [a, b], [1.0, 1.0], [0.5, 0.5], [0, 1], rescale_mode="l1")
    M.della(base, [a, b], [1.0, 1.0], [0.5, 0.5], [0, 1])
    M.breadcrumbs(base, [a, b], [1.0, 1.0], [0.5, 0.5])
    M.slerp(a, b, 0.3)
    M.model_stock(base, [a, b])
    M.nuslerp(a, b, [1.0, 2.0], base=base)
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), copies))


def test_slerp_colinear_falls_back_to_linear():
    a = torch.randn(10, 10)
    assert torch.allclose(M.slerp(a, 2 * a, 0.25), 1.25 * a)


def test_count_consensus_differs_from_sum():
    base = torch.zeros(3)
    tuned = [torch.tensor([1.0, -1.0, 5.0]), torch.tensor([1.0, -1.0, -1.0]), torch.tensor([1.0, 1.0, -1.0])]
    by_sum = M.ties(base, tuned, [1, 1, 1], [1, 1, 1], consensus="sum")
    by_count = M.ties(base, tuned, [1, 1, 1], [1, 1, 1], consensus="count")
    assert by_sum.tolist() == [1.0, -1.0, 5.0] and by_count.tolist() == [1.0, -1.0, -1.0]


# ---------------------------------------------------------------------------------------------------------------
# A LoRA adapter folded on the fly (``base+adapter``)


def test_adapter_input_matches_peft_merge(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers as tf

    base_dir = tiny_model("llama")
    model = tf.AutoModelForCausalLM.from_pretrained(base_dir)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    lora.save_pretrained(tmp_path / "adapter")
    lora.merge_and_unload().save_pretrained(tmp_path / "peft-merged")
    other = make_finetune(base_dir, tmp_path / "ft", seed=3)

    spec = f"{base_dir}+{tmp_path / 'adapter'}"
    models = [{"model": spec, "parameters": {"weight": 0.4}}, {"model": str(other), "parameters": {"weight": 0.6}}]
    ws.merge.run({"merge_method": "linear", "models": models}, tmp_path / "ours")
    models[0]["model"] = str(tmp_path / "peft-merged")
    ws.merge.run({"merge_method": "linear", "models": models}, tmp_path / "reference")
    diff, where = max_diff(load(tmp_path / "ours"), load(tmp_path / "reference"))
    assert diff <= 1e-6, where
    assert not list(tmp_path.glob("**/*cache*"))  # folded in memory, no cache directory
