import math

import pytest
import torch

from prunelab.anatomy import (convergence, expected_hamming, expected_jaccard, hamming, jaccard,
                              layer_density, overlap, overlap_matrix, seed_overlap)
from prunelab.masks import Mask

# ~200k weights in two layers of different size and shape
SHAPES = {"features.0.weight": (128, 64, 3, 3), "classifier.weight": (256, 500)}


def _random_mask(density: float, seed: int, shapes=SHAPES) -> Mask:
    """Exactly round(density * n) surviving weights per layer, at uniform positions."""
    g = torch.Generator().manual_seed(seed)
    out = Mask()
    for name, shape in shapes.items():
        n = math.prod(shape)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.randperm(n, generator=g)[:round(density * n)]] = True
        out[name] = keep.view(shape)
    return out


def _intersection_var(a: Mask) -> float:
    """Variance of |A ∩ B| for two independent random masks with a's per-layer counts: per layer
    |A ∩ B| is hypergeometric (draw k of n, k of them marked), variance k·(k/n)·(1−k/n)·(n−k)/(n−1);
    layers are independent, so the variances add."""
    var = 0.0
    for v in a.values():
        n, k = v.numel(), int(v.sum())
        var += k * (k / n) * (1 - k / n) * (n - k) / (n - 1)
    return var


def _bits(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def _small_pair() -> tuple[Mask, Mask]:
    a = Mask([("l1.weight", _bits(1, 1, 0, 0)), ("l2.weight", _bits(1, 1, 1, 0, 0, 0).view(2, 3))])
    b = Mask([("l1.weight", _bits(1, 0, 1, 0)), ("l2.weight", _bits(1, 1, 1, 1, 1, 0).view(2, 3))])
    return a, b


def test_mask_against_itself_and_its_complement():
    a = _random_mask(0.3, seed=0)
    assert jaccard(a, a) == 1.0 and hamming(a, a) == 0.0
    comp = Mask((n, ~v) for n, v in a.items())
    assert jaccard(a, comp) == 0.0 and hamming(a, comp) == 1.0


def test_empty_masks_have_jaccard_one():
    empty = Mask(w=torch.zeros(5, dtype=torch.bool))
    assert jaccard(empty, empty) == 1.0 and hamming(empty, empty) == 0.0
    assert expected_jaccard(empty, empty) == 1.0


def test_hand_computed_small_example():
    a, b = _small_pair()
    # l1: n=4, k_a=2, k_b=2, |a∩b|=1, |a∪b|=3; l2: n=6, k_a=3, k_b=5, |a∩b|=3, |a∪b|=5
    assert jaccard(a, b) == pytest.approx(4 / 8)
    assert hamming(a, b) == pytest.approx(4 / 10)
    # E|A∩B| = 2·2/4 + 3·5/6 = 3.5; E|A∪B| = (4 − 1) + (8 − 2.5) = 8.5
    assert expected_jaccard(a, b) == pytest.approx(3.5 / 8.5)
    assert expected_hamming(a, b) == pytest.approx((4 - 2 + 8 - 5) / 10)
    assert layer_density(a) == pytest.approx({"l1.weight": 0.5, "l2.weight": 0.5})
    assert list(layer_density(b)) == ["l1.weight", "l2.weight"]
    assert layer_density(b) == pytest.approx({"l1.weight": 0.5, "l2.weight": 5 / 6})
    o = overlap(a, b)
    assert o == pytest.approx({"jaccard": 0.5, "hamming": 0.4, "expected_jaccard": 3.5 / 8.5,
                               "expected_hamming": 0.5, "excess_jaccard": 0.5 - 3.5 / 8.5})
    # symmetric in its arguments
    assert overlap(b, a) == pytest.approx(o)


@pytest.mark.parametrize("d", [0.1, 0.41, 0.8])
def test_random_masks_match_the_random_expectation(d):
    a, b = _random_mask(d, seed=1), _random_mask(d, seed=2)
    target = d / (2 - d)
    # the per-layer counts are round(d·n), so the expectation is d/(2−d) up to that rounding
    assert expected_jaccard(a, b) == pytest.approx(target, abs=1e-5)
    assert expected_hamming(a, b) == pytest.approx(2 * d * (1 - d), abs=1e-5)

    # Sampling error: J = I / (2k − I) with I = |A∩B| and k = |A| = |B| fixed, so by the delta method
    # sd(J) ≈ 2k·sd(I) / (2k − E I)², and H = 2(k − I) / N has sd(H) = 2·sd(I) / N. Six standard
    # deviations leave a false failure less likely than 1e-8, while staying far below the gap to a
    # wrong formula (e.g. d itself, or d²).
    total, k = a.total, a.remaining
    sd_i = math.sqrt(_intersection_var(a))
    e_i = sum(int(v.sum()) ** 2 / v.numel() for v in a.values())
    sd_j = 2 * k * sd_i / (2 * k - e_i) ** 2
    sd_h = 2 * sd_i / total
    assert 6 * sd_j < 0.25 * target
    assert jaccard(a, b) == pytest.approx(target, abs=6 * sd_j)
    assert hamming(a, b) == pytest.approx(expected_hamming(a, b), abs=6 * sd_h)
    assert abs(overlap(a, b)["excess_jaccard"]) < 6 * sd_j


def test_expected_jaccard_uses_per_layer_counts():
    # one layer full, one empty: random masks with those counts are identical, the same 50% overall
    # density spread evenly over the layers would give 1/3
    a = Mask(x=torch.ones(100, dtype=torch.bool), y=torch.zeros(100, dtype=torch.bool))
    b = _random_mask(0.5, seed=3, shapes={"x": (100,), "y": (100,)})
    assert expected_jaccard(a, a) == pytest.approx(1.0)
    assert expected_hamming(a, a) == pytest.approx(0.0)
    assert expected_jaccard(b, b) == pytest.approx(1 / 3)


def test_overlap_matrix_is_symmetric_with_unit_diagonal():
    masks = {"magnitude": _random_mask(0.2, seed=4), "random": _random_mask(0.2, seed=5),
             "dense_first": _random_mask(0.6, seed=6)}
    m = overlap_matrix(masks)
    assert m["names"] == ["magnitude", "random", "dense_first"]
    for key in ("jaccard", "excess"):
        assert len(m[key]) == 3 and all(len(row) == 3 for row in m[key])
        for i in range(3):
            for j in range(3):
                assert m[key][i][j] == m[key][j][i]
    assert [m["jaccard"][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    assert m["jaccard"][0][1] == pytest.approx(jaccard(masks["magnitude"], masks["random"]))
    # a mask against itself exceeds chance by 1 − its random expectation
    for i, name in enumerate(m["names"]):
        assert m["excess"][i][i] == pytest.approx(1 - expected_jaccard(masks[name], masks[name]))
    assert m["excess"][0][0] == pytest.approx(1 - 0.2 / 1.8, abs=1e-4)


def test_convergence_of_nested_masks():
    g = torch.Generator().manual_seed(7)
    n = 10_000
    order = torch.randperm(n, generator=g)
    rounds = {}
    # nested: round r keeps the first 0.8^r·n weights of one fixed random order
    for r in (3, 0, 5, 1, 4, 2):  # insertion order is not round order
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[:round(n * 0.8 ** r)]] = True
        rounds[r] = Mask(w=keep)
    conv = convergence(rounds)
    assert list(conv) == [0, 1, 2, 3, 4, 5]
    assert conv[5] == 1.0
    # for nested masks J(m_r, m_final) = |m_final| / |m_r|
    for r, j in conv.items():
        assert j == pytest.approx(round(n * 0.8 ** 5) / round(n * 0.8 ** r))
    assert all(conv[r] < conv[r + 1] for r in range(5))
    assert convergence(rounds, final=rounds[5]) == conv
    assert convergence(rounds, final=rounds[2])[2] == 1.0
    with pytest.raises(ValueError):
        convergence({})


def test_seed_overlap_over_all_pairs():
    masks = [_random_mask(0.3, seed=s) for s in (10, 11, 12)]
    s = seed_overlap(masks)
    assert s["n_pairs"] == 3
    assert [(i, j) for i, j, _ in s["pairs"]] == [(0, 1), (0, 2), (1, 2)]
    assert s["pairs"][1][2] == pytest.approx(jaccard(masks[0], masks[2]))
    assert s["jaccard_mean"] == pytest.approx(sum(p[2] for p in s["pairs"]) / 3)
    assert s["jaccard_mean"] == pytest.approx(0.3 / 1.7, abs=0.01)
    assert abs(s["excess_mean"]) < 0.01
    # identical seeds: full overlap, excess 1 − expectation
    same = seed_overlap([masks[0], masks[0]])
    assert same["jaccard_mean"] == 1.0
    assert same["excess_mean"] == pytest.approx(1 - 0.3 / 1.7, abs=1e-4)
    for bad in ([], [masks[0]]):
        with pytest.raises(ValueError, match="at least two"):
            seed_overlap(bad)


def test_mismatched_masks_name_the_layer():
    a, b = _small_pair()
    renamed = Mask([("l1.weight", b["l1.weight"]), ("l3.weight", b["l2.weight"])])
    for fn in (jaccard, hamming, expected_jaccard, expected_hamming, overlap):
        with pytest.raises(ValueError, match="l2.weight"):
            fn(a, renamed)
    extra = Mask(list(a.items()) + [("l9.weight", _bits(1, 0))])
    with pytest.raises(ValueError, match="l9.weight"):
        jaccard(a, extra)
    with pytest.raises(ValueError, match="l9.weight"):
        jaccard(extra, a)
    reshaped = Mask([("l1.weight", b["l1.weight"]), ("l2.weight", b["l2.weight"].view(3, 2))])
    with pytest.raises(ValueError, match=r"l2\.weight.*\(2, 3\).*\(3, 2\)"):
        hamming(a, reshaped)
    with pytest.raises(ValueError, match="l2.weight"):
        overlap_matrix({"a": a, "b": reshaped})
    with pytest.raises(ValueError, match="l2.weight"):
        seed_overlap([a, b, reshaped])


def test_layer_order_does_not_matter():
    a, b = _small_pair()
    b_reordered = Mask([("l2.weight", b["l2.weight"]), ("l1.weight", b["l1.weight"])])
    assert jaccard(a, b_reordered) == pytest.approx(jaccard(a, b))
    assert expected_hamming(a, b_reordered) == pytest.approx(expected_hamming(a, b))
