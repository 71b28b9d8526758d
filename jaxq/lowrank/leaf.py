"""Low-rank leaves: ``W ≈ U·V`` run as two thin matmuls, and a quantized weight plus such a term.

Factors are stored in torch orientation whatever the logical layout: ``u [out, r]`` and
``v [r, in]``, so ``x @ Vᵀ`` reads the leaf's own input and ``(x @ Vᵀ) @ Uᵀ`` is the site op.
A flax kernel ``(in, out)`` (``axis=-2``) materializes as ``(U·V)ᵀ``. Either factor may itself be
a compressed leaf (``chain(LowRank(...), RTN(...))`` quantizes both): ``v`` reads the leaf's
input, so its calibration statistics are the leaf's own; ``u`` reads ``v``'s output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core.leaf import Leaf, is_leaf, register_leaf, site_matmul


def _apply_factor(f: Any, x: jax.Array) -> jax.Array:
    """``x[..., k] @ fᵀ`` for a factor ``f [n, k]`` (an array or a compressed leaf)."""
    if is_leaf(f):
        return site_matmul(f, x)
    y = jnp.tensordot(x, f.astype(x.dtype), axes=[[x.ndim - 1], [1]],
                      preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _dense(f: Any) -> jax.Array:
    return f.materialize(jnp.float32) if is_leaf(f) else jnp.asarray(f, jnp.float32)


def _check_2d(shape: tuple[int, ...], axis: int) -> None:
    if len(shape) != 2 or axis not in (-1, -2):
        raise ValueError(f"low-rank leaves take 2-D weights with axis -1 or -2, got shape "
                         f"{shape}, axis {axis}")


@register_leaf("lowrank")
@dataclasses.dataclass(frozen=True, eq=False)
class LowRank(Leaf):
    """``W ≈ U·V`` (``U [out, r]``, ``V [r, in]``): ``r·(out+in)`` stored values, two matmuls.

    >>> import jax.numpy as jnp
    >>> leaf = LowRank(u=jnp.ones((8, 2)), v=jnp.ones((2, 16)), logical_shape=(8, 16))
    >>> leaf.materialize().shape, leaf.rank
    ((8, 16), 2)
    """

    u: Any
    v: Any
    logical_shape: tuple[int, ...]
    axis: int = -1
    dtype: Any = jnp.float32

    _CHILDREN = ("u", "v")
    kind = "low-rank"
    reachable = {"v": (-1, True), "u": (-1, False)}

    def __post_init__(self) -> None:
        _check_2d(self.logical_shape, self.axis)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.logical_shape)

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    def materialize(self, dtype: Any = None) -> jax.Array:
        w = jnp.dot(_dense(self.u), _dense(self.v), precision=jax.lax.Precision.HIGHEST)
        return (w.T if self.axis == -2 else w).astype(dtype or self.dtype)

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        return _apply_factor(self.u, _apply_factor(self.v, x))

    def describe(self) -> str:
        return f"low-rank r={self.rank}"


@register_leaf("quant_lowrank")
@dataclasses.dataclass(frozen=True, eq=False)
class QuantLowRank(Leaf):
    """``W ≈ Q + U·V``: a quantized weight (a QArray of the same logical shape and axis) plus a
    low-rank correction of its error; the site runs the quantized matmul and the two thin ones.
    """

    q: Any
    u: Any
    v: Any

    _CHILDREN = ("q", "u", "v")
    kind = "quantized+low-rank"
    reachable = {"v": (-1, True), "u": (-1, False)}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def dtype(self) -> Any:
        return self.q.dtype

    @property
    def axis(self) -> int:
        return self.q.axis

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    def materialize(self, dtype: Any = None) -> jax.Array:
        lr = jnp.dot(_dense(self.u), _dense(self.v), precision=jax.lax.Precision.HIGHEST)
        lr = lr.T if self.axis == -2 else lr
        return (self.q.materialize(jnp.float32) + lr).astype(dtype or self.dtype)

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        return site_matmul(self.q, x) + _apply_factor(self.u, _apply_factor(self.v, x))

    def describe(self) -> str:
        return f"{self.q.describe()} + low-rank r={self.rank}"
