"""Low-rank correction of quantization error: ``W ≈ Q(W - L) + L`` with ``L = U·V`` of low rank.

The correction is fitted to the quantization residual ``W - Q`` in the space whitened by the
Cholesky factor of ``XᵀX`` (the SVD-LLM truncation of :mod:`jaxq.lowrank.svd`), so it removes
the part of the quantization error that the calibrated layer output sees most. With ``rounds``
> 1 the two alternate: the weight minus the current correction is requantized and the
correction refitted to the new residual.

This module imports :mod:`jaxq.quant` (RTN, GPTQ) for the quantized part: the low-rank package
may use the quantizers for this one composite, as its brief allows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core.qarray import QArray
from jaxq.core.transform import LeafTransform, Stats
from jaxq.lowrank.leaf import QuantLowRank
from jaxq.lowrank.svd import as_out_in, dense_cap, factors, transform_for, whitened_svd
from jaxq.quant.gptq import GPTQ


def budget_rank(out: int, k: int, extra_bpw: float, factor_bits: int) -> int:
    """The rank whose factors cost at most ``extra_bpw`` bits per weight of the layer."""
    return min(int(extra_bpw * out * k // (factor_bits * (out + k))), dense_cap(out, k))


def correct(w: jax.Array, quantize: Any, *, axis: int, rank: int, stats: Stats | None,
            rounds: int = 1, damp: float = 0.01, factor_dtype: Any = jnp.float16,
            name: str = "tensor") -> QuantLowRank:
    """``QuantLowRank`` of one 2-D weight; ``quantize(w)`` returns a QArray of ``w``."""
    s, tri = transform_for(w, axis=axis, method="svd-llm", stats=stats, damp=damp, name=name)
    w32 = jnp.asarray(w, jnp.float32)
    dt = jnp.dtype(factor_dtype)
    lr = jnp.zeros_like(w32)
    for _ in range(max(1, rounds)):
        q = quantize((w32 - lr).astype(w.dtype))
        resid = as_out_in(w32 - q.materialize(jnp.float32), axis)
        a, b = factors(*whitened_svd(resid, s), s, rank=rank, triangular=tri)
        a, b = a.astype(dt), b.astype(dt)  # fit the next round to the factors as stored
        lr = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
        lr = lr.T if axis in (0, -2) else lr
    return QuantLowRank(q=q, u=a, v=b)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantLowRankCorrection(LeafTransform):
    """Quantize each selected 2-D weight and add an activation-aware low-rank correction of
    its error, as one :class:`~jaxq.lowrank.leaf.QuantLowRank` leaf (needs ``gram``).

    Attributes:
      quantizer: the leaf transform for the quantized part (default GPTQ W3 g64, float16
        scales); it gets the weight minus the current correction.
      extra_bpw: bits per weight of each layer spent on the correction (the rank is the largest
        whose ``factor_dtype`` factors fit); ``rank`` instead fixes it.
      rounds: quantize / refit alternations (1: quantize once, fit once).
      damp: relative damping of ``XᵀX`` for the whitening.

    >>> import jax.numpy as jnp, numpy as np
    >>> x = np.random.default_rng(0).normal(size=(256, 64)).astype(np.float32)
    >>> params = {"fc": {"weight": jnp.ones((32, 64))}}
    >>> stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x)}}
    >>> QuantLowRankCorrection(rank=4)(params, stats=stats)["fc"]["weight"].rank
    4
    """

    quantizer: LeafTransform = dataclasses.field(
        default_factory=lambda: GPTQ(bits=3, group_size=64, scale_dtype=jnp.float16,
                                     group_fallback=(128, 64, 32)))
    extra_bpw: float = 0.25
    rank: int | None = None
    rounds: int = 1
    damp: float = 0.01
    factor_dtype: Any = jnp.float16

    needs = frozenset({"gram"})

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        base = super().required_stats(path, leaf)
        return base | self.quantizer.required_stats(path, leaf) if base else base

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        w = jnp.asarray(leaf)
        if w.ndim != 2:
            raise ValueError(f"{path}: QuantLowRankCorrection takes 2-D weights, got {w.shape}")
        out, k = as_out_in(w, axis).shape
        bits = jnp.finfo(self.factor_dtype).bits
        rank = self.rank if self.rank is not None else budget_rank(out, k, self.extra_bpw, bits)

        def quantize(x: jax.Array) -> QArray:
            q = self.quantizer.apply_leaf(path, x, axis=axis, stats=stats)
            if not isinstance(q, QArray):
                raise ValueError(f"{path}: the quantizer of QuantLowRankCorrection returned "
                                 f"{type(q).__name__}, not a QArray")
            return q

        if rank <= 0:
            return quantize(w)
        return correct(w, quantize, axis=axis, rank=rank, stats=stats, rounds=self.rounds,
                       damp=self.damp, factor_dtype=self.factor_dtype, name=path)
