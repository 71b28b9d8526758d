"""Masks against numpy references: magnitude (per layer), Wanda (per row), N:M."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _ref import keep_lowest_dropped, nm_keep

from jaxq.prune import magnitude_mask, nm_mask, unstructured_mask, wanda_mask


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 8), (1, 2)])
def test_nm_mask_matches_numpy(n, m):
    s = np.random.default_rng(n * 10 + m).normal(size=(6, 8 * m)).astype(np.float32)
    got = np.asarray(nm_mask(jnp.asarray(s), n, m))
    np.testing.assert_array_equal(got, nm_keep(s, n, m))
    assert (got.reshape(6, -1, m).sum(-1) == n).all()


def test_nm_mask_rejects_width():
    with pytest.raises(ValueError, match="multiple of M=4"):
        nm_mask(jnp.ones((2, 6)), 2, 4)


def test_magnitude_mask_is_layerwise():
    w = np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32)
    got = np.asarray(magnitude_mask(jnp.asarray(w), 0.6))
    ref = keep_lowest_dropped(np.abs(w).ravel(), int(0.6 * w.size)).reshape(w.shape)
    np.testing.assert_array_equal(got, ref)
    # layer-wise, not per row: the rows keep different counts here
    assert len(set(got.sum(1))) > 1
    np.testing.assert_array_equal(np.asarray(magnitude_mask(jnp.asarray(w), 0.5, "2:4")),
                                  nm_keep(np.abs(w), 2, 4))


def test_wanda_mask_compares_within_rows():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 32)).astype(np.float32)
    xn = rng.uniform(0.1, 5.0, size=32).astype(np.float32)
    got = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray(xn), 0.5))
    score = np.abs(w) * xn[None, :]
    ref = np.stack([keep_lowest_dropped(r, 16) for r in score])
    np.testing.assert_array_equal(got, ref)
    assert (got.sum(1) == 16).all()
    np.testing.assert_array_equal(
        np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray(xn), pattern="4:8")),
        nm_keep(score, 4, 8))
    # a broken Wanda that ignores the norms would be magnitude, which differs here
    assert (got != np.asarray(unstructured_mask(jnp.abs(jnp.asarray(w)), 0.5, True))).any()


def test_nm_mask_ties_keep_the_earlier_entry():
    s = np.round(np.random.default_rng(3).random((5, 32)) * 2).astype(np.float32)  # 0, 1, 2
    got = np.asarray(nm_mask(jnp.asarray(s), 2, 4))
    np.testing.assert_array_equal(got, nm_keep(s, 2, 4))
