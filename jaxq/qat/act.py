"""Activation fake quantization at matmul sites (W8A8, W4A8): a compressed leaf whose site op
quantizes its input per token before the weight's own matmul.

:class:`ActQuant` wraps a weight (a fake-quantized float array while training, a QArray after
``convert``). ``jaxq.apply(apply_fn)`` calls its ``matmul`` at each site, so the model code is
unchanged: the activations reaching that weight are rounded to ``act_bits`` signed integers
with one dynamic scale per token (``absmax / (2**(act_bits-1) - 1)``, SmoothQuant's dynamic
rule), and the gradient passes straight through the rounding. Elsewhere (an embedding gather,
a non-matmul use) the leaf is just its weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core.leaf import Leaf, is_leaf, register_leaf, site_matmul
from jaxq.core.qarray import dequantize
from jaxq.qat.estimators import straight_through


def fake_quant_act(x: jax.Array, bits: int) -> jax.Array:
    """Per-token (last axis) symmetric ``bits``-bit fake quantization, straight-through."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.astype(jnp.float32)
    scale = jax.lax.stop_gradient(
        jnp.maximum(jnp.max(jnp.abs(xf), axis=-1, keepdims=True), 1e-8) / qmax)
    xq = jnp.clip(jnp.round(xf / scale), -qmax, qmax) * scale
    return straight_through(xf, jax.lax.stop_gradient(xq), jnp.ones((), jnp.float32)
                            ).astype(x.dtype)


@register_leaf("act_quant")
@dataclasses.dataclass(frozen=True, eq=False)
class ActQuant(Leaf):
    """A weight whose matmul sees ``act_bits``-bit per-token activations.

    Attributes:
      weight: a float array (the fake-quantized weight, training) or a compressed leaf.
      act_bits: activation width (8 for W8A8 / W4A8).
      axis: the weight's input axis (negative).
    """

    weight: Any
    act_bits: int
    axis: int

    _CHILDREN = ("weight",)
    kind = "quantized"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> Any:
        return self.weight.dtype

    def materialize(self, dtype: Any = None) -> jax.Array:
        w = dequantize(self.weight)
        return w.astype(dtype or w.dtype)

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        xq = fake_quant_act(x, self.act_bits)
        if is_leaf(self.weight):
            return site_matmul(self.weight, xq)
        return super().matmul(xq)

    def describe(self) -> str:
        inner = self.weight.describe() if is_leaf(self.weight) else "float"
        return f"{inner}, {self.act_bits}-bit per-token activations"
