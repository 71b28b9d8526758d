"""Collectors: running statistics of a site's input activations.

A collector is ``init(k) -> state``, ``update(state, x_rows) -> state`` (pure, jit-compiled;
``x_rows`` is ``[rows, k]`` with the contraction axis last) and ``finalize(state) -> array``.
States are sums, counts or maxima, never means, so data-parallel shards and hosts combine
exactly: reduce each state leaf with ``reduce`` (``"sum"`` -> ``lax.psum``/summing over hosts,
``"max"`` -> ``lax.pmax``) *before* ``finalize``. :func:`jaxq.calib.calibrate` takes a
``reduce_stats`` hook for that.

With a padding mask (``jaxq.calibrate(..., mask=)``), ``update_masked(state, x_rows, m)`` is
used instead, ``m`` being ``[rows]`` of 0/1: masked rows are left out of sums, maxima and counts
alike (every built-in has one; a custom collector without it cannot be used with a mask).

Built-ins: ``gram`` (XᵀX in float32, ``[k, k]``; GPTQ, SparseGPT), ``sq_norm`` (per-channel
Σx², the diagonal of the Gram matrix; Wanda takes its square root), ``mean_abs`` (per-channel
mean |x|; AWQ), ``absmax`` (per-channel max |x|; SmoothQuant), ``count`` (rows seen).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Collector:
    """A named running statistic. ``reduce`` says how states combine across devices/hosts."""

    name: str
    init: Callable[[int], Any]
    update: Callable[[Any, jax.Array], Any]
    finalize: Callable[[Any], Any] = lambda state: state
    reduce: str = "sum"
    update_masked: Callable[[Any, jax.Array, jax.Array], Any] | None = None


def _rows32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _gram_masked(state, x, m):
    x = _rows32(x)
    return state + jnp.dot((x * m[:, None]).T, x, precision=jax.lax.Precision.HIGHEST)


def _sq_norm_masked(state, x, m):
    return state + jnp.sum(jnp.square(_rows32(x)) * m[:, None], axis=0)


def _mean_abs_masked(state, x, m):
    total, n = state
    return total + jnp.sum(jnp.abs(_rows32(x)) * m[:, None], axis=0), n + jnp.sum(m)


def _absmax_masked(state, x, m):
    return jnp.maximum(state, jnp.max(jnp.abs(_rows32(x)) * m[:, None], axis=0))


def _count_masked(state, x, m):
    return state + jnp.sum(m)


def _unmasked(update):
    return lambda state, x: update(state, x, jnp.ones((x.shape[0],), jnp.float32))


def _mean_abs_finalize(state):
    total, n = state
    return total / jnp.maximum(n, 1.0)


BUILTIN: dict[str, Collector] = {
    "gram": Collector("gram", lambda k: jnp.zeros((k, k), jnp.float32),
                      _unmasked(_gram_masked), update_masked=_gram_masked),
    "sq_norm": Collector("sq_norm", lambda k: jnp.zeros((k,), jnp.float32),
                         _unmasked(_sq_norm_masked), update_masked=_sq_norm_masked),
    "mean_abs": Collector("mean_abs",
                          lambda k: (jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)),
                          _unmasked(_mean_abs_masked), _mean_abs_finalize,
                          update_masked=_mean_abs_masked),
    "absmax": Collector("absmax", lambda k: jnp.zeros((k,), jnp.float32),
                        _unmasked(_absmax_masked), reduce="max", update_masked=_absmax_masked),
    "count": Collector("count", lambda k: jnp.zeros((), jnp.float32),
                       _unmasked(_count_masked), update_masked=_count_masked),
}


def register_collector(collector: Collector) -> None:
    """Make a custom collector available by name to transforms' ``required_stats``."""
    BUILTIN[collector.name] = collector


def get_collector(spec: str | Collector) -> Collector:
    if isinstance(spec, Collector):
        return spec
    try:
        return BUILTIN[spec]
    except KeyError:
        raise ValueError(f"unknown statistic {spec!r}; known: {sorted(BUILTIN)} "
                         "(register others with jaxq.calib.register_collector)") from None


@partial(jax.jit, static_argnames=("collectors", "contract"))
def update_states(collectors: tuple[Collector, ...], contract: tuple[int, ...],
                  states: tuple, x: jax.Array, mask: jax.Array | None = None) -> tuple:
    """Reshape an activation to ``[rows, k]`` (``contract`` dims last) and update each state
    (``mask``: ``[rows]`` of 0/1, rows to leave out)."""
    rest = [d for d in range(x.ndim) if d not in contract]
    rows = jnp.transpose(x, (*rest, *contract)).reshape(-1, 1 if not contract else
                                                        _prod(x.shape, contract))
    if mask is None:
        return tuple(c.update(s, rows) for c, s in zip(collectors, states))
    return tuple(c.update_masked(s, rows, mask) for c, s in zip(collectors, states))


def _prod(shape, dims):
    out = 1
    for d in dims:
        out *= shape[d]
    return out


@partial(jax.jit, static_argnames=("collectors", "contract", "k"))
def batch_deltas(collectors: tuple[Collector, ...], contract: tuple[int, ...], k: int,
                 x: jax.Array, mask: jax.Array | None = None) -> tuple:
    """Each collector's state for ``x`` alone (from ``init``): what one batch adds.

    Kept apart from the running states so that sites reading the same activation (q/k/v,
    gate/up) compute it once and each fold it into their own states.
    """
    return update_states(collectors, contract, tuple(c.init(k) for c in collectors), x, mask)


@partial(jax.jit, static_argnames=("collectors",))
def combine(collectors: tuple[Collector, ...], states: tuple, deltas: tuple) -> tuple:
    """Fold per-batch deltas into running states (summed, or maxed for ``reduce="max"``)."""
    return tuple(jax.tree.map(jnp.add if c.reduce == "sum" else jnp.maximum, s, d)
                 for c, s, d in zip(collectors, states, deltas))
