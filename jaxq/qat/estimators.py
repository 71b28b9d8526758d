"""Straight-through estimators: fake quantization whose forward pass is exactly the stored
model's decode and whose backward pass is a chosen surrogate gradient.

The forward passes call the same code functions and the same registered decoder as a
:class:`~jaxq.core.qarray.QArray`, so what training sees is bit for bit what ``convert``
stores. The gradients are written out (``jax.custom_vjp``) rather than obtained by adding and
subtracting a detached rounding error, which would change the forward value in float.

Groups are on the last axis: ``wg[*rest, n_groups, group]``, parameters ``[*rest, n_groups]``
(or all-ones leading dims for per-tensor parameters).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxq.core import formats
from jaxq.core.qarray import QArray


def decode_groups(fmt: str, bits: int, scales: jax.Array, biases: jax.Array | None,
            codes: jax.Array) -> jax.Array:
    """The registered decoder of ``fmt`` on grouped codes: QArray's own dequantization."""
    group = codes.shape[-1]
    size = codes.shape[-1] * codes.shape[-2]
    qa = QArray(packed=None, scales=scales, biases=biases, bits=bits, group_size=group,
                size=size, fmt=fmt)
    return formats.decode(qa, codes)


def _sum_to(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum ``x[*rest, n_groups, group]`` down to a parameter's ``shape`` (``[*rest, n_groups]``
    or broadcastable ones)."""
    x = jnp.sum(x, axis=-1)
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


# --- affine: STE, clipped STE and the LSQ / LSQ+ gradients -----------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fake_quant_affine(wg: jax.Array, scales: jax.Array, biases: jax.Array, bits: int,
                      clipped: bool) -> jax.Array:
    """``clip(round((w - b) / s), 0, 2**bits - 1) * s + b`` in float32, as QArray decodes it.

    Gradients (``v = (w - b) / s``, inside = ``0 <= v <= 2**bits - 1``):

    * ``w``: 1 everywhere (plain STE) or 1 inside and 0 outside (``clipped``);
    * ``s``: ``round(v) - v`` inside, the clipped code outside (LSQ);
    * ``b``: 0 inside, 1 outside (LSQ+).

    Callers freeze ``s``/``b`` with ``stop_gradient`` when they are not learned.
    """
    return _fq_affine_fwd(wg, scales, biases, bits, clipped)[0]


def affine_codes(wg: jax.Array, scales: jax.Array, biases: jax.Array, bits: int) -> jax.Array:
    """The codes fake_quant_affine rounds to (what ``convert`` packs)."""
    return formats.affine_codes(wg, scales.astype(jnp.float32)[..., None],
                                biases.astype(jnp.float32)[..., None], bits)


def _fq_affine_fwd(wg, scales, biases, bits, clipped):
    codes = affine_codes(wg, scales, biases, bits)
    return decode_groups("affine", bits, scales, biases, codes), (wg, scales, biases, codes)


def _fq_affine_bwd(bits, clipped, res, g):
    wg, scales, biases, codes = res
    s = scales.astype(jnp.float32)[..., None]
    v = (wg.astype(jnp.float32) - biases.astype(jnp.float32)[..., None]) / s
    inside = (v >= 0) & (v <= 2**bits - 1)
    q = codes.astype(jnp.float32)
    dw = jnp.where(inside, g, 0.0) if clipped else g
    ds = _sum_to(g * jnp.where(inside, q - v, q), scales.shape)
    db = _sum_to(jnp.where(inside, 0.0, g), biases.shape)
    return dw.astype(wg.dtype), ds.astype(scales.dtype), db.astype(biases.dtype)


fake_quant_affine.defvjp(_fq_affine_fwd, _fq_affine_bwd)


# --- the straight-through identity for formats with frozen scales ----------------------------

@jax.custom_vjp
def straight_through(w: jax.Array, wq: jax.Array, inside: jax.Array) -> jax.Array:
    """Forward ``wq``; backward the cotangent to ``w`` times ``inside`` (1.0 or a 0/1 mask)."""
    return wq


def _st_fwd(w, wq, inside):
    return wq, inside


def _st_bwd(inside, g):
    return (g * inside).astype(g.dtype), jnp.zeros_like(g), jnp.zeros_like(inside)


straight_through.defvjp(_st_fwd, _st_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_grad(x: jax.Array, g: float) -> jax.Array:
    """Identity forward, gradient times ``g`` (LSQ's step-size gradient scale). Exact in the
    forward pass, unlike ``x * g + stop_gradient(x - x * g)``."""
    return x


scale_grad.defvjp(lambda x, g: (x, None), lambda g, _, ct: (ct * g,))
