"""Low-rank leaves, activation-aware truncation, rank allocation and low-rank correction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.lowrank import LowRank, LowRankSVD, QuantLowRank, QuantLowRankCorrection, allocate_ranks
from jaxq.lowrank.svd import dense_cap, lowrank_factor, ratio_rank
from jaxq.quant.gptq import GPTQ
from jaxq.quant.rtn import RTN


def correlated(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Activations with a decaying spectrum and correlated channels (like an LLM's)."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * (0.85 ** np.arange(k))[:, None]
    return (rng.normal(size=(n, k)) @ mix + 0.05 * rng.normal(size=(n, k))).astype(np.float32)


def weight(out: int, k: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(out, k)).astype(np.float32)


def out_err(w: np.ndarray, w_hat: np.ndarray, x: np.ndarray) -> float:
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum((x.astype(np.float64) @ d.T) ** 2))


@pytest.mark.parametrize("axis", [-1, -2])
def test_leaf_matmul_and_materialize_match_dense(axis):
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(24, 5)), rng.normal(size=(5, 40))
    dense = u @ v if axis == -1 else (u @ v).T
    leaf = LowRank(u=jnp.asarray(u, jnp.float32), v=jnp.asarray(v, jnp.float32),
                   logical_shape=dense.shape, axis=axis)
    x = rng.normal(size=(3, 7, 40)).astype(np.float32)
    np.testing.assert_allclose(leaf.materialize(), dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(leaf.matmul(jnp.asarray(x)), x @ (u @ v).T, rtol=1e-4,
                               atol=1e-4)
    assert leaf.kind == "low-rank" and leaf.nbytes == 4 * 5 * (24 + 40)
    fn = (lambda p, x: x @ p["w"].T) if axis == -1 else (lambda p, x: x @ p["w"])
    y = jaxq.apply(fn)({"w": leaf}, jnp.asarray(x))
    np.testing.assert_allclose(y, x @ (u @ v).T, rtol=1e-4, atol=1e-4)


def test_bad_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="2-D"):
        LowRank(u=jnp.ones((2, 1)), v=jnp.ones((1, 3)), logical_shape=(2, 3, 4))
    with pytest.raises(ValueError, match="fc/weight.*gram"):
        LowRankSVD(variant="svd-llm", ratio=0.5).transform_leaf(
            "fc/weight", jnp.ones((8, 8)), axis=-1, stats={})


@pytest.mark.parametrize("axis", [-1, -2])
def test_svd_llm_truncation_error_is_the_discarded_spectrum(axis):
    x = correlated(1024, 48)
    w = weight(32, 48)
    gram = x.astype(np.float64).T @ x
    rank = 12
    leaf_w = w if axis == -1 else w.T
    lr = lowrank_factor(jnp.asarray(leaf_w), axis=axis, method="svd-llm", rank=rank,
                        stats={"gram": jnp.asarray(gram, jnp.float32)}, damp=0.0)
    w_hat = np.asarray(lr.materialize())
    w_hat = w_hat if axis == -1 else w_hat.T
    s = np.linalg.cholesky(gram)
    sv = np.linalg.svd(w.astype(np.float64) @ s, compute_uv=False)
    expect = float(np.sum(sv[rank:] ** 2))
    got = out_err(w, w_hat, x)
    assert got == pytest.approx(expect, rel=2e-3)
    plain = lowrank_factor(jnp.asarray(leaf_w), axis=axis, method="plain", rank=rank)
    p_hat = np.asarray(plain.materialize())
    p_hat = p_hat if axis == -1 else p_hat.T
    assert got < 0.5 * out_err(w, p_hat, x)  # whitening wins by a margin on correlated inputs


def test_asvd_beats_plain_on_scaled_channels():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(1024, 64)) * np.exp(rng.normal(size=64) * 1.5)).astype(np.float32)
    w = weight(48, 64)
    stats = {"mean_abs": jnp.asarray(np.abs(x).mean(0))}
    a = lowrank_factor(jnp.asarray(w), axis=-1, method="asvd", rank=16, stats=stats)
    p = lowrank_factor(jnp.asarray(w), axis=-1, method="plain", rank=16)
    assert out_err(w, a.materialize(), x) < 0.7 * out_err(w, p.materialize(), x)


def test_ratio_ranks_and_dense_fallback():
    assert ratio_rank(576, 576, 0.8) == 230
    assert ratio_rank(64, 64, 1.0) is None  # not smaller than dense: stays dense
    params = {"fc": {"weight": jnp.ones((64, 64))}, "small": {"weight": jnp.ones((2, 64))}}
    out = LowRankSVD(variant="plain", ratio=0.5)(params)
    assert isinstance(out["fc"]["weight"], LowRank) and out["fc"]["weight"].rank == 16
    assert not isinstance(out["small"]["weight"], LowRank)  # rank 0 at 50%: kept dense


def test_allocation_respects_budget_exactly_and_beats_uniform():
    k = 64
    decay = np.exp(-np.arange(k) / 3.0)  # energy in a few directions
    flat = np.linspace(1.0, 0.8, k)  # energy everywhere
    spectra = {"a": decay, "b": flat, "c": np.sqrt(decay * flat)}
    shapes = {p: (k, k) for p in spectra}
    budget = 0.4
    ranks = allocate_ranks(spectra, shapes, budget)
    allowed = budget * 3 * k * k
    used = sum(r * 2 * k for r in ranks.values())
    assert used <= allowed and allowed - used < 2 * k  # no further increment fits
    assert all(r <= dense_cap(k, k) for r in ranks.values())

    def kept(rs):  # normalised retained energy, summed over layers
        return sum(np.sum(spectra[p][:rs[p]] ** 2) / np.sum(spectra[p] ** 2) for p in spectra)

    uniform = {p: ratio_rank(k, k, budget) for p in spectra}
    assert kept(ranks) > kept(uniform) + 0.1
    cap = dense_cap(k, k)  # against the best allocation within the budget, by brute force
    grid = np.stack(np.meshgrid(*[np.arange(cap + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    grid = grid[grid.sum(1) * 2 * k <= allowed]
    cum = {p: np.concatenate([[0], np.cumsum(spectra[p] ** 2) / np.sum(spectra[p] ** 2)])
           for p in spectra}
    best = max(cum["a"][a] + cum["b"][b] + cum["c"][c] for a, b, c in grid)
    assert kept(ranks) >= best - 1e-9
    assert ranks["a"] < uniform["a"] < ranks["b"]


def test_budget_transform_on_a_tree():
    x = correlated(512, 64)
    rng = np.random.default_rng(5)
    params = {f"l{i}": {"weight": jnp.asarray(
        rng.normal(size=(64, 8)) @ rng.normal(size=(8, 64)) * (i + 1)
        + 0.1 * rng.normal(size=(64, 64)), jnp.float32)} for i in range(3)}
    stats = {f"l{i}/weight": {"gram": jnp.asarray(x.T @ x)} for i in range(3)}
    t = LowRankSVD(variant="svd-llm", budget=0.3)
    out = t(params, stats=stats)
    used = sum(out[f"l{i}"]["weight"].rank * 128 for i in range(3))
    assert used <= 0.3 * 3 * 64 * 64
    with pytest.raises(ValueError, match="whole model"):
        t.apply_leaf("l0/weight", params["l0"]["weight"], axis=-1, stats=stats["l0/weight"])


def test_chain_with_rtn_quantizes_factors_runs_and_saves(tmp_path):
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(64, 16)) @ rng.normal(size=(16, 128))).astype(np.float32)
    params = {"fc": {"weight": jnp.asarray(w)}}
    t = jaxq.chain(LowRankSVD(variant="plain", ratio=0.375), RTN(bits=8, group_size=16))
    out = t(params)
    leaf = out["fc"]["weight"]
    assert isinstance(leaf, LowRank) and leaf.rank == 16
    assert isinstance(leaf.u, jaxq.QArray) and isinstance(leaf.v, jaxq.QArray)
    assert leaf.nbytes < 16 * (64 + 128) * 2  # 8-bit factors: under float16's bytes
    x = jnp.asarray(rng.normal(size=(5, 128)), jnp.float32)
    y = jaxq.apply(lambda p, x: x @ p["fc"]["weight"].T)(out, x)
    np.testing.assert_allclose(y, np.asarray(x) @ w.T, rtol=0.05, atol=0.05 * np.abs(w).max())
    jaxq.save(tmp_path / "m", out)
    back, _ = jaxq.load(tmp_path / "m")
    np.testing.assert_array_equal(back["fc"]["weight"].materialize(), leaf.materialize())
    assert isinstance(back["fc"]["weight"].u, jaxq.QArray)


@pytest.mark.parametrize("quantizer", [RTN(bits=3, group_size=32),
                                       GPTQ(bits=3, group_size=32)])
def test_correction_reduces_output_error(quantizer, tmp_path):
    x = correlated(1024, 128)
    w = weight(64, 128)
    stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x)}}
    params = {"fc": {"weight": jnp.asarray(w)}}
    base = quantizer(params, stats=stats)["fc"]["weight"]
    t = QuantLowRankCorrection(quantizer=quantizer, rank=8, rounds=2)
    out = t(params, stats=stats)
    leaf = out["fc"]["weight"]
    assert isinstance(leaf, QuantLowRank) and leaf.rank == 8
    e0 = out_err(w, base.materialize(), x)
    e1 = out_err(w, leaf.materialize(), x)
    assert e1 < 0.6 * e0
    xs = jnp.asarray(x[:4])
    y = jaxq.apply(lambda p, x: x @ p["fc"]["weight"].T)(out, xs)
    np.testing.assert_allclose(y, xs @ leaf.materialize().T, rtol=1e-4, atol=1e-3)
    jaxq.save(tmp_path / "m", out)
    back, _ = jaxq.load(tmp_path / "m")
    np.testing.assert_array_equal(back["fc"]["weight"].materialize(), leaf.materialize())


def test_correction_rank_from_bits_budget():
    x = correlated(256, 128)
    params = {"fc": {"weight": jnp.asarray(weight(128, 128))}}
    stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x)}}
    leaf = QuantLowRankCorrection(quantizer=RTN(bits=3, group_size=64), extra_bpw=0.5)(
        params, stats=stats)["fc"]["weight"]
    assert leaf.rank == 2  # 0.5 bit x 128² / (16 bit x 256)
    lr_bits = 8 * (leaf.u.nbytes + leaf.v.nbytes) / (128 * 128)
    assert lr_bits <= 0.5 and leaf.bits_per_weight == pytest.approx(
        leaf.q.bits_per_weight + lr_bits)
    assert jax.tree.leaves(leaf)  # a pytree with children


def test_sequential_calibration_compresses_every_site():
    rng = np.random.default_rng(0)
    params = {"a": {"weight": jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)},
              "b": {"weight": jnp.asarray(rng.normal(size=(32, 64)) / 8, jnp.float32)}}

    def fn(p, x):
        return jax.nn.relu(x @ p["a"]["weight"].T) @ p["b"]["weight"].T

    batches = [(jnp.asarray(rng.normal(size=(16, 32)), jnp.float32),) for _ in range(2)]
    for t, cls in [(LowRankSVD(variant="svd-llm", ratio=0.5), LowRank),
                   (QuantLowRankCorrection(quantizer=RTN(bits=3, group_size=32), rank=4),
                    QuantLowRank)]:
        q, _ = jaxq.calibrate(fn, params, batches, t, progress=False)
        assert isinstance(q["a"]["weight"], cls) and isinstance(q["b"]["weight"], cls)
        y = jaxq.apply(fn)(q, batches[0][0])
        assert y.shape == (16, 32) and bool(jnp.all(jnp.isfinite(y)))
