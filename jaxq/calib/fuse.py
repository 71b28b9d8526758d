"""Sibling fusion: one matmul for the compressed weights that read the same activation.

A decode step multiplies the normed hidden state by ``q``, ``k`` and ``v`` and, in a gated
MLP, by ``gate`` and ``up``: five matmuls that each stream their weights, and at batch 1 each
is one kernel launch whose fixed cost rivals its work on a small model. Concatenated along
the output axis, each group is one matmul of the same total bytes and one launch.

:func:`fuse_siblings` finds the groups by tracing the model (:func:`~jaxq.calib.trace.
sibling_groups`: leaves whose every matmul reads the same activation), concatenates each
group's codes, scales and biases once, and puts a :class:`FusedSlice` in place of every
member: the group's weight plus the member's rows. The params keep their structure, so the
model code runs unchanged; :func:`jaxq.apply` computes the group's product the first time a
member meets an activation and hands each sibling its slice. Anywhere else a member
dequantizes to exactly the tensor it replaced.

Fusion is a run-time step, taken before :func:`jaxq.kernels.prepare` (which keeps the members
sharing one repacked weight). Members share one buffer, so fused params are for running,
not for saving or exporting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from jaxq.core.fused import FusedSlice, concat_rows, fusion_key
from jaxq.core.qarray import QArray
from jaxq.core.tree import flatten_with_paths


def fuse_siblings(apply_fn: Callable, params: Any, *inputs: Any,
                  groups: list[tuple[str, ...]] | None = None) -> Any:
    """``params`` with each group of sibling QArrays fused into one weight (see module doc).

    ``apply_fn(params, *inputs)`` is traced once (``inputs`` can be ``ShapeDtypeStruct``) to
    find the groups, unless ``groups`` (tuples of leaf paths) is given. Only QArray members
    are fused, and only those agreeing on format, bits, group size and input transforms; the
    rest of a group is left as it was. Call it outside ``jit``, on concrete params.

    >>> import jax, jax.numpy as jnp, jaxq
    >>> from jaxq.calib.fuse import FusedSlice
    >>> q = lambda n: jaxq.quantize(jnp.ones((n, 64)), bits=4, group_size=32)
    >>> params = {"a": q(8), "b": q(16)}
    >>> fn = lambda p, x: (x @ p["a"].T, x @ p["b"].T)
    >>> fused = fuse_siblings(fn, params, jax.ShapeDtypeStruct((1, 64), jnp.float32))
    >>> isinstance(fused["b"], FusedSlice), fused["b"].start, fused["b"].shape
    (True, 8, (16, 64))
    """
    named, treedef = flatten_with_paths(params)
    if groups is None:
        from jaxq.calib.trace import sibling_groups, trace

        groups = sibling_groups(trace(apply_fn, params, *inputs))
    leaves = dict(named)
    replaced: dict[str, FusedSlice] = {}
    for group in groups:
        unknown = [p for p in group if p not in leaves]
        if unknown:
            raise KeyError(f"fuse_siblings: no leaf {unknown[0]!r} in params")
        compatible: dict[tuple, list[str]] = {}
        for path in group:
            leaf = leaves[path]
            if isinstance(leaf, QArray) and path not in replaced:
                compatible.setdefault(fusion_key(leaf), []).append(path)
        for paths in compatible.values():
            if len(paths) > 1:
                replaced.update(_fuse([leaves[p] for p in paths], paths))
    out = [replaced.get(path, leaf) for path, leaf in named]
    return jax.tree.unflatten(treedef, out)


def _fuse(members: list[QArray], paths: list[str]) -> dict[str, FusedSlice]:
    fused = concat_rows(members)
    name = "+".join(paths)
    out, start = {}, 0
    for path, q in zip(paths, members, strict=True):
        out[path] = FusedSlice(fused, name, start, q.rest_shape, q.axis, q.dtype)
        start += math.prod(q.rest_shape)
    return out
