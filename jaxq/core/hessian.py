"""The second-order (OBS) machinery that GPTQ and SparseGPT share.

Both minimise the layer output error ``||(W - Ŵ) X||²`` = ``tr(ΔW H ΔWᵀ)`` with ``H = XᵀX``
by fixing one input column at a time and pushing its error ``(w_j - ŵ_j) / U_jj`` onto the
columns not yet fixed through the row ``U_j`` of the upper Cholesky factor of ``H⁻¹``
(``UᵀU = H⁻¹``), in blocks with one lazy matmul per block (Frantar et al., GPTQ and SparseGPT).

* :func:`prepare`: dead inputs, optional act-order, damping, padding to whole blocks, and ``U``
  from one Cholesky of the reversed ``H`` and one triangular inverse (``H⁻¹`` is never formed);
* :func:`factor`: :func:`prepare` with the damping retried ten-fold at the Python level and a
  clear error naming the layer when every retry fails;
* :func:`obs_sweep`: the blocked column sweep where each column is either *pruned* (set to
  exactly 0) or kept (and, with ``bits``, rounded to its group's affine grid). The pruning mask
  is chosen in the sweep (unstructured: per block of columns by ``w² / U_jj²``; N:M: per group
  of M columns) or given (``mask``: a pruned layer quantized with its mask kept exactly). GPTQ
  without a mask keeps its own sweep (act-order, static groups and clip search live there).
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.core import formats
from jaxq.core.sparse import nm_mask

_HI = lax.Precision.HIGHEST


def check_problem(w: Any, h: Any, name: str, fn: str) -> tuple[jax.Array, int, int]:
    """``(w, out, k)`` for a 2-D ``(out, in)`` weight and its ``(in, in)`` Hessian, or a clear
    error naming the layer and the function ``fn`` that was called."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: {fn} takes a 2-D (out, in) weight, got {w.shape}")
    out, k = w.shape
    if tuple(jnp.shape(h)) != (k, k):
        raise ValueError(f"{name}: Hessian shape {tuple(jnp.shape(h))} does not match the "
                         f"weight's {k} input features")
    return w, out, k


@partial(jax.jit, static_argnames=("act_order", "block"))
def prepare(w: jax.Array, h: jax.Array, damp: jax.Array, *, act_order: bool = False,
            block: int = 128):
    """Dead columns, ordering, damping, padding and ``U`` (upper, ``UᵀU = H⁻¹``).

    Returns ``(w [out, kp], U [kp, kp], perm [k], diag H in sweep order [k], ok)``; ``kp`` is
    ``k`` rounded up to a whole number of blocks (padded columns are zero weights with an
    identity block of ``H``, decoupled from the rest).
    """
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    k = w.shape[1]
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[None, :], 0.0, w)
    diag = jnp.diag(h)
    perm = jnp.argsort(-diag, stable=True) if act_order else jnp.arange(k)
    if act_order:
        w = w[:, perm]
        h = h[perm][:, perm]
    h = h + damp * jnp.mean(diag) * jnp.eye(k, dtype=jnp.float32)
    kp = -(-k // block) * block
    if kp > k:
        w = jnp.pad(w, ((0, 0), (0, kp - k)))
        h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag(
            (jnp.arange(kp) >= k).astype(jnp.float32))
    # H = R Rᵀ with R = J M J upper (M = chol(J H J), J the reversal), so H⁻¹ = R⁻ᵀ R⁻¹ and
    # U = R⁻¹ = J M⁻¹ J is the upper Cholesky factor of H⁻¹.
    m = jnp.linalg.cholesky(h[::-1, ::-1])
    u = tri_inv_lower(m)[::-1, ::-1]
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diag(u) > 0)
    return w, u, perm, diag[perm], ok


def tri_inv_lower(m: jax.Array, base: int = 512) -> jax.Array:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (``n³/3`` flops, against
    ``n³`` for a triangular solve with the identity)."""
    n = m.shape[0]
    if n <= base:
        return jax.scipy.linalg.solve_triangular(m, jnp.eye(n, dtype=m.dtype), lower=True)
    h = n // 2
    a_inv = tri_inv_lower(m[:h, :h], base)
    d_inv = tri_inv_lower(m[h:, h:], base)
    c = -jnp.dot(d_inv, jnp.dot(m[h:, :h], a_inv, precision=_HI), precision=_HI)
    top = jnp.concatenate([a_inv, jnp.zeros((h, n - h), m.dtype)], axis=1)
    return jnp.concatenate([top, jnp.concatenate([c, d_inv], axis=1)], axis=0)


def factor(w: jax.Array, h: jax.Array, *, damp: float, block: int, act_order: bool = False,
           max_retries: int = 4, name: str = "tensor", method: str = "GPTQ"):
    """:func:`prepare`, raising the damping ten-fold (from at least 1e-3) while the Cholesky
    factorization fails, with a warning each time; then a ``ValueError`` naming ``name``."""
    d = float(damp)
    for attempt in range(max_retries + 1):
        out = prepare(w, h, jnp.float32(d), act_order=act_order, block=block)
        if bool(out[-1]):
            return out
        if attempt == max_retries:
            raise ValueError(
                f"{name}: {method} Cholesky factorization failed (Hessian not positive "
                f"definite) even with damping {d:g} x mean(diag H); check the calibration "
                "statistics (NaN/Inf activations, or too few samples) or skip this layer with "
                "where=")
        d = max(d, 1e-3) * 10.0
        warnings.warn(f"{name}: {method} Hessian not positive definite; retrying with "
                      f"damp={d:g}", RuntimeWarning, stacklevel=3)
    raise AssertionError("unreachable")


def sweep_block(block: int, *multiples: int) -> int:
    """``block`` rounded to a multiple of every one of ``multiples`` (N:M groups, quant
    groups), so that a group never straddles two blocks."""
    lcm = math.lcm(*multiples) if multiples else 1
    return max(lcm, (block // lcm) * lcm)


def _lowest(score: jax.Array, idx: jax.Array) -> jax.Array:
    """The mask of exactly ``idx`` lowest entries of the non-negative ``score`` (ties: the
    earlier position in row-major order).

    The threshold is the ``idx``-th smallest value, found by bisection over its float32 bit
    pattern (monotone for non-negative floats and +inf): 32 counting passes, no sort, which on
    a CPU costs a small fraction of sorting the block.
    """
    flat = lax.bitcast_convert_type(score.reshape(-1), jnp.uint32)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(flat <= mid) >= idx
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    _, t = lax.fori_loop(0, 32, halve, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    below = flat < t
    ties = flat == t
    mask = below | (ties & (jnp.cumsum(ties) <= idx - jnp.sum(below)))
    return (mask & (idx > 0)).reshape(score.shape)

def _masked_params(wg: jax.Array, pruned: jax.Array, *, bits: int, symmetric: bool,
                   scale_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Per-row affine scale/bias ``[out]`` of one group from its *kept* weights only (pruned
    entries are replaced by the midpoint of the kept range, which moves neither edge)."""
    big = jnp.float32(3e38)
    hi = jnp.max(jnp.where(pruned, -big, wg), axis=-1, keepdims=True)
    lo = jnp.min(jnp.where(pruned, big, wg), axis=-1, keepdims=True)
    mid = jnp.where(hi >= lo, (hi + lo) / 2, 0.0)
    s, b = formats.affine_params(jnp.where(pruned, mid, wg), bits, symmetric, (-1,))
    s = s.astype(scale_dtype).astype(jnp.float32)[:, 0]
    b = b.astype(scale_dtype).astype(jnp.float32)[:, 0]
    return s, b


@partial(jax.jit, static_argnames=("k", "block", "mode", "sparsity", "n", "m", "bits", "gs",
                                   "symmetric", "scale_dtype"))
def obs_sweep(w: jax.Array, u: jax.Array, mask: jax.Array | None = None, *, k: int, block: int,
              mode: str, sparsity: float = 0.0, n: int = 0, m: int = 1, bits: int | None = None,
              gs: int = 0, symmetric: bool = False, scale_dtype: Any = jnp.float32):
    """Prune (and optionally quantize) ``w[out, kp]`` column by column with OBS updates.

    ``mode``: ``"unstructured"`` (in each block, the ``floor(sparsity · out · cols)`` lowest
    ``w² / U_jj²`` of the block's real columns, taken when the sweep reaches the block),
    ``"nm"`` (the ``m - n`` lowest of every ``m`` columns of a row, taken when the sweep reaches
    the group) or ``"fixed"`` (``mask[out, kp]``, True = pruned). With ``bits`` the kept
    weights are rounded to their group's affine grid, the group's parameters taken from its
    kept (already updated) weights when the sweep reaches it (for N:M, from the mask the
    group's current weights would get). ``block`` must be a multiple of ``m`` and ``gs``.

    Returns ``(ŵ [out, k] float32 with exact zeros where pruned, codes uint32 [out, k] (0
    where pruned or without bits), scales, biases [out, k // gs] (or [out, 1]), pruned bool
    [out, k], loss Σ err² / 2)``.
    """
    out, kp = w.shape
    n_blocks = kp // block
    quant = bits is not None
    maxq = 2 ** (bits or 1) - 1
    ngp = -(-kp // gs) if quant else 1
    dcol = jnp.diag(u)
    real = jnp.arange(kp) < k
    if mask is None:
        mask = jnp.zeros((out, kp), bool)

    def block_body(bi, carry, c0):
        wf, wq, codes, pruned, scales, biases, loss = carry
        i1 = bi * block
        w1 = lax.dynamic_slice_in_dim(wf, i1, block, axis=1)
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))
        d1 = lax.dynamic_slice_in_dim(dcol, i1, block)
        real1 = lax.dynamic_slice_in_dim(real, i1, block)
        if mode == "unstructured":
            score = jnp.where(real1[None, :], w1 * w1 / (d1 * d1)[None, :], jnp.inf)
            count = (jnp.sum(real1) * out).astype(jnp.float32)
            idx = jnp.floor(count * sparsity).astype(jnp.int32)
            p1 = _lowest(score, idx)
        else:
            p1 = lax.dynamic_slice_in_dim(mask, i1, block, axis=1)

        def col_body(i, c):
            w1, q1, c1, p1, e1, scales, biases, loss, cur = c
            j = i1 + i
            if quant:
                def params():
                    wg = lax.dynamic_slice_in_dim(w1, i, gs, axis=1)
                    if mode == "nm":
                        dg = lax.dynamic_slice_in_dim(d1, i, gs)
                        pg = ~nm_mask(wg * wg / (dg * dg)[None, :], n, m)
                    else:
                        pg = lax.dynamic_slice_in_dim(p1, i, gs, axis=1)
                    return _masked_params(wg, pg, bits=bits, symmetric=symmetric,
                                          scale_dtype=scale_dtype)

                cur = lax.cond(j % gs == 0, params, lambda: cur)
                s, b = cur
                scales = lax.dynamic_update_index_in_dim(scales, s, j // gs, axis=1)
                biases = lax.dynamic_update_index_in_dim(biases, b, j // gs, axis=1)
            wc = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            pc = lax.dynamic_index_in_dim(p1, i, axis=1, keepdims=False)
            if quant:
                code = jnp.clip(jnp.round(formats.exact_div(wc - b, s)), 0, maxq)
                q = jnp.where(pc, 0.0, code * s + b)
                code = jnp.where(pc, 0.0, code)
                q1 = lax.dynamic_update_index_in_dim(q1, q, i, axis=1)
                c1 = lax.dynamic_update_index_in_dim(c1, code.astype(jnp.uint8), i, axis=1)
            else:  # a kept column is final as it is: w1 holds it after the loop
                q = jnp.where(pc, 0.0, wc)
            err = (wc - q) / u1[i, i]
            w1 = w1 - err[:, None] * u1[i][None, :]  # U is upper: only columns >= i move
            e1 = lax.dynamic_update_index_in_dim(e1, err, i, axis=1)
            loss = loss + jnp.where(j < k, jnp.sum(err * err), 0.0) / 2
            return w1, q1, c1, p1, e1, scales, biases, loss, cur

        def group_body(g, c):
            """N:M: the group's mask from its current weights, then its m columns."""
            w1, p1 = c[0], c[3]
            i0 = g * m
            wg = lax.dynamic_slice_in_dim(w1, i0, m, axis=1)
            dg = lax.dynamic_slice_in_dim(d1, i0, m)
            p1 = lax.dynamic_update_slice_in_dim(
                p1, ~nm_mask(wg * wg / (dg * dg)[None, :], n, m), i0, axis=1)
            return lax.fori_loop(i0, i0 + m, col_body, (*c[:3], p1, *c[4:]))

        init = (w1, jnp.zeros((out, block), jnp.float32), jnp.zeros((out, block), jnp.uint8),
                p1, jnp.zeros((out, block), jnp.float32), scales, biases, loss,
                (jnp.ones((out,), jnp.float32), jnp.zeros((out,), jnp.float32)))
        if mode == "nm":
            w1, q1, c1, p1, e1, scales, biases, loss, _ = lax.fori_loop(
                0, block // m, group_body, init)
        else:
            w1, q1, c1, p1, e1, scales, biases, loss, _ = lax.fori_loop(
                0, block, col_body, init)
        if not quant:
            q1 = jnp.where(p1, 0.0, w1)
        # Lazy batch update of the columns from c0 (the segment's start, <= i1) on:
        # U[i1:i2, :i1] is zero, so finished columns stay as they are.
        u_rows = lax.dynamic_slice(u, (i1, c0), (block, kp - c0))
        wf = wf.at[:, c0:].add(-jnp.dot(e1, u_rows, precision=_HI))
        wq = lax.dynamic_update_slice_in_dim(wq, q1, i1, axis=1)
        codes = lax.dynamic_update_slice_in_dim(codes, c1, i1, axis=1)
        pruned = lax.dynamic_update_slice_in_dim(pruned, p1, i1, axis=1)
        return wf, wq, codes, pruned, scales, biases, loss

    init = (w, jnp.zeros((out, kp), jnp.float32), jnp.zeros((out, kp), jnp.uint8),
            jnp.zeros((out, kp), bool), jnp.zeros((out, ngp), jnp.float32),
            jnp.zeros((out, ngp), jnp.float32), jnp.zeros((), jnp.float32))
    # Blocks run in a few static segments, each updating only the columns from its start on
    # (as GPTQ's sweep does): up to half the lazy-update flops saved on wide inputs.
    n_seg = 1 if kp <= 2048 else min(4, n_blocks)
    bounds = [round(i * n_blocks / n_seg) for i in range(n_seg + 1)]
    carry = init
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        carry = lax.fori_loop(b0, b1, partial(block_body, c0=b0 * block), carry)
    _, wq, codes, pruned, scales, biases, loss = carry
    ng = k // gs if quant else 1
    return (wq[:, :k], codes[:, :k].astype(jnp.uint32), scales[:, :ng], biases[:, :ng],
            pruned[:, :k], loss)


@partial(jax.jit, static_argnames=("iters",))
def masked_refit(w: jax.Array, h: jax.Array, keep: jax.Array, start: jax.Array,
                 damp: jax.Array, *, iters: int = 20) -> tuple[jax.Array, jax.Array]:
    """The weights that best reproduce ``w``'s outputs under a fixed sparsity mask.

    Solves ``min ‖(W − Ŵ) X‖²`` (``tr(ΔW H ΔWᵀ)``, ``H`` damped as in :func:`prepare`) subject
    to ``Ŵ = 0`` where ``keep`` is False, by ADMM (as in Boža, "Fast and effective weight update
    for pruned large language models", 2024) from ``start`` (e.g. SparseGPT's result): one
    eigendecomposition of ``H``, then two ``out × K × K`` matmuls per iteration, with the
    penalty ``ρ`` raised geometrically from 0.1 to 10 so the iterate settles on the mask (from
    SparseGPT's start, 20 iterations came within 0.2% of the converged error on SmolLM2's
    layers). The OBS sweep only pushes each pruned weight's error onto the columns after it;
    this refit lets every kept weight of the row answer for every pruned one.

    Returns ``(Ŵ [out, K] float32 with exact zeros off the mask, loss tr(ΔW H ΔWᵀ) / 2)``.
    """
    w = w.astype(jnp.float32)
    h = h.astype(jnp.float32)
    k = w.shape[1]
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)
    hn = h / jnp.mean(jnp.diag(h))  # ρ is then relative to the average input energy
    lam, q = jnp.linalg.eigh(hn)
    target = jnp.dot(w, hn, precision=_HI)
    rhos = jnp.geomspace(0.1, 10.0, iters, dtype=jnp.float32)

    def body(i, carry):
        z, u = carry  # u: the scaled dual (multiplier / ρ), rescaled as ρ grows
        rho = rhos[i]
        u = u * rhos[jnp.maximum(i - 1, 0)] / rho
        rhs = jnp.dot(target + rho * (z - u), q, precision=_HI) / (lam + rho)[None, :]
        x = jnp.dot(rhs, q.T, precision=_HI)
        z = jnp.where(keep, x + u, 0.0)
        return z, u + x - z

    z0 = jnp.where(keep, start.astype(jnp.float32), 0.0)
    z, _ = lax.fori_loop(0, iters, body, (z0, jnp.zeros_like(w)))
    d = z - w
    return z, jnp.sum(jnp.dot(d, h, precision=_HI) * d) / 2
