"""Transforms: pure maps from a params pytree to a params pytree, composable with :func:`chain`.

Most compression steps act leaf by leaf: :class:`LeafTransform` holds the ``where=`` rule and the
per-path ``overrides`` (mixed precision), and a subclass only writes ``transform_leaf``. The same
``apply_leaf`` hook is what the calibration interpreter calls in sequential mode, so a transform
runs unchanged on a whole tree at once or site by site while activations flow.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from jaxq.core import tree as tree_lib
from jaxq.core.leaf import is_leaf
from jaxq.core.tree import Where

#: Per-leaf calibration statistics, by name (``"gram"``, ``"mean_abs"``, ``"absmax"``, ...).
Stats = Mapping[str, Any]


def infer_input_axis(path: str, leaf: Any) -> int:
    """Contraction axis when no calibration trace says otherwise.

    flax's ``kernel`` leaves are ``(..., in, out)``; torch/MLX-style ``weight`` leaves (and the
    llama models here) are ``(out, in)``.
    """
    return -2 if path.rsplit("/", 1)[-1] == "kernel" else -1


class Transform:
    """Base class. ``transform(params, stats=..., axes=...)`` returns new params."""

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        raise NotImplementedError

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        """Statistics this transform needs at ``path`` (empty if it does not touch it)."""
        return frozenset()

    def check_patterns(self, params: Any) -> None:
        """Raise a ValueError naming any ``where=`` or ``overrides`` regex that matches no leaf
        of ``params``: a typo there would otherwise leave the model silently uncompressed.

        Called wherever the whole tree is known: a transform applied to a tree, and before
        sequential calibration (which then applies the transform leaf by leaf)."""

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        stats = stats or {}
        axes = axes or {}

        def one(path: str, leaf: Any) -> Any:
            return self.apply_leaf(path, leaf, axis=axes.get(path), stats=stats.get(path))

        return tree_lib.map_with_path(one, params)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LeafTransform(Transform):
    """A transform applied independently to each selected leaf.

    Attributes:
      where: which leaves (regex over paths, predicate, or None for the default rule).
      overrides: ``{regex: {field: value}}`` applied to matching paths, first match wins;
        ``{regex: None}`` leaves matching paths untouched. This is how mixed precision is said:
        ``RTN(bits=4, overrides={"down_proj": {"bits": 8}})``.
    """

    where: Where = None
    overrides: Mapping[str, Mapping[str, Any] | None] = dataclasses.field(default_factory=dict)

    needs: ClassVar[frozenset[str]] = frozenset()

    def check_patterns(self, params: Any) -> None:
        check_leaf_patterns(self, tree_lib.paths_for_rules(params))

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        self.check_patterns(params)
        return super().__call__(params, stats=stats, axes=axes)

    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> Any:
        raise NotImplementedError

    def resolve(self, path: str, leaf: Any) -> LeafTransform | None:
        """The configuration that applies at ``path`` (overrides folded in), or None to skip."""
        if not tree_lib.compile_where(self.where)(path, leaf):
            return None
        for pattern, fields in self.overrides.items():
            if re.search(pattern, path):
                if fields is None:
                    return None
                try:  # the transform checks the overridden fields as it is made
                    return dataclasses.replace(self, overrides={}, **fields)
                except ValueError as err:
                    raise ValueError(f"{path}: override {pattern!r}: {err}") from None
        return self

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        if is_leaf(leaf):  # the children of a compressed leaf that read its input
            out: frozenset[str] = frozenset()
            for name, (_, own) in leaf.reachable.items():
                child = getattr(leaf, name)
                if own and child is not None:
                    out |= self.required_stats(f"{path}/{name}", child)
            return out
        cfg = self.resolve(path, leaf)
        return cfg.needs if cfg is not None else frozenset()

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        if is_leaf(leaf):  # reach into its float children (a low-rank leaf's factors)
            return leaf.map_reachable(lambda name, child, child_axis, own: self.apply_leaf(
                f"{path}/{name}", child, axis=child_axis, stats=stats if own else None))
        cfg = self.resolve(path, leaf)
        if cfg is None:
            return leaf
        missing = cfg.needs - set(stats or {})
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs calibration statistics {sorted(missing)} for "
                f"'{path}': run it through jaxq.calibrate(apply_fn, params, batches, transform)")
        if axis is None:
            axis = infer_input_axis(path, leaf)
        return cfg.transform_leaf(path, leaf, axis=axis, stats=stats)


@dataclasses.dataclass(frozen=True)
class Chain(Transform):
    """Transforms applied in order; at a single leaf, each one that selects it in turn."""

    transforms: tuple[Transform, ...]

    def apply_leaf(self, path: str, leaf: Any, *, axis: int | None = None,
                   stats: Stats | None = None) -> Any:
        for t in self.transforms:
            leaf = t.apply_leaf(path, leaf, axis=axis, stats=stats)
        return leaf

    def required_stats(self, path: str, leaf: Any) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for t in self.transforms:
            out |= t.required_stats(path, leaf)
        return out

    def check_patterns(self, params: Any) -> None:
        for t in self.transforms:
            t.check_patterns(params)

    def __call__(self, params: Any, *, stats: Mapping[str, Stats] | None = None,
                 axes: Mapping[str, int] | None = None) -> Any:
        for t in self.transforms:
            # A transform that changes what later sites see (AWQ's scale folding) hands the
            # statistics of its output to the next one.
            with_stats = getattr(t, "transform_with_stats", None)
            if with_stats is not None:
                params, stats = with_stats(params, stats=stats, axes=axes)
            else:
                params = t(params, stats=stats, axes=axes)
        return params


def check_leaf_patterns(t: LeafTransform, leaves: list[tuple[str, Any]]) -> None:
    """``t``'s ``where`` regex must select a leaf, and each ``overrides`` regex must match a
    path ``t`` selects."""
    name = type(t).__name__
    rule = tree_lib.compile_where(t.where)
    selected = [p for p, leaf in leaves if rule(p, leaf)]
    if isinstance(t.where, str) and not selected:
        raise ValueError(f"{name}: where={t.where!r} matches no float matrix of the tree "
                         f"({_examples(leaves)})")
    for pattern in t.overrides:
        if not any(re.search(pattern, p) for p in selected):
            raise ValueError(f"{name}: overrides pattern {pattern!r} matches none of the "
                             f"{len(selected)} leaves it selects ({_examples(leaves)})")


def _examples(leaves: list[tuple[str, Any]]) -> str:
    paths = [p for p, _ in leaves]
    more = f", ... {len(paths) - 3} more" if len(paths) > 3 else ""
    return "paths look like " + ", ".join(repr(p) for p in paths[:3]) + more if paths else (
        "the tree has no leaves")


def chain(*transforms: Transform) -> Chain:
    """Compose transforms, applied left to right (like ``optax.chain``)."""
    for t in transforms:
        if not isinstance(t, Transform):
            raise TypeError(f"chain() takes jaxq transforms, got {type(t).__name__}")
    return Chain(tuple(transforms))
