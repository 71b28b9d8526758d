"""The shared OBS machinery: the inverse Cholesky factor and the sweep's invariants."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.core import hessian


def _h(rng, k, n=512):
    x = rng.normal(size=(n, k)) @ rng.normal(size=(k, k)) / np.sqrt(k)
    return (x.T @ x).astype(np.float32)


def test_prepare_factor_is_upper_cholesky_of_damped_inverse():
    rng = np.random.default_rng(0)
    h = _h(rng, 40)
    h[:, 7] = h[7, :] = 0.0  # a dead input
    w = rng.normal(size=(6, 40)).astype(np.float32)
    wp, u, _, _, ok = hessian.prepare(jnp.asarray(w), jnp.asarray(h), jnp.float32(0.01),
                                      block=16)
    assert bool(ok) and wp.shape == (6, 48) and u.shape == (48, 48)
    ref = h.astype(np.float64).copy()
    ref[7, 7] = 1.0
    ref += 0.01 * np.mean(np.diag(ref)) * np.eye(40)
    u = np.asarray(u, np.float64)
    assert np.allclose(np.tril(u, -1), 0.0)
    np.testing.assert_allclose(u[:40, :40].T @ u[:40, :40], np.linalg.inv(ref), rtol=2e-3,
                               atol=1e-6 * np.abs(np.linalg.inv(ref)).max())
    np.testing.assert_allclose(u[40:, 40:], np.eye(8), atol=1e-6)  # padding is decoupled
    assert (np.asarray(wp)[:, 7] == 0).all() and (np.asarray(wp)[:, 40:] == 0).all()


def test_factor_names_the_layer_when_cholesky_fails():
    h = -np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="layers/3/fc"), pytest.warns(RuntimeWarning):
        hessian.factor(jnp.ones((2, 8)), jnp.asarray(h), damp=0.01, block=8, max_retries=1,
                       name="layers/3/fc", method="SparseGPT")


def test_sweep_without_pruning_is_identity_and_loss_is_output_error():
    rng = np.random.default_rng(1)
    h = _h(rng, 32)
    w = rng.normal(size=(5, 32)).astype(np.float32)
    wp, u, _, _, _ = hessian.prepare(jnp.asarray(w), jnp.asarray(h), jnp.float32(0.0),
                                     block=16)
    none = jnp.zeros((5, 32), bool)
    out = hessian.obs_sweep(wp, u, none, k=32, block=16, mode="fixed")
    np.testing.assert_allclose(np.asarray(out[0]), w, atol=1e-5)
    assert float(out[-1]) == pytest.approx(0.0, abs=1e-6)
    # pruning a fixed mask: the sweep's loss is ½ tr(ΔW H ΔWᵀ) of what it returns
    mask = jnp.asarray(rng.random((5, 32)) < 0.5)
    wq, _, _, _, pruned, loss = hessian.obs_sweep(wp, u, mask, k=32, block=16, mode="fixed")
    d = w.astype(np.float64) - np.asarray(wq, np.float64)
    assert (np.asarray(pruned) == np.asarray(mask)).all()
    assert (np.asarray(wq)[np.asarray(mask)] == 0).all()
    assert float(loss) == pytest.approx(0.5 * np.trace(d @ h.astype(np.float64) @ d.T),
                                        rel=1e-3)


def test_sweep_block():
    assert hessian.sweep_block(128, 4, 64) == 128
    assert hessian.sweep_block(100, 8) == 96
    assert hessian.sweep_block(16, 64) == 64


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_masked_refit_reaches_the_per_row_least_squares_optimum(pattern):
    """Against a float64 solve of each row on its kept inputs (``H_SS ŵ_S = (H w)_S``): the
    refit's output error matches it, is below SparseGPT's on the same mask, and every pruned
    weight is exactly zero."""
    from jaxq.prune import sparsegpt_prune

    rng = np.random.default_rng(1)
    k, out = 64, 12
    h = _h(rng, k)
    w = rng.normal(size=(out, k)).astype(np.float32)
    res = sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), sparsity=0.5, pattern=pattern,
                          blocksize=16)
    keep = np.asarray(res["keep"])
    ref, refit_loss = hessian.masked_refit(jnp.asarray(w), jnp.asarray(h), res["keep"],
                                           res["w"], jnp.float32(0.01))
    hd = h.astype(np.float64) + 0.01 * np.mean(np.diag(h)) * np.eye(k)
    err = lambda v: float(np.einsum("ij,jk,ik->", v - w, hd, v - w)) / 2  # noqa: E731
    exact = np.zeros((out, k))
    for i in range(out):
        s = keep[i]
        exact[i, s] = np.linalg.solve(hd[np.ix_(s, s)], (hd @ w[i].astype(np.float64))[s])
    ref = np.asarray(ref, np.float64)
    assert (ref[~keep] == 0).all()
    assert err(ref) <= err(exact) * (1 + 5e-3)  # 20 iterations: near, not at, the optimum
    assert err(ref) < 0.95 * err(np.asarray(res["w"], np.float64))
    np.testing.assert_allclose(float(refit_loss), err(ref), rtol=1e-3)
    refit = sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), sparsity=0.5, pattern=pattern,
                            blocksize=16, refit=20)
    np.testing.assert_allclose(np.asarray(refit["w"]), ref, atol=1e-5)
    with pytest.raises(ValueError, match="fc: refit applies to pruning alone"):
        sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), bits=4, group_size=16, refit=40,
                        name="fc")


@pytest.mark.parametrize("seed", range(4))
def test_lowest_is_a_stable_argsort_selection(seed):
    """The sweep's unstructured mask (bisection over float bits) equals numpy's stable argsort
    selection of the idx lowest scores, ties broken by row-major position, inf included."""
    rng = np.random.default_rng(seed)
    score = np.round(rng.random((24, 16)) * 8).astype(np.float32) ** 2  # many ties, zeros
    score[:, -3:] = np.inf  # padding columns
    for idx in (0, 1, 7, 100, 191, 24 * 13):
        want = np.zeros(score.size, bool)
        want[np.argsort(score.reshape(-1), kind="stable")[:idx]] = True
        got = np.asarray(hessian._lowest(jnp.asarray(score), jnp.int32(idx)))
        np.testing.assert_array_equal(got.reshape(-1), want, err_msg=f"idx={idx}")
