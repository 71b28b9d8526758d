"""Truncated SVD of weights: plain, activation-aware (SVD-LLM whitening, ASVD scaling), and rank
allocation under a whole-model parameter budget.

What is truncated is the SVD of ``W·S`` for an input transform ``S``, and the factors map back
with ``S⁻¹``:

* ``plain``: ``S = I`` (minimises ``‖W - Ŵ‖_F``);
* ``svd-llm``: ``S = chol(XᵀX + λI)`` (lower; SVD-LLM, Wang et al. 2024). Because
  ``‖(W - Ŵ)Xᵀ‖²_F = ‖(W - Ŵ)S‖²_F``, the output error of the truncation is exactly the sum of
  the discarded squared singular values of ``W·S``: the truncation is optimal for the layer's
  calibrated output, not for the weight;
* ``asvd``: ``S = diag(mean|x|^α)`` (ASVD, Yuan et al. 2023): cheaper, only per-channel scale.

Ranks: ``ratio`` keeps that fraction of each layer's parameters (``r = ⌊ratio·out·in/(out+in)⌋``);
``budget`` keeps that fraction of all selected layers' parameters together, allocated greedily
by the normalised truncation error per parameter (each extra rank of a layer gains
``σ²_i / Σσ²`` of that layer's whitened energy for ``out+in`` parameters; gains fall along a
spectrum, so taking increments by gain per parameter is the fractional-knapsack optimum up to
the last increment). A layer whose rank would leave it no smaller than dense stays dense.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core import tree as tree_lib
from jaxq.core.transform import LeafTransform, Stats, infer_input_axis
from jaxq.lowrank.leaf import LowRank

_HI = jax.lax.Precision.HIGHEST
METHODS = ("plain", "svd-llm", "asvd")


def as_out_in(w: jax.Array, axis: int) -> jax.Array:
    """A 2-D weight in ``(out, in)`` orientation."""
    return w.T if axis in (0, -2) else w


@partial(jax.jit, static_argnames=("method",))
def input_transform(gram: jax.Array | None, mean_abs: jax.Array | None, *, method: str,
                    damp: float = 0.01, alpha: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """``(S, ok)``: the input transform (``[in, in]``; lower-triangular for ``svd-llm``) and
    whether it is usable (finite, positive diagonal)."""
    if method == "svd-llm":
        g = gram.astype(jnp.float32)
        diag = jnp.diag(g)
        lam = damp * jnp.maximum(jnp.mean(diag), 1e-12)
        s = jnp.linalg.cholesky(g + lam * jnp.eye(g.shape[0], dtype=jnp.float32))
    else:
        m = mean_abs.astype(jnp.float32)
        m = jnp.maximum(m, 1e-6 * jnp.maximum(jnp.max(m), 1e-12)) ** alpha
        s = jnp.diag(m / jnp.exp(jnp.mean(jnp.log(m))))  # geometric mean 1
    ok = jnp.all(jnp.isfinite(s)) & jnp.all(jnp.diag(s) > 0)
    return s, ok


@jax.jit
def whitened_svd(w: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SVD of ``W·S`` (``w [out, in]``): ``(U, σ, Vᵀ)``, singular values descending."""
    return jnp.linalg.svd(jnp.dot(w.astype(jnp.float32), s, precision=_HI),
                          full_matrices=False)


@partial(jax.jit, static_argnames=("rank", "triangular"))
def factors(u: jax.Array, sv: jax.Array, vt: jax.Array, s: jax.Array, *, rank: int,
            triangular: bool) -> tuple[jax.Array, jax.Array]:
    """Rank-``rank`` factors ``(U_r Σ_r^½, Σ_r^½ V_rᵀ S⁻¹)`` from an SVD of ``W·S``."""
    root = jnp.sqrt(sv[:rank])
    a = u[:, :rank] * root[None, :]
    b = root[:, None] * vt[:rank]
    if triangular:  # B S⁻¹ = (S⁻ᵀ Bᵀ)ᵀ
        b = jax.scipy.linalg.solve_triangular(s, b.T, lower=True, trans="T").T
    else:
        b = b / jnp.diag(s)[None, :]
    return a, b


def dense_cap(out: int, k: int) -> int:
    """The largest rank whose factors are still smaller than the dense weight."""
    return max(0, (out * k - 1) // (out + k))


def ratio_rank(out: int, k: int, ratio: float) -> int | None:
    """Rank keeping ``ratio`` of the layer's parameters, or None where that is not smaller than
    dense (the layer stays dense)."""
    r = int(np.floor(ratio * out * k / (out + k)))
    return r if 0 < r <= dense_cap(out, k) else None


def allocate_ranks(spectra: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]],
                   budget: float) -> dict[str, int]:
    """Ranks under a parameter budget of ``budget`` × the layers' dense parameters.

    ``spectra[path]`` are a layer's (whitened) singular values, descending. Greedy on the
    normalised truncation error per parameter (module docstring); the total ``Σ r·(out+in)``
    never exceeds the budget, and no further increment of any layer would fit.
    """
    paths = sorted(spectra)
    total = sum(shapes[p][0] * shapes[p][1] for p in paths)
    allowed = budget * total
    gains, costs, owner = [], [], []
    for i, p in enumerate(paths):
        out, k = shapes[p]
        sv2 = np.asarray(spectra[p], np.float64) ** 2
        cap = min(dense_cap(out, k), len(sv2))
        g = sv2[:cap] / max(sv2.sum(), 1e-300)
        gains.append(g / (out + k))
        costs.append(np.full(cap, out + k, np.int64))
        owner.append(np.full(cap, i, np.int64))
    ratio = np.concatenate(gains)
    cost = np.concatenate(costs)
    who = np.concatenate(owner)
    order = np.argsort(-ratio, kind="stable")  # within a layer: gains fall, order is kept
    ranks = np.zeros(len(paths), np.int64)
    used = 0
    for j in order:  # increments in gain order; skip ones that no longer fit
        if used + cost[j] <= allowed:
            ranks[who[j]] += 1
            used += cost[j]
    return {p: int(r) for p, r in zip(paths, ranks)}


def lowrank_factor(w: jax.Array, *, axis: int, method: str, rank: int,
                   stats: Stats | None = None, damp: float = 0.01, alpha: float = 0.5,
                   factor_dtype: Any = None, name: str = "tensor") -> LowRank:
    """A :class:`LowRank` of rank ``rank`` for one 2-D weight."""
    s, tri = transform_for(w, axis=axis, method=method, stats=stats, damp=damp, alpha=alpha,
                           name=name)
    a, b = factors(*whitened_svd(as_out_in(w, axis), s), s, rank=rank, triangular=tri)
    dt = jnp.dtype(factor_dtype or w.dtype)
    return LowRank(u=a.astype(dt), v=b.astype(dt), logical_shape=tuple(w.shape),
                   axis=axis - w.ndim if axis >= 0 else axis, dtype=w.dtype)


def transform_for(w: jax.Array, *, axis: int, method: str, stats: Stats | None,
                  damp: float = 0.01, alpha: float = 0.5, name: str = "tensor",
                  max_retries: int = 4) -> tuple[jax.Array, bool]:
    """The input transform ``S`` of ``method`` for one weight and whether it is triangular
    (retrying Cholesky with ten-fold damping, then a clear error naming the layer)."""
    if method not in METHODS:
        raise ValueError(f"{name}: low-rank method must be one of {METHODS}, got {method!r}")
    if jnp.ndim(w) != 2:
        raise ValueError(f"{name}: low-rank factorization takes a 2-D weight, got {w.shape}")
    k = as_out_in(w, axis).shape[1]
    if method == "plain":
        return jnp.eye(k, dtype=jnp.float32), False
    key = "gram" if method == "svd-llm" else "mean_abs"
    if stats is None or key not in stats:
        raise ValueError(f"{name}: {method} needs the {key!r} calibration statistic: run it "
                         "through jaxq.calibrate or give stats=")
    stat = jnp.asarray(stats[key])
    if stat.shape[0] != k:
        raise ValueError(f"{name}: {key} has {stat.shape[0]} inputs, the weight {k}")
    d = float(damp)
    for attempt in range(max_retries + 1):
        s, ok = input_transform(stat if key == "gram" else None,
                                stat if key == "mean_abs" else None, method=method,
                                damp=d, alpha=alpha)
        if bool(ok):
            return s, method == "svd-llm"
        if attempt == max_retries:
            break
        d = max(d, 1e-3) * 10.0
        warnings.warn(f"{name}: XᵀX not positive definite; retrying with damp={d:g}",
                      RuntimeWarning, stacklevel=2)
    raise ValueError(f"{name}: Cholesky of XᵀX failed even with damping {d:g}; check the "
                     "calibration statistics (NaN/Inf activations or too few samples)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankSVD(LeafTransform):
    """Truncated (activation-aware) SVD of each selected 2-D weight into a :class:`LowRank`.

    Attributes:
      variant: ``"plain"``, ``"svd-llm"`` (needs ``gram``) or ``"asvd"`` (needs ``mean_abs``).
      ratio: fraction of each layer's parameters kept (per-layer rank); ignored with ``budget``.
      budget: fraction of all selected layers' parameters kept, ranks allocated by the spectra
        (whole-tree calls only: ``t(params, stats=..., axes=...)``; module docstring).
      ranks: explicit ranks by path (what ``budget`` resolves to); win over ``ratio``.
      damp: relative damping of ``XᵀX`` (``svd-llm``). alpha: ASVD's exponent.
      factor_dtype: dtype of the factors (default: the weight's).

    >>> import jax.numpy as jnp, jaxq
    >>> params = {"fc": {"weight": jnp.ones((64, 64))}}
    >>> LowRankSVD(variant="plain", ratio=0.5)(params)["fc"]["weight"].rank
    16
    """

    variant: str = "svd-llm"
    ratio: float = 0.8
    budget: float | None = None
    ranks: Mapping[str, int] = dataclasses.field(default_factory=dict)
    damp: float = 0.01
    alpha: float = 0.5
    factor_dtype: Any = None

    def __post_init__(self) -> None:
        if self.variant not in METHODS:
            raise ValueError(f"LowRankSVD variant must be one of {METHODS}, got {self.variant!r}")
        if not 0 < (self.budget if self.budget is not None else self.ratio) <= 1:
            raise ValueError("LowRankSVD ratio/budget must lie in (0, 1]")

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({"svd-llm": {"gram"}, "asvd": {"mean_abs"}}.get(self.variant, set()))

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        w = jnp.asarray(leaf)
        if w.ndim != 2:
            raise ValueError(f"{path}: LowRankSVD takes 2-D weights, got shape {w.shape}")
        out, k = as_out_in(w, axis).shape
        if self.ranks:
            rank = self.ranks.get(path)
        elif self.budget is not None:
            raise ValueError(f"{path}: LowRankSVD(budget=...) allocates ranks over the whole "
                             "model: call it on the whole tree with float statistics "
                             "(calibration mode 'collect'), not site by site")
        else:
            rank = ratio_rank(out, k, self.ratio)
        if not rank or rank > dense_cap(out, k):
            return leaf  # low-rank would not be smaller than dense
        return lowrank_factor(w, axis=axis, method=self.variant, rank=rank, stats=stats,
                              damp=self.damp, alpha=self.alpha, factor_dtype=self.factor_dtype,
                              name=path)

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        if self.budget is None or self.ranks:
            return super().__call__(params, stats=stats, axes=axes)
        ranks = self.allocate(params, stats=stats, axes=axes)
        return dataclasses.replace(self, ranks=ranks)(params, stats=stats, axes=axes)

    def allocate(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> dict[str, int]:
        """Ranks by path under ``budget`` from every selected layer's whitened spectrum."""
        stats, axes = stats or {}, axes or {}
        spectra, shapes = {}, {}
        for path, leaf in tree_lib.flatten_with_paths(params)[0]:
            if self.resolve(path, leaf) is None:
                continue
            axis = axes.get(path, infer_input_axis(path, leaf))
            w = as_out_in(jnp.asarray(leaf), axis)
            s, _ = transform_for(leaf, axis=axis, method=self.variant, stats=stats.get(path),
                                 damp=self.damp, alpha=self.alpha, name=path)
            spectra[path] = np.asarray(whitened_svd(w, s)[1])
            shapes[path] = tuple(w.shape)
        return allocate_ranks(spectra, shapes, self.budget)
