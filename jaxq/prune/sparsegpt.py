"""SparseGPT: one-shot pruning with OBS weight updates (Frantar & Alistarh, 2023).

The mask is chosen as the sweep of :func:`jaxq.core.hessian.obs_sweep` reaches the columns
(unstructured: per block of columns by ``w² / [H⁻¹]_jj``, i.e. ``w² / U_jj²``; N:M: per group of
M columns), and every pruned weight's error is compensated on the columns not yet reached,
through the same blocked Cholesky sweep GPTQ uses. With ``bits`` the kept weights are
quantized in the same sweep (the paper's joint sparse + quantized mode): the result is a sparse
leaf whose values are a QArray, so every pruned weight stays an exact zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core import formats, hessian
from jaxq.core.sparse import from_codes, parse_pattern
from jaxq.prune.base import Prune


def sparsegpt_prune(w: jax.Array, h: jax.Array, *, sparsity: float = 0.5,
                    pattern: str | None = None, mask: jax.Array | None = None,
                    bits: int | None = None, group_size: int = 64, symmetric: bool = False,
                    scale_dtype: Any = jnp.float32, blocksize: int = 128, damp: float = 0.01,
                    refit: int = 0, max_retries: int = 4,
                    name: str = "tensor") -> dict[str, jax.Array]:
    """SparseGPT on one ``w[out, K]`` against ``h = XᵀX``.

    ``mask`` (bool ``[out, K]``, True = kept) fixes the mask instead of choosing one (a pruned
    layer quantized with its mask kept: GPTQ's ``keep_mask``). Returns a dict with ``w`` (the
    pruned, and with ``bits`` dequantized, float32 weight with exact zeros), ``keep``,
    ``loss`` (Σ err²/2 of the sweep) and, with ``bits``, ``codes``/``scales``/``biases``
    (affine, groups of ``group_size`` along the input axis, scales rounded to ``scale_dtype``).
    ``refit`` > 0 (pruning alone) then solves for the kept weights exactly under the sweep's
    mask in that many ADMM iterations (:func:`jaxq.core.hessian.masked_refit`).
    """
    w, out, k = hessian.check_problem(w, h, name, "sparsegpt_prune")
    if refit and bits is not None:
        raise ValueError(f"{name}: refit applies to pruning alone (with bits the kept weights "
                         "are rounded in the sweep; quantize a refitted layer with "
                         "GPTQ(keep_mask=...) instead)")
    nm = parse_pattern(pattern, name)
    mults = []
    if nm is not None:
        if k % nm[1]:
            raise ValueError(f"{name}: {pattern} needs the input width {k} to be a multiple "
                             f"of {nm[1]}")
        mults.append(nm[1])
    gs = 0
    if bits is not None:
        formats.check_quantizable(w, bits, name)
        gs = formats.resolve_group_size(k, group_size, name)
        mults.append(gs)
    block = hessian.sweep_block(min(blocksize, max(k, 1)), *mults)
    wp, u, _, _, _ = hessian.factor(w, h, damp=damp, block=block, max_retries=max_retries,
                                    name=name, method="SparseGPT")
    kp = wp.shape[1]
    mode, pruned = "unstructured", None
    if mask is not None:
        mode = "fixed"
        pruned = jnp.pad(~jnp.asarray(mask, bool), ((0, 0), (0, kp - k)))
    elif nm is not None:
        mode = "nm"
    n, m = nm if nm is not None else (0, 1)
    wq, codes, scales, biases, pr, loss = hessian.obs_sweep(
        wp, u, pruned, k=k, block=block, mode=mode, sparsity=float(sparsity), n=n, m=m,
        bits=bits, gs=gs, symmetric=symmetric, scale_dtype=jnp.dtype(scale_dtype))
    res = {"w": wq, "keep": ~pr, "loss": loss}
    if refit:
        res["w"], res["loss"] = hessian.masked_refit(w, h, ~pr, wq, jnp.float32(damp),
                                                     iters=int(refit))
    if bits is not None:
        res.update(codes=codes, scales=scales, biases=biases)
    return res


@dataclasses.dataclass(frozen=True, kw_only=True)
class SparseGPT(Prune):
    """SparseGPT pruning of each selected leaf (needs ``gram`` statistics).

    Attributes:
      bits: None (prune only) or the width the kept weights are quantized to in the same
        sweep (a sparse leaf with QArray values; ``storage`` is then always sparse).
      group_size, symmetric, scale_dtype: the quantization's, as in GPTQ (default scale dtype:
        the weight's).
      blocksize: columns per lazy-batch block (rounded to a multiple of M and of the group).
      damp: relative damping of the Hessian (fraction of its mean diagonal).
      refit: 0 (the paper's OBS updates only) or the ADMM iterations of an exact least-squares
        refit of the kept weights under the chosen mask (pruning alone): the sweep pushes each
        pruned weight's error only onto later columns, the refit onto every kept weight of the
        row; on SmolLM2's layers it cuts the layer output error by 17-26% (20 iterations come
        within 0.2% of the per-row optimum).

    >>> import numpy as np, jax.numpy as jnp
    >>> x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    >>> w = jnp.asarray(np.random.default_rng(1).normal(size=(8, 64)), jnp.float32)
    >>> out = SparseGPT(pattern="2:4")({"fc": {"weight": w}},
    ...                                stats={"fc/weight": {"gram": jnp.asarray(x.T @ x)}})
    >>> int((out["fc"]["weight"] == 0).sum())
    256
    """

    bits: int | None = None
    group_size: int = 64
    symmetric: bool = False
    scale_dtype: Any = None
    blocksize: int = 128
    damp: float = 0.01
    refit: int = 0

    needs = frozenset({"gram"})

    def __post_init__(self) -> None:
        super().__post_init__()
        formats.check_quantizer_fields(self)

    def prune_matrix(self, w, stats, name, dtype):
        res = sparsegpt_prune(
            w, stats["gram"], sparsity=self.sparsity, pattern=self.pattern, bits=self.bits,
            group_size=self.group_size, symmetric=self.symmetric,
            scale_dtype=jnp.dtype(self.scale_dtype or dtype), blocksize=self.blocksize,
            damp=self.damp, refit=self.refit, name=name)
        if self.bits is None:
            return res["w"], res["keep"]
        sdt = jnp.dtype(self.scale_dtype or dtype)
        return from_codes(res["codes"], res["scales"].astype(sdt), res["biases"].astype(sdt),
                          res["keep"], bits=self.bits, group_size=w.shape[1] // res[
                              "scales"].shape[1], axis=-1, dtype=dtype, pattern=self.pattern,
                          name=name)
