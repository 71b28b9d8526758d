"""Float64 numpy references for the pruning tests (independent of jaxq's code)."""

from __future__ import annotations

import numpy as np


def correlated(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Activations with correlated channels of unequal scale (as a transformer's are)."""
    mix = rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(n, k)) @ mix + 0.3 * rng.normal(size=(n, k))
    return (x * rng.uniform(0.2, 3.0, size=k)).astype(np.float32)


def keep_lowest_dropped(scores: np.ndarray, drop: int) -> np.ndarray:
    """Keep mask of a flat score vector with the ``drop`` lowest removed (stable ties)."""
    order = np.argsort(scores, kind="stable")
    keep = np.ones(scores.shape, bool)
    keep[order[:drop]] = False
    return keep


def nm_keep(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` highest of every ``m`` along the last axis (stable: earlier kept)."""
    out = np.zeros(scores.shape, bool)
    flat_s = scores.reshape(-1, m)
    flat_o = out.reshape(-1, m)
    for r in range(flat_s.shape[0]):
        order = np.argsort(-flat_s[r], kind="stable")
        flat_o[r, order[:n]] = True
    return out


def sparsegpt64(w: np.ndarray, h: np.ndarray, *, sparsity: float = 0.5,
                nm: tuple[int, int] | None = None, block: int = 32, damp: float = 0.01):
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1) in float64, column by column, with
    the conventions of jaxq's sweep: the upper Cholesky factor U of the damped H⁻¹, the mask
    chosen per block (unstructured: the floor(sparsity·numel) lowest w²/U_jj²) or per group of
    M columns. Returns (pruned weight, keep mask)."""
    w = w.astype(np.float64).copy()
    h = h.astype(np.float64)
    out, k = w.shape
    h = h + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    keep = np.ones((out, k), bool)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        if nm is None:
            score = w1 ** 2 / np.diag(u1)[None, :] ** 2
            keep[:, i1:i2] = keep_lowest_dropped(score.ravel(), int(sparsity * score.size)
                                                 ).reshape(score.shape)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                seg = w1[:, i:i + nm[1]] ** 2 / np.diag(u1)[i:i + nm[1]][None, :] ** 2
                keep[:, i1 + i:i1 + i + nm[1]] = nm_keep(seg, *nm)
            q = np.where(keep[:, i1 + i], w1[:, i], 0.0)
            e = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return np.where(keep, w, 0.0), keep
