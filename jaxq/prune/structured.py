"""Structured pruning: remove whole units (attention heads, MLP neurons, blocks) so that the
params, and with them the model's config, physically shrink.

The algorithm knows no model. A model describes its units as :class:`UnitGroup` s: ``n`` coupled
units in one layer, unit ``u`` being the slice ``[u * width, (u + 1) * width)`` along a given
axis of every leaf listed ("these rows of A, B, C and these columns of D are one unit"), plus the
*output projection* whose input columns are the units (``score``). ``jaxq.models.structure``
describes the Llama family: a query head is rows of q_proj and columns of o_proj; a neuron is a
row of gate_proj and up_proj and a column of down_proj; a block is an item of the layer list.

Importance (heads, neurons): the output-contribution norm. A unit's columns ``W_u`` of the
output projection, fed its inputs ``X_u`` over the calibration tokens, add ``X_u W_uᵀ`` to the
residual stream; its squared Frobenius norm is ``tr(W_u G_uu W_uᵀ)``, with ``G = XᵀX`` the
Gram matrix the calibration interpreter already collects for GPTQ ("gram"). It is exact (not a
first-order estimate), needs no gradient pass, and puts heads and neurons on one scale (both
are squared contributions to the same residual stream), which is what lets one budget trade
them against each other. Cross terms between units are ignored (the diagonal of the unit-level
Gram), as in Wanda and FLAP.

Uniform shrink: every layer keeps the same number of units of each kind (its own best ones),
because llama.cpp's and mlx-lm's Llama read one head count and one intermediate size for all
layers. The budget is a fraction of the parameters of the layers; :func:`plan_counts` chooses
the kept count of each kind by importance per parameter: among all combinations of kept counts
that remove at least the budget, the one whose removed units have the least total score.

Grouped-query attention: query heads are dropped evenly per KV head (``classes``), keeping K/V
(and the KV cache) intact: the query and output projections are where a head's parameters are
(2 x head_dim x hidden against 2 x head_dim x hidden / group for its share of K/V), and a
query head's contribution is measured exactly, while a KV group's would mix several heads.

Compensation: after dropping columns of an output projection, the remaining columns are refit
by least squares so the projection's output over the calibration tokens changes least:
``W' = W G[:, K] (G_KK + λI)⁻¹`` (K the kept columns; cheap, from the same Gram).

Blocks: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers" (2024). The
angular distance ``arccos(cos(h_l, h_{l+n})) / π`` between the residual stream entering block
``l`` and leaving block ``l + n - 1``, averaged over calibration tokens, says how little ``n``
consecutive blocks change the representation; the ``n`` blocks starting at its minimum are
dropped. Computed from hidden states (the model supplies a function returning them), one
forward per calibration batch, far cheaper than a perplexity per candidate.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.core import tree as tree_lib
from jaxq.core.leaf import is_leaf
from jaxq.core.transform import Chain, Stats, Transform
from jaxq.core.tree import Where


@dataclasses.dataclass(frozen=True)
class Slice:
    """Units along ``axis`` of the leaf at ``path``, ``width`` consecutive entries each."""

    path: str
    axis: int
    width: int


@dataclasses.dataclass(frozen=True)
class UnitGroup:
    """``n`` coupled units of one layer; unit ``u`` is entries ``[u*width, (u+1)*width)`` of
    every slice. ``score`` is the output projection whose input axis holds the units (it must
    be among ``slices``). Units come in ``classes`` equal consecutive runs and every run keeps
    the same count (GQA: one run per KV head). Groups of one ``kind`` shrink alike."""

    kind: str
    name: str
    n: int
    slices: tuple[Slice, ...]
    score: Slice
    classes: int = 1

    def __post_init__(self) -> None:
        if self.score not in self.slices:
            raise ValueError(f"{self.name}: the score slice {self.score.path} is not a slice")
        if self.n % self.classes:
            raise ValueError(f"{self.name}: {self.n} units do not split into {self.classes} "
                             "equal classes")


# --- pure math ---------------------------------------------------------------------------------

@partial(jax.jit, static_argnames=("width",))
def contribution_scores(w: jax.Array, gram: jax.Array, width: int) -> jax.Array:
    """``[n]`` squared norms ``‖X_u W_uᵀ‖²_F = tr(W_u G_uu W_uᵀ)`` of each unit's output.

    ``w`` is ``[out, n * width]`` (input axis last), ``gram`` the ``[n*width, n*width]`` XᵀX
    of its input over the calibration tokens.
    """
    out, k = w.shape
    n = k // width
    wr = w.astype(jnp.float32).reshape(out, n, width)
    m = jnp.einsum("oni,onj->nij", wr, wr, precision=lax.Precision.HIGHEST)
    blocks = jnp.diagonal(gram.astype(jnp.float32).reshape(n, width, n, width), axis1=0, axis2=2)
    return jnp.einsum("nij,ijn->n", m, blocks, precision=lax.Precision.HIGHEST)


def kept_units(scores: Any, keep: int, classes: int = 1) -> np.ndarray:
    """Indices (sorted) of the ``keep`` best-scoring units of each of ``classes`` runs."""
    s = np.asarray(scores, np.float64).reshape(classes, -1)
    per = s.shape[1]
    if not 1 <= keep <= per:
        raise ValueError(f"cannot keep {keep} of {per} units per class")
    best = np.sort(np.argsort(-s, axis=1, kind="stable")[:, :keep], axis=1)
    return (best + per * np.arange(classes)[:, None]).ravel()


def unit_columns(units: np.ndarray, width: int) -> np.ndarray:
    """Entry indices of ``units`` along a slice axis of unit ``width``."""
    return (np.asarray(units)[:, None] * width + np.arange(width)).ravel()


@jax.jit
def refit_columns(w: jax.Array, gram: jax.Array, cols: jax.Array, damp: float) -> jax.Array:
    """Kept columns of ``w [out, K]`` refit so ``X_K W'ᵀ`` best matches ``X Wᵀ``.

    Least squares over the calibration tokens: ``W' = W G[:, K] (G_KK + λI)⁻¹`` with
    ``λ = damp · mean(diag G_KK)`` (as GPTQ damps its Hessian). Solved by Cholesky in float32.
    """
    g = gram.astype(jnp.float32)
    g_kk = g[cols][:, cols]
    lam = damp * jnp.mean(jnp.diagonal(g_kk)) + 1e-12
    g_kk = g_kk + lam * jnp.eye(g_kk.shape[0], dtype=g_kk.dtype)
    rhs = jnp.dot(g[cols], w.astype(jnp.float32).T, precision=lax.Precision.HIGHEST)
    sol = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(g_kk), rhs)
    return sol.T.astype(w.dtype)


def plan_counts(groups: Sequence[UnitGroup], scores: Mapping[str, Any], sizes: Mapping[str, int],
                budget: int, *, kinds: Iterable[str] | None = None,
                multiples: Mapping[str, int] | None = None) -> dict[str, int]:
    """Units to keep per layer for each kind, removing at least ``budget`` parameters.

    Every combination of kept counts (per class at least one unit; the total a multiple of
    ``multiples[kind]``) is priced by the summed scores of the units it removes (each layer's
    worst) and the cheapest one that meets the budget wins; ties go to removing less. Kinds
    outside ``kinds`` keep everything. ``sizes`` is each group's parameter count per unit.
    """
    multiples = dict(multiples or {})
    by_kind: dict[str, list[UnitGroup]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    allowed = set(by_kind if kinds is None else kinds)
    options: dict[str, list[tuple[int, float, int]]] = {}  # kind -> [(keep, cost, removed)]
    for kind, gs in by_kind.items():
        shape = {(g.n, g.classes) for g in gs}
        if len(shape) != 1:
            raise ValueError(f"'{kind}' units differ between layers {sorted(shape)}: a uniform "
                             "shrink needs one unit count for every layer")
        n, classes = shape.pop()
        per = n // classes
        # cost[c] = summed scores of the (per - c) worst units of each class, every layer
        worst_first = np.stack([np.sort(np.asarray(scores[g.name], np.float64)
                                        .reshape(classes, per), axis=1) for g in gs])
        removed_cost = np.concatenate([[0.0], np.cumsum(worst_first.sum(axis=(0, 1)))])
        step = multiples.get(kind, 1)
        choices = range(1, per + 1) if kind in allowed else [per]
        options[kind] = [(c * classes, float(removed_cost[per - c]),
                          sum(sizes[g.name] for g in gs) * (per - c) * classes)
                         for c in choices if (c * classes) % step == 0 or c == per]
    best = None
    for combo in itertools.product(*options.values()):
        removed = sum(o[2] for o in combo)
        if removed < budget:
            continue
        key = (sum(o[1] for o in combo), removed)
        if best is None or key < best[0]:
            best = (key, combo)
    if best is None:
        raise ValueError(f"no uniform shrink of {sorted(allowed)} removes {budget:,} parameters")
    return {kind: o[0] for kind, o in zip(options, best[1])}


def angular_distances(hidden: jax.Array) -> jax.Array:
    """``[L+1, L+1]`` sums over tokens of ``arccos(cos(h_i, h_j)) / π`` between hidden states
    ``hidden [L+1, ..., D]`` (the residual stream entering each block, then the output)."""
    h = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1]).astype(jnp.float32)
    h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-30)
    cos = jnp.einsum("itd,jtd->ijt", h, h, precision=lax.Precision.HIGHEST)
    return jnp.sum(jnp.arccos(jnp.clip(cos, -1.0, 1.0)), axis=-1) / jnp.pi


def block_distances(hidden_fn: Callable[[Any, Any], jax.Array], params: Any,
                    batches: Iterable[Any]) -> np.ndarray:
    """Mean angular distance between every pair of residual-stream positions over calibration
    ``batches`` (token arrays); ``hidden_fn(params, tokens) -> [L+1, ..., D]``."""
    step = jax.jit(lambda p, t: angular_distances(hidden_fn(p, t)))
    total, count = None, 0
    for batch in batches:
        tokens = batch[0] if isinstance(batch, tuple) else batch
        d = step(params, tokens)
        total = d if total is None else total + d
        count += int(np.prod(np.shape(tokens)))
    if total is None:
        raise ValueError("block_distances needs at least one calibration batch")
    return np.asarray(total, np.float64) / count


def choose_blocks(distances: np.ndarray, n: int, *, contiguous: bool = True) -> tuple[int, ...]:
    """The ``n`` blocks to drop: the run of ``n`` whose input and output are closest (Gromov
    et al.), or with ``contiguous=False`` the ``n`` blocks that each change the stream least."""
    blocks = distances.shape[0] - 1
    if not 0 < n < blocks:
        raise ValueError(f"cannot drop {n} of {blocks} blocks")
    if contiguous:
        start = int(np.argmin([distances[i, i + n] for i in range(blocks - n + 1)]))
        return tuple(range(start, start + n))
    own = np.array([distances[i, i + 1] for i in range(blocks)])
    return tuple(sorted(int(i) for i in np.argsort(own, kind="stable")[:n]))


# --- params surgery ----------------------------------------------------------------------------

def _get(tree: Any, path: str) -> Any:
    node = tree
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def _set(tree: Any, path: str, value: Any) -> Any:
    """A copy of ``tree`` (dicts, lists, tuples) with ``path`` replaced by ``value``."""
    head, _, rest = path.partition("/")
    if isinstance(tree, (list, tuple)):
        i = int(head)
        items = list(tree)
        items[i] = _set(items[i], rest, value) if rest else value
        return type(tree)(items)
    if not isinstance(tree, Mapping):
        raise TypeError(f"cannot descend into {type(tree).__name__} at '{head}'")
    return {**tree, head: _set(tree[head], rest, value) if rest else value}


def _check_float(path: str, leaf: Any) -> None:
    if is_leaf(leaf) or not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
        raise ValueError(f"structured pruning needs float weights; '{path}' is "
                         f"{type(leaf).__name__}: prune before quantizing")


def shrink(params: Any, group: UnitGroup, keep: np.ndarray) -> Any:
    """``params`` with only units ``keep`` of ``group`` left in each of its slices."""
    for s in group.slices:
        leaf = _get(params, s.path)
        _check_float(s.path, leaf)
        if leaf.shape[s.axis] != group.n * s.width:
            raise ValueError(f"{s.path}: axis {s.axis} has {leaf.shape[s.axis]} entries, "
                             f"expected {group.n} units x {s.width}")
        params = _set(params, s.path, jnp.take(leaf, jnp.asarray(unit_columns(keep, s.width)),
                                               axis=s.axis))
    return params


def unit_size(params: Any, group: UnitGroup) -> int:
    """Parameters one unit of ``group`` holds (across all its slices)."""
    total = 0
    for s in group.slices:
        shape = np.shape(_get(params, s.path))
        total += int(np.prod(shape)) // shape[s.axis] * s.width
    return total


def drop_items(params: Any, path: str, drop: Iterable[int]) -> Any:
    """``params`` with items ``drop`` removed from the list at ``path`` (blocks)."""
    items = _get(params, path)
    gone = set(drop)
    if not isinstance(items, (list, tuple)) or not gone <= set(range(len(items))):
        raise ValueError(f"'{path}' is not a list holding items {sorted(gone)}")
    return _set(params, path, type(items)(x for i, x in enumerate(items) if i not in gone))


def _matrix(leaf: Any, axis: int) -> jax.Array:
    return jnp.moveaxis(jnp.asarray(leaf), axis, -1)


# --- transforms --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredPrune(Transform):
    """Remove ``fraction`` of the layers' parameters as whole heads and neurons.

    Attributes:
      fraction: share of the parameters of the leaves ``of`` selects to remove (at least).
      units: ``params -> [UnitGroup]``, the model's description (``jaxq.models.structure``).
      where: the output projections that need the Gram of their input (a where-rule).
      of: regex over paths of the leaves the fraction is of (None: every leaf a unit slices).
      kinds: kinds that may shrink (None: all).
      multiples: the kept count of a kind is a multiple of this (e.g. neurons: 64, so
        quantization groups of 64 still divide the down projection's input).
      compensate: refit the output projections' kept columns by least squares.
      damp: the refit's relative damping.
    """

    fraction: float
    units: Callable[[Any], Sequence[UnitGroup]]
    where: Where = None
    of: str | None = None
    kinds: tuple[str, ...] | None = None
    multiples: Mapping[str, int] = dataclasses.field(default_factory=dict)
    compensate: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        return frozenset({"gram"}) if tree_lib.compile_where(self.where)(path, leaf) else \
            frozenset()

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        raise ValueError("StructuredPrune changes shapes across layers: run it on the whole "
                         "tree with statistics (calibration mode 'collect'), not site by site")

    def scores(self, params: Any, groups: Sequence[UnitGroup],
               stats: Mapping[str, Stats]) -> dict[str, jax.Array]:
        out = {}
        for g in groups:
            gram = (stats.get(g.score.path) or {}).get("gram")
            if gram is None:
                raise ValueError(f"StructuredPrune needs the 'gram' statistic of "
                                 f"'{g.score.path}' (is it selected by where=?)")
            out[g.name] = contribution_scores(_matrix(_get(params, g.score.path), g.score.axis),
                                              gram, g.score.width)
        return out

    def plan(self, params: Any, stats: Mapping[str, Stats]
             ) -> tuple[list[UnitGroup], dict[str, jax.Array], dict[str, int]]:
        """The unit groups, their scores and the units each kind keeps per layer."""
        groups = list(self.units(params))
        for g in groups:
            for sl in g.slices:
                _check_float(sl.path, _get(params, sl.path))
        scores = self.scores(params, groups, stats)
        sizes = {g.name: unit_size(params, g) for g in groups}
        sliced = {s.path for g in groups for s in g.slices}
        pattern = re.compile(self.of) if self.of is not None else None
        total = sum(int(np.size(leaf)) for p, leaf in tree_lib.flatten_with_paths(params)[0]
                    if (pattern.search(p) if pattern else p in sliced))
        budget = int(np.ceil(self.fraction * total))
        keep = plan_counts(groups, scores, sizes, budget, kinds=self.kinds,
                           multiples=self.multiples)
        return groups, scores, keep

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        stats = stats or {}
        groups, scores, keep = self.plan(params, stats)
        for g in groups:
            if keep[g.kind] == g.n:
                continue
            units = kept_units(scores[g.name], keep[g.kind] // g.classes, g.classes)
            out = _get(params, g.score.path)
            params = shrink(params, g, units)
            if self.compensate:
                cols = jnp.asarray(unit_columns(units, g.score.width))
                w = refit_columns(_matrix(out, g.score.axis), stats[g.score.path]["gram"], cols,
                                  self.damp)
                params = _set(params, g.score.path, jnp.moveaxis(w, -1, g.score.axis))
        return params


@dataclasses.dataclass(frozen=True, kw_only=True)
class DropBlocks(Transform):
    """Remove ``n`` whole blocks from the list at ``blocks`` (a path, e.g. the layer list).

    ``drop`` names them; left None it is chosen from the angular distances of the residual
    stream (:func:`block_distances`, :meth:`chosen`), ``contiguous`` as in Gromov et al.
    """

    n: int
    blocks: str
    drop: tuple[int, ...] | None = None
    contiguous: bool = True

    def chosen(self, distances: np.ndarray) -> DropBlocks:
        return dataclasses.replace(self, drop=choose_blocks(distances, self.n,
                                                            contiguous=self.contiguous))

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        raise ValueError("DropBlocks removes whole blocks: run it on the whole tree")

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        if self.drop is None:
            raise ValueError("DropBlocks has no blocks chosen: give drop=(...) or resolve it "
                             "from the residual stream (resolve_blocks)")
        if len(self.drop) != self.n:
            raise ValueError(f"DropBlocks(n={self.n}) was given {len(self.drop)} blocks")
        return drop_items(params, self.blocks, self.drop)


def needs_distances(transform: Transform) -> bool:
    """Whether some step is a :class:`DropBlocks` still to be chosen from hidden states."""
    if isinstance(transform, Chain):
        return any(needs_distances(t) for t in transform.transforms)
    return isinstance(transform, DropBlocks) and transform.drop is None


def resolve_blocks(transform: Transform, distances: np.ndarray) -> Transform:
    """``transform`` with every unchosen :class:`DropBlocks` given its blocks."""
    if isinstance(transform, Chain):
        return Chain(tuple(resolve_blocks(t, distances) for t in transform.transforms))
    if isinstance(transform, DropBlocks) and transform.drop is None:
        return transform.chosen(distances)
    return transform
