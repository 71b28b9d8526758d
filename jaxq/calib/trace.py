"""Tracing a model to a jaxpr and finding its *sites*: the matmuls and convolutions fed by a
parameter leaf.

A site is named by the path of the leaf it consumes. The weight may reach the matmul through
layout-only ops (transpose, reshape, dtype casts, broadcasts, squeezes, ``jit`` wrappers of
those) and through sub-jaxprs (``jit``, ``custom_jvp``/``custom_vjp``, ``checkpoint``, ``cond``,
``while``, ``scan``); a weight stacked ``[L, ...]`` and fed to ``scan`` as ``xs`` is a *stacked*
site, used one slice per iteration. The walk tracks, for every variable derived from a leaf,
which of the leaf's axes each of its dimensions is (``dims``); that is how the contraction axis
is found in the leaf's own coordinates, whatever the model did to the weight on the way.

The helpers here (:func:`layout_dims`, :func:`site_geometry`, :func:`sub_jaxprs`) are shared by
the statistics interpreter and by compressed execution, so the three agree on what a site is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore

from jaxq.core.leaf import is_leaf
from jaxq.core.tree import flatten_with_paths

#: Dimension map of a leaf-derived value: for each of its dims, the leaf axis it is (or None).
Dims = tuple[int | None, ...]
#: Identity of one equation: indices through the nested jaxprs (plus branch/body tags).
SiteId = tuple[Any, ...]

SITE_PRIMITIVES = ("dot_general", "conv_general_dilated")
#: Ops that keep every element's value: only dtype or placement changes.
VALUE_OPS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision",
                       "sharding_constraint"})
LAYOUT_OPS = VALUE_OPS | {"transpose", "reshape", "broadcast_in_dim", "squeeze"}
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
                             "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "remat2",
                             "checkpoint", "custom_lin"})


# --- tracing -------------------------------------------------------------------------------

def placeholder(x: Any) -> jax.ShapeDtypeStruct:
    """Abstract stand-in for a leaf: compressed leaves look like the float tensor they encode."""
    if is_leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x))


@dataclasses.dataclass(frozen=True)
class Traced:
    """A model traced over flattened params followed by flattened inputs."""

    jaxpr: jcore.ClosedJaxpr
    paths: tuple[str, ...]
    leaves: tuple[Any, ...]
    treedef: Any
    in_tree: Any
    out_tree: Any

    @property
    def n_params(self) -> int:
        return len(self.paths)


def trace(apply_fn: Callable, params: Any, *inputs: Any) -> Traced:
    """``jax.make_jaxpr`` of ``apply_fn(params, *inputs)`` with compressed leaves as floats."""
    named, treedef = flatten_with_paths(params)
    paths = tuple(p for p, _ in named)
    leaves = tuple(leaf for _, leaf in named)
    flat_in, in_tree = jax.tree.flatten(inputs)
    n = len(leaves)

    def flat_fn(*args):
        p = jax.tree.unflatten(treedef, args[:n])
        return apply_fn(p, *jax.tree.unflatten(in_tree, args[n:]))

    specs = [placeholder(x) for x in (*leaves, *flat_in)]
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*specs)
    return Traced(closed, paths, leaves, treedef, in_tree, jax.tree.structure(out_shape))


# --- layout propagation ----------------------------------------------------------------------

def _reshape_dims(in_shape: Sequence[int], out_shape: Sequence[int], dims: Dims) -> Dims:
    """An output dim is a leaf axis when reshape leaves it whole (same bounds in both shapes)."""
    starts_in = {}
    acc = 1
    for i, s in enumerate(in_shape):
        starts_in[(acc, s)] = starts_in.get((acc, s), []) + [i]
        acc *= s
    out: list[int | None] = []
    acc = 1
    for s in out_shape:
        hits = [i for i in starts_in.get((acc, s), []) if s != 1]
        out.append(dims[hits[0]] if len(hits) == 1 else None)
        acc *= s
    return tuple(out)


def layout_dims(eqn: Any, dims: Dims) -> Dims | None:
    """Dims of a layout-only equation's output, or None if ``eqn`` is not layout-only."""
    name = eqn.primitive.name
    if name not in LAYOUT_OPS or len(eqn.outvars) != 1:
        return None
    p = eqn.params
    if name in VALUE_OPS:
        return dims
    if name == "transpose":
        return tuple(dims[i] for i in p["permutation"])
    if name == "squeeze":
        drop = {d % len(dims) for d in p["dimensions"]}
        return tuple(d for i, d in enumerate(dims) if i not in drop)
    in_shape = eqn.invars[0].aval.shape
    out_shape = eqn.outvars[0].aval.shape
    if name == "broadcast_in_dim":
        out: list[int | None] = [None] * len(out_shape)
        for i, o in enumerate(p["broadcast_dimensions"]):
            out[o] = dims[i] if in_shape[i] == out_shape[o] else None
        return tuple(out)
    if name == "reshape":
        if p.get("dimensions") is not None:
            return None
        return _reshape_dims(in_shape, out_shape, dims)
    return None


def is_identity(dims: Dims) -> bool:
    return all(d == i for i, d in enumerate(dims))


# --- site geometry -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
    """How one site equation contracts its weight operand against its activation."""

    operand: int                # which operand is the weight
    w_contract: tuple[int, ...]  # weight operand dims contracted, sorted by leaf axis
    x_contract: tuple[int, ...]  # matching activation dims, same order
    leaf_axes: tuple[int, ...]   # contracted leaf axes (non-negative), sorted
    k: int                       # input features: product of the contracted sizes


def site_geometry(eqn: Any, operand: int, dims: Dims) -> Geometry | None:
    """Geometry of ``eqn`` when operand ``operand`` (with leaf dims ``dims``) is its weight.

    None when the equation cannot be a site: the weight carries dot_general batch dims, or a
    contracted dim is not a whole leaf axis (e.g. merged by a reshape).
    """
    name = eqn.primitive.name
    x_aval = eqn.invars[1 - operand].aval
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        wc, xc, wb = (lc, rc, lb) if operand == 0 else (rc, lc, rb)
        if wb:
            return None
    elif name == "conv_general_dilated":
        if operand != 1:
            return None
        dn = eqn.params["dimension_numbers"]
        wc, xc = (dn.rhs_spec[1],), (dn.lhs_spec[1],)
    else:
        return None
    leaf = [dims[d] for d in wc]
    if any(a is None for a in leaf) or len(set(leaf)) != len(leaf):
        return None
    order = sorted(range(len(wc)), key=lambda i: leaf[i])
    x_contract = tuple(int(xc[i]) for i in order)
    k = math.prod(x_aval.shape[d] for d in x_contract)
    return Geometry(operand, tuple(int(wc[i]) for i in order), x_contract,
                    tuple(sorted(leaf)), int(k))


# --- sub-jaxprs ---------------------------------------------------------------------------

def closed_parts(jaxpr: Any) -> tuple[Any, list[Any]]:
    """``(Jaxpr, consts)`` of a ClosedJaxpr or an open Jaxpr (remat holds open ones)."""
    if hasattr(jaxpr, "consts"):
        return jaxpr.jaxpr, list(jaxpr.consts)
    return jaxpr, []


def call_jaxpr(eqn: Any) -> Any | None:
    """The body of a call-like equation (jit, custom_jvp/vjp, checkpoint), else None."""
    if eqn.primitive.name not in CALL_PRIMITIVES:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            return eqn.params[key]
    return None


def bind_parts(eqn: Any) -> tuple[list, dict]:
    """``(subfuns, params)`` to re-bind an equation (older JAX returns both, 0.10 params only)."""
    out = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
        return list(out[0]), out[1]
    return [], out


# --- discovery ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Site:
    """Where a parameter leaf is consumed by a matmul or convolution.

    Attributes:
      path: the leaf's path.
      primitive: ``"dot_general"`` or ``"conv_general_dilated"``.
      operand: which operand of the primitive is the weight (0 or 1).
      axis: the contraction (input) axis in the leaf's own coordinates, negative (so it is
        also the axis within one slice of a stacked leaf); the minor one when several leaf axes
        are contracted at once (``axes`` lists them all). This is the ``axis`` transforms get.
      axes: every contracted leaf axis (negative, ascending).
      k: input features seen by collectors (product over ``axes``; for a convolution, the
        activation's channels: statistics are per channel, not per im2col patch).
      uses: how many site equations consume the leaf (in the jaxpr, not counting iterations).
      stacked: the leaf is ``[L, ...]`` and consumed one slice per ``scan`` iteration.
      ids: the site equations' identities (used by the interpreter to know when it is done).
    """

    path: str
    primitive: str
    operand: int
    axis: int
    axes: tuple[int, ...]
    k: int
    uses: int
    stacked: bool
    ids: tuple[SiteId, ...] = dataclasses.field(repr=False, default=())


@dataclasses.dataclass(frozen=True)
class _Origin:
    leaf: int          # index of the param leaf
    dims: Dims         # leaf axis (of the full leaf) for each dim of the value
    stacked: bool      # a per-iteration slice of a stacked leaf


def _walk(jaxpr: Any, origins: Sequence[_Origin | None], prefix: SiteId,
          found: list) -> list[_Origin | None]:
    """Record the sites of ``jaxpr`` given its inputs' origins; return its outputs' origins
    (a jitted ``.T`` still yields the weight)."""
    jaxpr, _ = closed_parts(jaxpr)
    env: dict = {v: o for v, o in zip(jaxpr.invars, origins) if o is not None}

    def get(v):
        return None if isinstance(v, jcore.Literal) else env.get(v)

    for i, eqn in enumerate(jaxpr.eqns):
        sid = (*prefix, i)
        ins = [get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(ins):
            continue
        if name in SITE_PRIMITIVES:
            _record_site(eqn, ins, sid, found)
            continue
        src = ins[0]
        if src is not None and all(o is None for o in ins[1:]):
            dims = layout_dims(eqn, src.dims)
            if dims is not None:
                env[eqn.outvars[0]] = _Origin(src.leaf, dims, src.stacked)
                continue
        body = call_jaxpr(eqn)
        if body is not None:
            n = len(closed_parts(body)[0].invars)
            outs = _walk(body, ins[len(ins) - n:], sid, found)
            env.update({v: o for v, o in zip(eqn.outvars, outs) if o is not None})
        elif name == "cond":
            for b, branch in enumerate(eqn.params["branches"]):
                _walk(branch, ins[1:], (*sid, b), found)
        elif name == "while":
            p = eqn.params
            cn, bn = p["cond_nconsts"], p["body_nconsts"]
            carry = [None] * (len(ins) - cn - bn)  # carried values are not tracked
            _walk(p["cond_jaxpr"], ins[:cn] + carry, (*sid, "cond"), found)
            _walk(p["body_jaxpr"], ins[cn:cn + bn] + carry, (*sid, "body"), found)
        elif name == "scan":
            p = eqn.params
            nc, ncar = p["num_consts"], p["num_carry"]
            xs = [scan_slice_origin(o) for o in ins[nc + ncar:]]
            _walk(p["jaxpr"], ins[:nc] + [None] * ncar + xs, sid, found)
    return [get(v) for v in jaxpr.outvars]


def scan_slice_origin(o: _Origin | None) -> _Origin | None:
    """A stacked leaf fed whole to ``scan`` as xs: each iteration sees slice ``[i]``."""
    if o is None or o.stacked or not is_identity(o.dims):
        return None
    return _Origin(o.leaf, o.dims[1:], True)


def _record_site(eqn: Any, ins: list, sid: SiteId, found: list) -> None:
    weights = [i for i, o in enumerate(ins[:2]) if o is not None]
    if len(weights) != 1:
        return  # weight x weight (or nothing): not a calibration site
    w = weights[0]
    o = ins[w]
    geo = site_geometry(eqn, w, o.dims)
    if geo is not None:
        found.append((o.leaf, eqn.primitive.name, geo, o.stacked, sid, eqn.invars[1 - w]))


def _found_sites(traced: Traced) -> list[tuple]:
    """``(leaf, primitive, geometry, stacked, site id, activation var)`` per site equation."""
    n = traced.n_params
    ndims = [len(placeholder(x).shape) for x in traced.leaves]
    origins = [_Origin(i, tuple(range(ndims[i])), False) for i in range(n)]
    origins += [None] * (len(closed_parts(traced.jaxpr)[0].invars) - n)
    found: list = []
    _walk(traced.jaxpr, origins, (), found)
    return found


def find_sites(traced: Traced) -> dict[str, Site]:
    """Sites of a traced model, by leaf path (in order of first use)."""
    ndims = [len(placeholder(x).shape) for x in traced.leaves]
    sites: dict[str, Site] = {}
    for leaf, prim, geo, stacked, sid, _ in _found_sites(traced):
        path = traced.paths[leaf]
        axes = tuple(a - ndims[leaf] for a in geo.leaf_axes)
        prev = sites.get(path)
        if prev is None:
            sites[path] = Site(path, prim, geo.operand, axes[-1], axes, geo.k, 1, stacked, (sid,))
        elif prev.axes == axes and prev.k == geo.k and prev.stacked == stacked:
            sites[path] = dataclasses.replace(prev, uses=prev.uses + 1, ids=(*prev.ids, sid))
        # A use with a different contraction axis is left out: it sees the weight as it is.
    return sites


def sibling_groups(traced: Traced) -> list[tuple[str, ...]]:
    """Leaves whose matmuls read the same activations: groups of two or more paths.

    Two leaves are siblings when every ``dot_general`` use of each (none stacked) pairs with a
    use of the other on the same activation variable, contracted over the same activation dim:
    ``q/k/v_proj`` reading the normed hidden state, ``gate/up_proj`` in a gated MLP. Groups are
    in order of first use, members in order of use.
    """
    uses: dict[int, list] = {}
    excluded: set[int] = set()
    for leaf, prim, geo, stacked, _, x in _found_sites(traced):
        if prim != "dot_general" or stacked or isinstance(x, jcore.Literal):
            excluded.add(leaf)
        uses.setdefault(leaf, []).append((x, geo.x_contract))
    groups: dict[tuple, list[str]] = {}
    for leaf, reads in uses.items():
        if leaf not in excluded:
            groups.setdefault(tuple(reads), []).append(traced.paths[leaf])
    return [tuple(g) for g in groups.values() if len(g) > 1]


def discover_sites(apply_fn: Callable, params: Any, *inputs: Any) -> dict[str, Site]:
    """Matmul/conv sites of ``apply_fn(params, *inputs)``, by the path of the leaf they use.

    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.ones((4, 3))}
    >>> site = discover_sites(lambda p, x: x @ p["w"], params, jnp.ones((2, 4)))["w"]
    >>> site.axis, site.k, site.stacked
    (-2, 4, False)
    """
    return find_sites(trace(apply_fn, params, *inputs))
