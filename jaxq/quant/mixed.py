"""Mixed precision by sensitivity: each quantized leaf gets the width that buys the most loss per
stored bit, under a whole-model bits-per-weight budget.

Sensitivity is the diagonal-Fisher estimate of the loss increase a quantization error causes,
``ΔL ≈ ½ Σ F ⊙ (W − Q(W))²``, with ``F`` the mean squared gradient of the loss over calibration
batches (:func:`fisher_diagonal`) and ``Q`` round-to-nearest at the candidate width. It weighs
layers against each other by what they do to the loss, which an output-error proxy per layer
cannot. The allocation is a multiple-choice knapsack, solved by Lagrangian relaxation (each leaf
takes ``argmin err + λ·bits``; bisection on ``λ`` meets the budget) then a greedy pass that
spends what the relaxation left over on the upgrades with the best error saved per bit.

The plan becomes per-path ``overrides`` of ordinary quantizers (GPTQ, RTN, ...), so the chosen
widths are then quantized at full strength, in collect or sequential calibration alike.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core import formats, tree
from jaxq.core.leaf import n_params as leaf_params
from jaxq.core.leaf import nbytes as leaf_bytes
from jaxq.core.transform import Chain, LeafTransform, Stats, Transform, infer_input_axis

#: (bits, group size) widths tried by default; a group that does not divide a leaf's input
#: width is skipped for that leaf.
DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = (
    (2, 32), (2, 64), (3, 32), (3, 64), (3, 128), (4, 32), (4, 64), (4, 128), (5, 64), (6, 64),
    (8, 64))


def fisher_diagonal(loss_fn: Callable[..., jax.Array], params: Any, batches: Iterable[Any], *,
                    where: Callable[[str, Any], bool] | None = None) -> dict[str, jax.Array]:
    """Mean over ``batches`` of the squared gradient of ``loss_fn(params, *batch)``, by path.

    Each batch's gradient is squared on its own (smaller batches: a closer estimate of the
    per-example Fisher). Only float leaves selected by ``where`` (default: all) are kept.
    """
    grad = jax.jit(jax.grad(loss_fn))
    total, n = None, 0
    for batch in batches:
        g = grad(params, *(batch if isinstance(batch, tuple) else (batch,)))
        sq = jax.tree.map(lambda x: jnp.square(x.astype(jnp.float32)), g)
        total = sq if total is None else jax.tree.map(jnp.add, total, sq)
        n += 1
    if total is None:
        raise ValueError("fisher_diagonal needs at least one batch")
    leaves, _ = tree.flatten_with_paths(total)
    keep = where or (lambda path, leaf: True)
    return {p: x / n for p, x in leaves if keep(p, x)}


def candidate_bits(shape: Sequence[int], axis: int, bits: int, group_size: int,
                   scale_bits: int = 16) -> int:
    """Stored bits of an affine QArray: packed words, then one scale and one bias per group."""
    size = shape[axis]
    rows = int(np.prod(shape)) // size
    words = -(-size * bits // 32)
    return rows * (words * 32 + 2 * scale_bits * (size // group_size))


@jax.jit
def _weighted_sq(w: jax.Array, q: jax.Array, f: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum(f * jnp.square(w.astype(jnp.float32) - q))


def candidate_errors(w: jax.Array, fisher: jax.Array, axis: int,
                     candidates: Sequence[tuple[int, int]], scale_dtype: Any = jnp.float16,
                     ) -> list[tuple[tuple[int, int], float, int]]:
    """``[(candidate, Fisher-weighted RTN error, stored bits)]`` for the candidates that fit."""
    out = []
    size = w.shape[axis]
    for bits, gs in candidates:
        if size % gs:
            continue
        qa = formats.quantize(w, bits=bits, group_size=gs, axis=axis, scale_dtype=scale_dtype)
        err = float(_weighted_sq(w, qa.dequantize().astype(jnp.float32), fisher))
        out.append(((bits, gs), err,
                    candidate_bits(w.shape, axis, bits, gs, 8 * jnp.dtype(scale_dtype).itemsize)))
    return out


def allocate(options: Mapping[str, Sequence[tuple[Any, float, int]]], budget_bits: float
             ) -> dict[str, Any]:
    """Pick one option per key minimising the summed error with summed bits <= budget_bits.

    ``options[key]`` lists ``(choice, error, bits)``. Raises if even the smallest choices do
    not fit.
    """
    keys = list(options)
    err = [np.array([o[1] for o in options[k]], np.float64) for k in keys]
    bits = [np.array([o[2] for o in options[k]], np.float64) for k in keys]
    floor = sum(b.min() for b in bits)
    if floor > budget_bits:
        raise ValueError(f"budget of {budget_bits / 8e6:.2f} MB is below the smallest "
                         f"candidates' {floor / 8e6:.2f} MB")

    def pick(lam: float) -> list[int]:
        return [int(np.argmin(e + lam * b)) for e, b in zip(err, bits)]

    def used(choice: list[int]) -> float:
        return float(sum(b[c] for b, c in zip(bits, choice)))

    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget_bits:
        hi *= 4
    if used(pick(lo)) <= budget_bits:
        hi = lo
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if used(pick(mid)) <= budget_bits else (mid, hi)
    choice = pick(hi)
    spare = budget_bits - used(choice)
    while True:  # greedy: the upgrade saving the most error per extra bit that still fits
        best, best_gain = None, 0.0
        for i, (e, b) in enumerate(zip(err, bits)):
            extra = b - b[choice[i]]
            gain = e[choice[i]] - e
            ok = (extra > 0) & (extra <= spare) & (gain > 0)
            if ok.any():
                j = int(np.argmax(np.where(ok, gain / np.where(extra > 0, extra, 1), -1)))
                if gain[j] / extra[j] > best_gain:
                    best, best_gain = (i, j), gain[j] / extra[j]
        if best is None:
            break
        i, j = best
        spare -= bits[i][j] - bits[i][choice[i]]
        choice[i] = j
    return {k: options[k][c][0] for k, c in zip(keys, choice)}


def _leaf_transforms(t: Transform) -> list[LeafTransform]:
    if isinstance(t, Chain):
        return [x for sub in t.transforms for x in _leaf_transforms(sub)]
    if isinstance(t, LeafTransform):
        return [t]
    raise TypeError(f"MixedPrecision quantizes through LeafTransforms (RTN, GPTQ, ...), got "
                    f"{type(t).__name__}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedPrecision(Transform):
    """Quantize with ``quantizers`` at per-leaf widths chosen by sensitivity under a budget.

    Attributes:
      budget_bpw: whole-model bits per weight (every stored bit of every leaf, the ones left in
        float included, over the logical parameter count), as the eval protocol defines it.
      quantizers: the transforms that quantize (e.g. GPTQ for the linears and RTN for the
        embedding); each leaf one of them selects joins the allocation, and its ``bits`` and
        ``group_size`` are set per path. Needs ``fisher`` statistics for those leaves.
      candidates: ``(bits, group_size)`` widths to choose from.
      scale_bits: stored bits of each scale and bias (16 for float16 scales).

    >>> import jax.numpy as jnp, numpy as np
    >>> from jaxq.quant import RTN
    >>> rng = np.random.default_rng(0)
    >>> params = {"a": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
    ...           "b": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32)}
    >>> fisher = {"a": jnp.full((64, 128), 100.0), "b": jnp.full((64, 128), 1.0)}
    >>> t = MixedPrecision(budget_bpw=4.0, candidates=((2, 64), (4, 64), (8, 64)),
    ...                    quantizers=(RTN(scale_dtype=jnp.float16),))
    >>> plan = t.plan(params, {p: {"fisher": f} for p, f in fisher.items()})
    >>> plan["a"][0] > plan["b"][0]
    True
    """

    budget_bpw: float
    quantizers: tuple[Transform, ...]
    candidates: tuple[tuple[int, int], ...] = DEFAULT_CANDIDATES
    scale_bits: int = 16

    def __post_init__(self) -> None:
        if not self.budget_bpw > 0:
            raise ValueError(f"budget_bpw must be positive, got {self.budget_bpw}")
        for bits, gs in self.candidates:
            if (isinstance(bits, bool) or isinstance(gs, bool)
                    or not (1 <= bits <= 8 and isinstance(gs, int) and gs > 0)):
                raise ValueError(f"candidate ({bits}, {gs}): bits 1..8 and a positive group")
        object.__setattr__(self, "quantizers", tuple(self.quantizers))

    def _selector(self, path: str, leaf: Any) -> LeafTransform | None:
        for q in self.quantizers:
            for lt in _leaf_transforms(q):
                if lt.resolve(path, leaf) is not None:
                    return lt
        return None

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        need = frozenset().union(*(q.required_stats(path, leaf) for q in self.quantizers))
        return need | {"fisher"} if self._selector(path, leaf) is not None else need

    def check_patterns(self, params: Any) -> None:
        for q in self.quantizers:
            q.check_patterns(params)

    def plan(self, params: Any, stats: Mapping[str, Stats],
             axes: Mapping[str, int] | None = None) -> dict[str, tuple[int, int]]:
        """``{path: (bits, group_size)}`` for every leaf the quantizers select."""
        axes = axes or {}
        leaves, _ = tree.flatten_with_paths(params)
        n_params = sum(leaf_params(x) for _, x in leaves)
        fixed = 0
        options = {}
        scale_dtype = {16: jnp.float16, 32: jnp.float32}[self.scale_bits]
        for path, leaf in leaves:
            if self._selector(path, leaf) is None:
                fixed += 8 * leaf_bytes(leaf)
                continue
            fisher = (stats.get(path) or {}).get("fisher")
            if fisher is None:
                raise ValueError(f"MixedPrecision needs 'fisher' statistics for '{path}' "
                                 "(jaxq.quant.mixed.fisher_diagonal)")
            if jnp.shape(fisher) != jnp.shape(leaf):
                raise ValueError(f"'{path}': fisher shape {jnp.shape(fisher)} differs from the "
                                 f"leaf's {jnp.shape(leaf)}")
            axis = axes.get(path, infer_input_axis(path, leaf))
            options[path] = candidate_errors(leaf, fisher, axis, self.candidates, scale_dtype)
            if not options[path]:
                raise ValueError(f"'{path}': no candidate group size divides its input width "
                                 f"{jnp.shape(leaf)[axis]}")
        return allocate(options, self.budget_bpw * n_params - fixed)

    def planned(self, params: Any, stats: Mapping[str, Stats],
                axes: Mapping[str, int] | None = None) -> Transform:
        """The quantizers with the plan written into their per-path overrides."""
        plan = self.plan(params, stats, axes)
        owner = {p: self._selector(p, x) for p, x in tree.flatten_with_paths(params)[0]
                 if p in plan}

        def with_plan(t: Transform, selector: Transform | None = None) -> Transform:
            """``t`` with the widths of the leaves ``selector`` (default: ``t``) owns; a nested
            ``then`` quantizer (AWQ's) gets the same widths as the transform around it."""
            if isinstance(t, Chain):
                return Chain(tuple(with_plan(s) for s in t.transforms))
            if not isinstance(t, LeafTransform):
                return t
            selector = selector or t
            mine = {}
            for p, (b, g) in plan.items():
                if owner[p] is selector:
                    own = next((f for pat, f in t.overrides.items() if re.search(pat, p)), None)
                    mine[f"^{re.escape(p)}$"] = {**(own or {}), "bits": b, "group_size": g}
            out = dataclasses.replace(t, overrides={**mine, **dict(t.overrides)})
            then = getattr(t, "then", None)
            if isinstance(then, LeafTransform):
                out = dataclasses.replace(out, then=with_plan(then, selector))
            return out

        return Chain(tuple(with_plan(q) for q in self.quantizers))

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        raise TypeError("MixedPrecision allocates over the whole tree: call it on the params "
                        "(or use .planned(...) for sequential calibration)")

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        stats = stats or {}
        return self.planned(params, stats, axes)(params, stats=stats, axes=axes)


def resolve_mixed(transform: Transform, params: Any, stats: Mapping[str, Stats],
                  axes: Mapping[str, int] | None = None) -> Transform:
    """``transform`` with every :class:`MixedPrecision` step replaced by its planned quantizers,
    so the rest needs no ``fisher`` statistics and can run in sequential calibration."""
    if isinstance(transform, MixedPrecision):
        return transform.planned(params, stats, axes)
    if isinstance(transform, Chain):
        return Chain(tuple(resolve_mixed(t, params, stats, axes) for t in transform.transforms))
    return transform
