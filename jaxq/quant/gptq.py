"""GPTQ: second-order post-training quantization (Frantar et al., 2022).

Columns are quantized one at a time, and each column's rounding error is pushed onto the columns
not yet quantized through the Cholesky factor of the inverse Hessian ``H = XᵀX``, so that the
layer output ``X Wᵀ`` moves as little as possible. The implementation follows the reference
algorithm at full strength:

* dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero weight column;
* damping ``λ = damp · mean(diag H)``, retried with larger ``λ`` (×10) at the Python level when
  the factorization fails, with a clear error naming the layer when every retry fails;
* the upper Cholesky factor ``U`` of ``H⁻¹`` (``UᵀU = H⁻¹``) obtained from one Cholesky of the
  reversed ``H`` and one triangular inverse, never forming ``H⁻¹`` itself;
* blocked lazy-batch updates: ``lax.fori_loop`` over blocks and, inside a block, over columns;
  a block's error reaches the remaining columns with one matmul; the input axis is padded to a
  multiple of the block size with decoupled zero columns;
* per-group scale/bias computed *during* the sweep, when it reaches a group's first column,
  from the already-updated weights, with the MLX affine rule (canonical codes and scales);
* act-order (``desc_act``: columns by descending ``diag H``), with static groups (group
  parameters from the original weight, contiguous groups, a plain QArray) or without (groups
  follow quantization order, and the QArray stores its columns in that order with ``perm``).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.core import formats, hessian, packing
from jaxq.core.qarray import QArray
from jaxq.core.sparse import from_codes, mask_from_zeros, parse_pattern
from jaxq.core.transform import LeafTransform, Stats
from jaxq.quant.rtn import fallback_group_size, search_clip

_HI = lax.Precision.HIGHEST


def _effective_block(k: int, gs: int, block: int, static: bool) -> int:
    """A block size under which every group's parameters can be computed exactly.

    A group must either lie inside one block (block a multiple of the group) or start on a
    block boundary (group a multiple of the block), so that its weights have received every
    earlier update when the sweep reaches its first column.
    """
    block = max(1, min(block, k))
    if static or gs >= k:
        return block
    if gs <= block:
        return (block // gs) * gs
    return max(d for d in range(1, block + 1) if gs % d == 0)


def _group_params(wg: jax.Array, imp: jax.Array | None, *, bits: int, symmetric: bool,
                  scale_dtype: Any, clip_grid: int, clip_min_ratio: float):
    """Per-row scale/bias ``[out]`` of one group ``wg[out, gs]``, rounded to ``scale_dtype``.

    With ``clip_grid`` > 0 the range is shrunk by the ratio minimising the importance-weighted
    squared error of the group (importance = the group's ``diag H``).
    """
    ratio = None
    if clip_grid:
        ratios = jnp.linspace(1.0, clip_min_ratio, clip_grid)

        def err(r):
            s, b = formats.affine_params(wg, bits, symmetric, (-1,), r)
            q = formats.affine_codes(wg, s, b, bits)
            return jnp.sum(imp * (q * s + b - wg) ** 2, axis=-1)

        errs = lax.map(err, ratios)  # [grid, out]
        ratio = ratios[jnp.argmin(errs, axis=0)][:, None]
    s, b = formats.affine_params(wg, bits, symmetric, (-1,), ratio)
    s = s.astype(scale_dtype).astype(jnp.float32)[:, 0]
    b = b.astype(scale_dtype).astype(jnp.float32)[:, 0]
    return s, b


@partial(jax.jit, static_argnames=("k", "bits", "gs", "symmetric", "static", "block",
                                   "scale_dtype", "clip_grid", "clip_min_ratio"))
def _sweep(w, u, diag, gidx, sg, bg, *, k, bits, gs, symmetric, static, block, scale_dtype,
           clip_grid, clip_min_ratio):
    """The blocked column sweep over ``w[out, kp]`` (already ordered and padded).

    Returns codes (uint32, sweep order), per-group scales/biases in sweep order (unused with
    static groups) and the GPTQ loss ``Σ (w - q)² / (2 U_ii²)``.
    """
    out, kp = w.shape
    maxq = 2**bits - 1
    n_blocks = kp // block
    ngp = -(-kp // gs)
    mode = "static" if static else ("inblock" if gs <= block else "block")
    pars = partial(_group_params, bits=bits, symmetric=symmetric, scale_dtype=scale_dtype,
                   clip_grid=clip_grid, clip_min_ratio=clip_min_ratio)

    def block_body(bi, carry, c0):
        wf, codes, scales, biases, loss, cur = carry
        i1 = bi * block
        w1 = lax.dynamic_slice_in_dim(wf, i1, block, axis=1)
        u1 = lax.dynamic_slice(u, (i1, i1), (block, block))
        if mode == "block":  # groups start on block boundaries; all earlier updates applied
            cur = lax.cond(
                i1 % gs == 0,
                lambda: pars(lax.dynamic_slice_in_dim(wf, i1, gs, axis=1),
                             lax.dynamic_slice_in_dim(diag, i1, gs)),
                lambda: cur)

        def col_body(i, c):
            w1, q1, e1, scales, biases, loss, cur = c
            j = i1 + i
            if mode == "inblock":  # the group lies in this block: use its updated weights
                cur = lax.cond(
                    j % gs == 0,
                    lambda: pars(lax.dynamic_slice_in_dim(w1, i, gs, axis=1),
                                 lax.dynamic_slice_in_dim(diag, j, gs)),
                    lambda: cur)
            elif mode == "static":
                cur = (sg[:, gidx[j]], bg[:, gidx[j]])
            s, b = cur
            wc = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
            q = jnp.clip(jnp.round(formats.exact_div(wc - b, s)), 0, maxq)
            dq = q * s + b
            d = u1[i, i]
            err = (wc - dq) / d
            w1 = w1 - err[:, None] * u1[i][None, :]  # U is upper: only columns >= i move
            q1 = lax.dynamic_update_index_in_dim(q1, q.astype(jnp.uint8), i, axis=1)
            e1 = lax.dynamic_update_index_in_dim(e1, err, i, axis=1)
            if mode != "static":
                scales = lax.dynamic_update_index_in_dim(scales, s, j // gs, axis=1)
                biases = lax.dynamic_update_index_in_dim(biases, b, j // gs, axis=1)
            loss = loss + jnp.where(j < k, jnp.sum(err * err), 0.0) / 2
            return w1, q1, e1, scales, biases, loss, cur

        q1 = jnp.zeros((out, block), jnp.uint8)
        e1 = jnp.zeros((out, block), jnp.float32)
        _, q1, e1, scales, biases, loss, cur = lax.fori_loop(
            0, block, col_body, (w1, q1, e1, scales, biases, loss, cur))
        # Lazy batch update of the columns from c0 (the segment start, <= i1) on: U[i1:i2, :i1]
        # is zero, so columns already done stay as they are; the current block's columns
        # change too, but they are finished.
        u_rows = lax.dynamic_slice(u, (i1, c0), (block, kp - c0))
        wf = wf.at[:, c0:].add(-jnp.dot(e1, u_rows, precision=_HI))
        codes = lax.dynamic_update_slice_in_dim(codes, q1, i1, axis=1)
        return wf, codes, scales, biases, loss, cur

    init = (w, jnp.zeros((out, kp), jnp.uint8), jnp.zeros((out, ngp), jnp.float32),
            jnp.zeros((out, ngp), jnp.float32), jnp.zeros((), jnp.float32),
            (jnp.ones((out,), jnp.float32), jnp.zeros((out,), jnp.float32)))
    # Blocks run in a few static segments; a segment's blocks update only the columns from
    # the segment's start on, which saves up to half the lazy-update flops on wide inputs.
    n_seg = 1 if kp <= 2048 else min(4, n_blocks)
    bounds = [round(i * n_blocks / n_seg) for i in range(n_seg + 1)]
    carry = init
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        carry = lax.fori_loop(b0, b1, partial(block_body, c0=b0 * block), carry)
    _, codes, scales, biases, loss, _ = carry
    return codes[:, :k].astype(jnp.uint32), scales, biases, loss


@partial(jax.jit, static_argnames=("bits", "gs", "symmetric", "scale_dtype", "clip_grid",
                                   "clip_min_ratio"))
def _static_params(w, h, *, bits, gs, symmetric, scale_dtype, clip_grid, clip_min_ratio):
    """Group parameters of the original (dead-zeroed) weight, in contiguous logical groups."""
    w = w.astype(jnp.float32)
    diag = jnp.diag(h).astype(jnp.float32)
    w = jnp.where((diag == 0)[None, :], 0.0, w)
    out, k = w.shape
    wg = w.reshape(out, k // gs, gs)
    ratio = None
    if clip_grid:
        ratio = search_clip(w, jnp.where(diag == 0, 1.0, diag), bits=bits, group_size=gs,
                            symmetric=symmetric, grid=clip_grid,
                            min_ratio=clip_min_ratio)[..., None]
    s, b = formats.affine_params(wg, bits, symmetric, (-1,), ratio)
    return (s[..., 0].astype(scale_dtype).astype(jnp.float32),
            b[..., 0].astype(scale_dtype).astype(jnp.float32))


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    *,
    bits: int = 4,
    group_size: int | str | None = 64,
    symmetric: bool = False,
    act_order: bool = False,
    static_groups: bool = False,
    damp: float = 0.01,
    block_size: int = 128,
    clip: str = "minmax",
    clip_grid: int = 20,
    clip_min_ratio: float = 0.5,
    scale_dtype: Any = jnp.float32,
    max_retries: int = 4,
    name: str = "tensor",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """GPTQ of one ``w[out, in]`` against ``h = XᵀX`` ``[in, in]``.

    Returns ``(codes uint32 [out, in], scales [out, n_groups], biases [out, n_groups], perm,
    loss)``. ``perm`` is None unless ``act_order and not static_groups``; then codes and groups
    are in quantization order (stored column ``j`` is logical column ``perm[j]``, as in
    :class:`~jaxq.core.qarray.QArray`). Scales are float32 values already rounded to
    ``scale_dtype`` (the codes were chosen against the rounded values).

    ``clip="mse"`` shrinks each group's range by the ratio (of ``clip_grid`` in
    ``[clip_min_ratio, 1]``) minimising its ``diag H``-weighted error, when the group is reached.
    When the Cholesky factorization fails, ``damp`` is raised ten-fold (from at least 1e-3) up
    to ``max_retries`` times, with a warning; then a ``ValueError`` naming ``name``.
    """
    if clip not in ("minmax", "mse"):
        raise ValueError(f"{name}: GPTQ clip must be 'minmax' or 'mse', got {clip!r}")
    formats.check_quantizable(w, bits, name)
    w, out, k = hessian.check_problem(w, h, name, "gptq_quantize")
    gs = formats.resolve_group_size(k, group_size, name)
    static = bool(act_order and static_groups and gs < k)
    block = _effective_block(k, gs, block_size, static)
    scale_dtype = jnp.dtype(scale_dtype or jnp.float32)
    grid = clip_grid if clip == "mse" else 0

    wp, u, perm, diag, _ = hessian.factor(w, h, damp=damp, block=block, act_order=act_order,
                                          max_retries=max_retries, name=name)

    kp = wp.shape[1]
    diag = jnp.pad(diag, (0, kp - k), constant_values=1.0)
    if static:
        sg, bg = _static_params(w, h, bits=bits, gs=gs, symmetric=symmetric,
                                scale_dtype=scale_dtype, clip_grid=grid,
                                clip_min_ratio=clip_min_ratio)
        gidx = jnp.pad(perm // gs, (0, kp - k))
    else:
        sg = bg = jnp.zeros((out, 1), jnp.float32)
        gidx = jnp.zeros((kp,), jnp.int32)
    codes, scales, biases, loss = _sweep(
        wp, u, diag, gidx, sg, bg, k=k, bits=bits, gs=gs, symmetric=symmetric, static=static,
        block=block, scale_dtype=scale_dtype, clip_grid=grid, clip_min_ratio=clip_min_ratio)
    if static:
        codes = codes[:, jnp.argsort(perm)]  # back to logical order: groups are contiguous
        return codes, sg, bg, None, loss
    ng = k // gs
    scales, biases = scales[:, :ng], biases[:, :ng]
    if not act_order:
        return codes, scales, biases, None, loss
    return codes, scales, biases, perm.astype(jnp.int32), loss


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(LeafTransform):
    """GPTQ quantization of each selected leaf into a :class:`QArray` (needs ``gram`` stats).

    Attributes:
      bits, group_size, symmetric, clip, clip_grid, clip_min_ratio, scale_dtype,
        group_fallback: as in :class:`~jaxq.quant.rtn.RTN`.
      act_order: quantize columns by descending ``diag H`` (desc_act).
      static_groups: with act_order, take group parameters from the original weight in
        contiguous order (a plain QArray); without, groups follow quantization order and the
        QArray carries ``perm``.
      damp: relative damping of the Hessian (fraction of its mean diagonal).
      block_size: columns per lazy-batch block.
      keep_mask: None, ``"unstructured"`` or an ``"N:M"`` pattern: the leaf is already pruned
        and its exact zeros are a mask to keep. Pruned weights are held at 0 in the sweep (their
        error compensated like any other), each group's grid is fitted to its kept weights, and
        the result is a sparse leaf (:mod:`jaxq.core.sparse`) with QArray values, so every
        zero, and every N:M group, stays exact.

    >>> import jax.numpy as jnp, numpy as np, jaxq
    >>> from jaxq.quant.gptq import GPTQ
    >>> x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    >>> params = {"fc": {"weight": jnp.ones((8, 64))}}
    >>> stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x)}}
    >>> GPTQ(bits=4, group_size=32)(params, stats=stats)["fc"]["weight"].shape
    (8, 64)
    """

    bits: int = 4
    group_size: int | str | None = 64
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    clip: str = "minmax"
    clip_grid: int = 20
    clip_min_ratio: float = 0.5
    scale_dtype: Any = None
    group_fallback: tuple[int, ...] = ()
    keep_mask: str | None = None

    needs = frozenset({"gram"})

    def __post_init__(self) -> None:
        formats.check_quantizer_fields(self)
        if self.clip not in ("minmax", "mse"):
            raise ValueError(f"GPTQ clip must be 'minmax' or 'mse', got {self.clip!r}")
        if self.keep_mask is not None:
            if self.keep_mask != "unstructured":
                parse_pattern(self.keep_mask, "GPTQ keep_mask")
            if self.act_order or self.clip != "minmax":
                raise ValueError("GPTQ keep_mask takes neither act_order nor clip='mse'")

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> QArray:
        formats.check_quantizable(leaf, self.bits, path)
        gram = stats["gram"]
        kwargs = self.quant_kwargs(leaf.shape[axis])
        fn = gptq_qarray
        if self.keep_mask is not None:
            fn = partial(gptq_sparse, keep_mask=self.keep_mask)
        if jnp.ndim(gram) == 3:  # a leaf stacked for scan: one Hessian per layer slice
            axis = axis - leaf.ndim if axis >= 0 else axis
            if axis == -leaf.ndim:
                raise ValueError(f"{path}: the stacking axis cannot be the input axis")
            qs = [fn(leaf[i], gram[i], axis=axis, name=f"{path}[{i}]", **kwargs)
                  for i in range(leaf.shape[0])]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *qs)
        return fn(leaf, gram, axis=axis, name=path, **kwargs)

    def quant_kwargs(self, size: int) -> dict[str, Any]:
        """The keyword arguments of :func:`gptq_qarray` this configuration stands for."""
        return dict(bits=self.bits, symmetric=self.symmetric, act_order=self.act_order,
                    static_groups=self.static_groups, damp=self.damp,
                    block_size=self.block_size, clip=self.clip, clip_grid=self.clip_grid,
                    clip_min_ratio=self.clip_min_ratio, scale_dtype=self.scale_dtype,
                    group_size=fallback_group_size(size, self.group_size,
                                                   self.group_fallback))


def gptq_qarray(leaf: jax.Array, gram: jax.Array, *, axis: int = -1,
                input_scale: jax.Array | None = None, name: str = "tensor",
                scale_dtype: Any = None, **kwargs: Any) -> QArray:
    """GPTQ of a leaf of any rank (input axis ``axis``) into a QArray.

    Leading/other axes are flattened into rows. ``input_scale`` is stored as the QArray's
    child unchanged (AWQ's unfolded scales: ``leaf`` is then the already-scaled weight).
    """
    leaf = jnp.asarray(leaf)
    axis = axis - leaf.ndim if axis >= 0 else axis
    wt = jnp.moveaxis(leaf, axis, -1)
    rest, k = wt.shape[:-1], wt.shape[-1]
    sdt = jnp.dtype(scale_dtype or leaf.dtype)
    codes, scales, biases, perm, _ = gptq_quantize(
        wt.reshape(-1, k), gram, scale_dtype=sdt, name=name, **kwargs)
    gs = k // scales.shape[-1]
    return QArray(packed=packing.pack(codes, kwargs.get("bits", 4)).reshape(*rest, -1),
                  scales=scales.astype(sdt).reshape(*rest, -1),
                  biases=biases.astype(sdt).reshape(*rest, -1),
                  bits=kwargs.get("bits", 4), group_size=gs, size=k, axis=axis,
                  dtype=leaf.dtype, fmt="affine", perm=perm, input_scale=input_scale)


def gptq_sparse(leaf: jax.Array, gram: jax.Array, *, keep_mask: str, axis: int = -1,
                name: str = "tensor", scale_dtype: Any = None, bits: int = 4,
                group_size: int | str | None = 64, symmetric: bool = False, damp: float = 0.01,
                block_size: int = 128, **_: Any) -> Any:
    """GPTQ of an already pruned leaf that keeps its mask (its exact zeros) exactly: the
    shared OBS sweep with the mask fixed, into a sparse leaf with QArray values."""
    leaf = jnp.asarray(leaf)
    formats.check_quantizable(leaf, bits, name)
    axis = axis - leaf.ndim if axis >= 0 else axis
    wt = jnp.moveaxis(leaf, axis, -1)
    rest, k = wt.shape[:-1], wt.shape[-1]
    w2 = wt.reshape(-1, k).astype(jnp.float32)
    pattern = None if keep_mask == "unstructured" else keep_mask
    keep = mask_from_zeros(w2, pattern, name)
    gs = formats.resolve_group_size(k, group_size, name)
    nm = parse_pattern(pattern, name)
    block = hessian.sweep_block(min(block_size, k), gs, *(nm[1:] if nm else ()))
    wp, u, _, _, _ = hessian.factor(w2, gram, damp=damp, block=block, name=name)
    pruned = jnp.pad(~keep, ((0, 0), (0, wp.shape[1] - k)))
    sdt = jnp.dtype(scale_dtype or leaf.dtype)
    _, codes, scales, biases, _, _ = hessian.obs_sweep(
        wp, u, pruned, k=k, block=block, mode="fixed", bits=bits, gs=gs, symmetric=symmetric,
        scale_dtype=sdt)
    out = from_codes(codes, scales.astype(sdt), biases.astype(sdt), keep, bits=bits,
                     group_size=gs, axis=-1, dtype=leaf.dtype, pattern=pattern, name=name)
    return dataclasses.replace(
        jax.tree.map(lambda x: x if x.ndim == 1 else x.reshape(*rest, x.shape[-1]), out),
        axis=axis)
