"""Tests for certattr.metrics: scipy / numpy / brute-force oracles and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from certattr import metrics as M
from certattr.attributions import attribution_map
from certattr.errors import CertattrError


def _rand(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen, dtype=dtype)


def _heavy_ties(shape, seed):
    """Integers in 0..3 with about 60% zeros (like a sparse ReLU saliency map)."""
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, 4, size=shape).astype(np.float64)
    vals[rng.random(shape) < 0.6] = 0.0
    return torch.from_numpy(vals)


def _scipy_rows(fn, a, b):
    a = a.reshape(a.shape[0], -1).double().numpy()
    b = b.reshape(b.shape[0], -1).double().numpy()
    return np.array([fn(a[i], b[i])[0] for i in range(a.shape[0])])


# ----------------------------------------------------------------------------- euclidean / cosine

def test_euclidean_and_cosine_match_numpy():
    g1, g2 = _rand((6, 3, 5, 4), 0) - 0.5, _rand((6, 3, 5, 4), 1) - 0.5
    a, b = g1.reshape(6, -1).numpy(), g2.reshape(6, -1).numpy()
    np.testing.assert_allclose(M.euclidean(g1, g2).numpy(), np.linalg.norm(a - b, axis=1), rtol=1e-12)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(M.cosine_similarity(g1, g2).numpy(), cos, rtol=1e-12)
    np.testing.assert_allclose(M.cosine_distance(g1, g2).numpy(), 1 - cos, rtol=1e-12)
    # float32 input stays float32 and agrees
    out32 = M.euclidean(g1.float(), g2.float())
    assert out32.dtype == torch.float32 and out32.shape == (6,)
    np.testing.assert_allclose(out32.numpy(), np.linalg.norm(a - b, axis=1), rtol=1e-5)


def test_cosine_zero_vector_convention_and_sign():
    z = torch.zeros(1, 4)
    v = torch.tensor([[1.0, -2.0, 0.0, 3.0]])
    assert M.cosine_similarity(z, z).item() == 1.0        # both zero: identical
    assert M.cosine_similarity(z, v).item() == 0.0        # one zero: nothing in common
    assert M.cosine_similarity(v, z).item() == 0.0
    assert M.cosine_similarity(v, -v).item() == pytest.approx(-1.0)
    assert M.cosine_similarity(v, 3 * v).item() == pytest.approx(1.0)
    assert M.cosine_distance(v, -v).item() == pytest.approx(2.0)


def test_euclidean_cosine_are_differentiable():
    g1 = (_rand((3, 7), 2) - 0.5).requires_grad_(True)
    g2 = _rand((3, 7), 3) - 0.5
    assert torch.autograd.gradcheck(lambda a: M.cosine_similarity(a, g2), (g1,))
    assert torch.autograd.gradcheck(lambda a: M.euclidean(a, g2), (g1,))
    z = torch.zeros(2, 5, requires_grad=True)
    (M.cosine_similarity(z, torch.ones(2, 5)).sum() + M.euclidean(z, z.detach()).sum()).backward()
    assert torch.isfinite(z.grad).all()


# ----------------------------------------------------------------------------- top-k intersection

def test_topk_intersection_brute_force_sets():
    m1, m2 = _rand((16, 28, 28), 4), _rand((16, 28, 28), 5)
    m2 = 0.5 * m1 + 0.5 * m2  # correlated so intersections are not all tiny
    for k in (1, 10, 100, 784):
        got = M.topk_intersection(m1, m2, k)
        a, b = m1.reshape(16, -1).numpy(), m2.reshape(16, -1).numpy()
        want = [len(set(np.argsort(-a[i])[:k]) & set(np.argsort(-b[i])[:k])) / k for i in range(16)]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    # flat (B, n) maps give the same result as (B, H, W)
    assert torch.equal(M.topk_intersection(m1, m2, 50), M.topk_intersection(m1.flatten(1), m2.flatten(1), 50))


def test_topk_tie_rule_smaller_index_first():
    m = torch.tensor([[1.0, 3.0, 1.0, 2.0, 3.0, 1.0, 0.0]])
    assert M.topk_indices(m, 4).tolist() == [[1, 4, 3, 0]]
    # brute force with the documented rule on heavy ties: key (-value, index)
    m1, m2 = _heavy_ties((8, 49), 6), _heavy_ties((8, 49), 7)
    for k in (5, 20, 40):
        got = M.topk_intersection(m1, m2, k).numpy()
        want = []
        for i in range(8):
            t1 = set(sorted(range(49), key=lambda j: (-m1[i, j].item(), j))[:k])
            t2 = set(sorted(range(49), key=lambda j: (-m2[i, j].item(), j))[:k])
            want.append(len(t1 & t2) / k)
        np.testing.assert_allclose(got, want, atol=1e-12)


# ----------------------------------------------------------------------------- Kendall / Spearman

@pytest.mark.parametrize("kind", ["continuous", "heavy_ties", "ties_one_side"])
def test_kendall_and_spearman_match_scipy(kind):
    if kind == "continuous":
        m1, m2 = _rand((16, 28, 28), 8), _rand((16, 28, 28), 9)
        m2 = m1 + 0.3 * m2
    elif kind == "heavy_ties":
        m1, m2 = _heavy_ties((16, 28, 28), 10), _heavy_ties((16, 28, 28), 11)
        m2 = m2 + (m1 > 1)  # tie structure in both, partly correlated
    else:
        m1, m2 = _heavy_ties((16, 28, 28), 12), _rand((16, 28, 28), 13)
    tau = M.kendall_tau(m1, m2)
    rho = M.spearman(m1, m2)
    assert tau.shape == rho.shape == (16,)
    np.testing.assert_allclose(tau.numpy(), _scipy_rows(stats.kendalltau, m1, m2), atol=1e-6, rtol=0)
    np.testing.assert_allclose(rho.numpy(), _scipy_rows(stats.spearmanr, m1, m2), atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("n", [1, 2, 3, 64, 65, 1000])
def test_kendall_any_length_and_dtype(n):
    # lengths that are and are not powers of two (the merge sort pads to 2^j with +inf)
    m1, m2 = _heavy_ties((3, n), 14 + n), _rand((3, n), 15 + n)
    m2[0] = m1[0] * 2 + 1                      # row 0: monotone transform, tau = 1 (or nan if constant)
    tau = M.kendall_tau(m1, m2)
    want = _scipy_rows(stats.kendalltau, m1, m2)
    np.testing.assert_allclose(tau.numpy(), want, atol=1e-12, equal_nan=True)
    out32 = M.kendall_tau(m1.float(), m2.float())
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), want, atol=1e-6, equal_nan=True)
    assert torch.equal(M.kendall_tau(m1.view(3, 1, n), m2.view(3, 1, n)).isnan(), tau.isnan())


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.integers(-2, 2), min_size=n, max_size=n))))
def test_kendall_spearman_property_vs_scipy(pair):
    # the map rule takes |g| (SPEC 1): the oracle sees the absolute values too
    pair = tuple([abs(float(v)) for v in p] for p in pair)
    a, b = (torch.tensor([v], dtype=torch.float64) for v in pair)
    ref_tau = stats.kendalltau(pair[0], pair[1])[0]
    ref_rho = stats.spearmanr(pair[0], pair[1])[0]
    tau, rho = M.kendall_tau(a, b).item(), M.spearman(a, b).item()
    if math.isnan(ref_tau):
        assert math.isnan(tau)
    else:
        assert tau == pytest.approx(ref_tau, abs=1e-9)
    if math.isnan(ref_rho):
        assert math.isnan(rho)
    else:
        assert rho == pytest.approx(ref_rho, abs=1e-9)


def test_rank_correlations_constant_map_is_nan():
    m1 = torch.zeros(2, 9)
    m2 = _rand((2, 9), 16, torch.float32)
    assert torch.isnan(M.kendall_tau(m1, m2)).all()
    assert torch.isnan(M.spearman(m1, m2)).all()
    assert torch.isnan(M.spearman(m2, m1)).all()


def test_average_ranks_match_scipy_rankdata():
    m = _heavy_ties((4, 30), 17)
    want = np.stack([stats.rankdata(r) for r in m.numpy()])
    np.testing.assert_array_equal(M.average_ranks(m).numpy(), want)


# ----------------------------------------------------------------------------- centre of mass

def test_center_of_mass_hand_computed():
    m = torch.zeros(3, 4, 5)
    m[0, 1, 2] = 2.0                        # single pixel -> (1, 2)
    m[1, 0, 0] = 1.0
    m[1, 3, 4] = 3.0                        # (0*1 + 3*3)/4, (0*1 + 4*3)/4 = (2.25, 3)
    m[2] = 1.0                              # uniform -> centre (1.5, 2)
    com = M.center_of_mass(m)
    np.testing.assert_allclose(com.numpy(), [[1, 2], [2.25, 3], [1.5, 2]], atol=1e-6)
    shift = M.center_of_mass_shift(m, m[[2, 0, 1]])
    want = [math.hypot(1 - 1.5, 2 - 2), math.hypot(2.25 - 1, 3 - 2), math.hypot(1.5 - 2.25, 2 - 3)]
    np.testing.assert_allclose(shift.numpy(), want, atol=1e-6)


def test_center_of_mass_zero_map_is_nan_and_flat_is_error():
    m = torch.zeros(1, 3, 3)
    assert torch.isnan(M.center_of_mass(m)).all()
    assert torch.isnan(M.center_of_mass_shift(m, torch.ones(1, 3, 3))).all()
    with pytest.raises(CertattrError, match="B,H,W"):
        M.center_of_mass_shift(torch.ones(2, 9), torch.ones(2, 9))
    with pytest.raises(CertattrError, match="B,H,W"):
        M.center_of_mass(torch.ones(2, 9))


# ----------------------------------------------------------------------------- LENS

def _one_hot_5x5(*pixels, values=None):
    m = torch.zeros(1, 5, 5, dtype=torch.float64)
    for n, (i, j) in enumerate(pixels):
        m[0, i, j] = 10.0 - n if values is None else values[n]
    return m


def test_lens_does_not_wrap_across_rows():
    a = _one_hot_5x5((1, 4))                # last pixel of row 1 (flat 9)
    b = _one_hot_5x5((2, 0))                # first pixel of row 2 (flat 10): flat neighbour, not spatial
    assert M.lens_recall(a, b, k=1, w=3).item() == 0.0
    assert M.lens_precision(a, b, k=1, w=3).item() == 0.0
    assert M.lens_recall(b, a, k=1, w=7).item() == 0.0   # col distance 4 > 3 even for w = 7
    c = _one_hot_5x5((2, 3))                # diagonal neighbour of (1, 4)
    assert M.lens_recall(a, c, k=1, w=3).item() == 1.0
    assert M.lens_precision(a, c, k=1, w=3).item() == 1.0


def test_lens_hand_made_5x5():
    # T_2(m1) = {(0,0), (4,4)} (corners: windows clipped at the border)
    m1 = _one_hot_5x5((0, 0), (4, 4))
    # T_2(m2) = {(1,1), (2,4)}: (1,1) in the 3x3 window of (0,0); (2,4) two rows from (4,4)
    m2 = _one_hot_5x5((1, 1), (2, 4))
    assert M.lens_recall(m1, m2, k=2, w=3).item() == 0.5
    assert M.lens_recall(m1, m2, k=2, w=5).item() == 1.0
    assert M.topk_intersection(m1, m2, 2).item() == 0.0
    # precision: T_2(m1) inside N_w(T_2(m2)): (0,0) near (1,1); (4,4) near (2,4) only for w >= 5
    assert M.lens_precision(m1, m2, k=2, w=3).item() == 0.5
    assert M.lens_precision(m1, m2, k=2, w=5).item() == 1.0
    # the dilation itself: (0,0) with w=5 covers rows 0..2 x cols 0..2 only
    d = M.window_dilate(M.topk_mask(_one_hot_5x5((0, 0)), 1), 5)[0]
    want = torch.zeros(5, 5, dtype=torch.bool)
    want[:3, :3] = True
    assert torch.equal(d, want)


def test_lens_w1_is_topk_and_precision_mirrors_recall():
    m1, m2 = _rand((16, 12, 10), 18), _rand((16, 12, 10), 19)
    assert torch.equal(M.lens_recall(m1, m2, 15, 1), M.topk_intersection(m1, m2, 15))
    for w in (3, 5, 7):
        r = M.lens_recall(m1, m2, 15, w)
        assert torch.equal(M.lens_precision(m2, m1, 15, w), r)
        assert (r >= M.topk_intersection(m1, m2, 15)).all()


def test_lens_matches_brute_force_windows():
    m1, m2 = _rand((4, 6, 7), 20), _rand((4, 6, 7), 21)
    k, w = 8, 5
    got = M.lens_recall(m1, m2, k, w).numpy()
    for b in range(4):
        t1 = [divmod(int(i), 7) for i in np.argsort(-m1[b].flatten().numpy())[:k]]
        t2 = [divmod(int(i), 7) for i in np.argsort(-m2[b].flatten().numpy())[:k]]
        hits = sum(any(abs(i - p) <= 2 and abs(j - q) <= 2 for p, q in t1) for i, j in t2)
        assert got[b] == hits / k


# ----------------------------------------------------------------------------- top-k-div

def test_topk_div_hand_made():
    m = torch.tensor([[[9.0, 8.0, 0.0, 0.0, 7.0],
                       [0.0, 0.0, 0.0, 0.0, 6.0],
                       [5.0, 0.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, 4.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0, 3.0]]])
    # 9 at (0,0) suppresses (0..1, 0..1) -> 8 gone; 7 at (0,4) suppresses 6 at (1,4);
    # 5 at (2,0); 4 at (3,2); 3 at (4,4)
    assert M.topk_div(m, 5, 3).tolist() == [[0, 4, 10, 17, 24]]
    assert M.topk_div(m, 3, 1).tolist() == [[0, 1, 4]]       # w = 1: plain top-k
    # row end (1,4) must not suppress the start of the next row (2,0)
    r = torch.zeros(1, 5, 5)
    r[0, 1, 4], r[0, 2, 0], r[0, 2, 1] = 3.0, 2.0, 1.0
    assert M.topk_div(r, 3, 3).tolist() == [[9, 10, 0]]
    # ties: the smaller flat index wins, batched rows are independent
    both = torch.cat([torch.ones(1, 5, 5), m])
    assert M.topk_div(both, 2, 3).tolist() == [[0, 2], [0, 4]]


def test_topk_div_runs_out_of_pixels():
    m = _rand((2, 5, 5), 22)
    assert M.topk_div(m, 1, 9).shape == (2, 1)              # any 9x9 window covers the 5x5 map
    with pytest.raises(CertattrError, match=r"only 1 pixels.*w=9.*k=2"):
        M.topk_div(m, 2, 9)
    c = torch.zeros(1, 5, 5)
    c[0, 0, 0] = 1.0                                         # corner pick: its 7x7 window leaves row/col 4
    assert M.topk_div(c, 2, 7).tolist() == [[0, 4]]
    idx = M.topk_div(m, 4, 3)                                # ceil(25 / 9) = 3 <= 4 picks fine here
    assert idx.dtype == torch.long and len(set(idx[0].tolist())) == 4


# ----------------------------------------------------------------------------- bundle and registry

def test_dissimilarities_identical_and_consistent():
    g = _rand((4, 3, 8, 8), 23) - 0.5
    d = M.dissimilarities(g, g.clone(), k=10)
    assert set(d) == {"euclidean", "cosine", "topk_intersection", "kendall", "spearman",
                      "center_of_mass_shift"}
    assert torch.equal(d["euclidean"], torch.zeros(4, dtype=g.dtype))
    for key in ("cosine", "topk_intersection", "kendall", "spearman"):
        np.testing.assert_allclose(d[key].numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(d["center_of_mass_shift"].numpy(), 0.0, atol=1e-12)
    g2 = _rand((4, 3, 8, 8), 24) - 0.5
    d = M.dissimilarities(g, g2, k=10)
    m1, m2 = attribution_map(g), attribution_map(g2)
    assert torch.equal(d["kendall"], M.kendall_tau(m1, m2))
    assert torch.equal(d["topk_intersection"], M.topk_intersection(m1, m2, 10))
    assert torch.equal(d["center_of_mass_shift"], M.center_of_mass_shift(m1.view(4, 8, 8), m2.view(4, 8, 8)))
    assert all(v.shape == (4,) for v in d.values())


def test_registry():
    assert M.get_metric("kendall") is M.kendall_tau
    m1, m2 = _rand((3, 6, 6), 25), _rand((3, 6, 6), 26)
    for name in M.METRICS:
        kw = {"k": 5} if name in ("topk_intersection", "lens_recall", "lens_precision") else {}
        assert M.get_metric(name)(m1, m2, **kw).shape == (3,)
    assert M.ON_MAPS <= set(M.METRICS) and M.SIMILARITIES <= set(M.METRICS)
    with pytest.raises(CertattrError, match="unknown metric 'nope'"):
        M.get_metric("nope")


# ----------------------------------------------------------------------------- errors

def test_validation_errors():
    a, b = _rand((2, 4, 4), 27), _rand((2, 4, 4), 28)
    with pytest.raises(CertattrError, match="same shape"):
        M.euclidean(a, b[:, :3])
    with pytest.raises(CertattrError, match="same shape"):
        M.kendall_tau(a, b.flatten(1))
    with pytest.raises(CertattrError, match="k must be >= 1"):
        M.topk_intersection(a, b, 0)
    with pytest.raises(CertattrError, match=r"k=17.*n=16"):
        M.topk_intersection(a, b, 17)
    with pytest.raises(CertattrError, match=r"k=17.*n=16"):
        M.lens_recall(a, b, 17, 3)
    with pytest.raises(CertattrError, match=r"k=17.*n=16"):
        M.topk_div(a, 17, 1)
    with pytest.raises(CertattrError, match=r"k=101.*n=16"):
        M.dissimilarities(a, b, k=101)
    with pytest.raises(CertattrError, match="integer"):
        M.topk_intersection(a, b, 2.5)
    bad = a.clone()
    bad[1, 2, 3] = float("nan")
    for fn in (M.euclidean, M.cosine_similarity, M.kendall_tau, M.spearman, M.center_of_mass_shift):
        with pytest.raises(CertattrError, match="NaN"):
            fn(a, bad)
    with pytest.raises(CertattrError, match="NaN"):
        M.topk_div(bad, 2, 3)
    for w in (0, 2, 4, -3):
        with pytest.raises(CertattrError, match="odd integer"):
            M.lens_precision(a, b, 2, w)
    with pytest.raises(CertattrError, match="B,H,W"):
        M.lens_recall(a.flatten(1), b.flatten(1), 2, 3)
    with pytest.raises(CertattrError, match="B,H,W"):
        M.topk_div(a.flatten(1), 2, 3)
    with pytest.raises(CertattrError, match="floating"):
        M.kendall_tau(a.long(), b.long())
    with pytest.raises(CertattrError, match="torch.Tensor"):
        M.euclidean(a.numpy(), b)
    with pytest.raises(CertattrError, match="batched"):
        M.euclidean(torch.ones(3), torch.ones(3))
    with pytest.raises(CertattrError, match="dimensions"):
        M.spearman(torch.ones(2, 1, 3, 4, 4), torch.ones(2, 1, 3, 4, 4))
    with pytest.raises(CertattrError, match="dimensions"):
        M.dissimilarities(a.reshape(2, 1, 1, 4, 4), b.reshape(2, 1, 1, 4, 4))
