"""Compressed execution: run any ``apply_fn(params, *inputs)`` on a params pytree holding
compressed leaves (:mod:`jaxq.core.leaf`), without touching the model code.

The model is traced with float placeholders for the compressed leaves, and its jaxpr is
re-evaluated (under the caller's ``jax.jit``, if any) with the leaves flowing in:

* at a site (a ``dot_general`` contracting the leaf's input axis against the activation) it
  calls the leaf's site op (:func:`jaxq.core.leaf.site_matmul`: ``qmatmul`` for a QArray,
  two matmuls for a low-rank leaf, ...) and transposes/reshapes the result into what
  ``dot_general`` would have produced;
* layout ops on a leaf (transpose, reshape, casts, ``jit`` wrappers of those) are recorded,
  not executed, so a ``w.T`` still reaches its matmul as a compressed leaf;
* anywhere else (an embedding gather on a quantized table, a contraction over several weight
  axes, a convolution, a weight x weight product, dot_general batch dims on the weight) the
  leaf is materialized right there, at the point of use: correct for any op, and XLA fuses
  the dequantization into the consumer;
* an equation that no compressed leaf reaches is bound as it is, so the model's
  ``custom_jvp``/``custom_vjp`` rules hold wherever weights stay dense; ``checkpoint`` (remat)
  regions are re-emitted as ``jax.checkpoint`` with the model's policy around their
  interpreted body; ``jit`` and ``custom_jvp``/``custom_vjp`` bodies that a compressed leaf
  enters are inlined (the forward pass is the same and gradients flow through the
  interpreted ops to the leaves' float children, but such a custom rule is not kept);
  ``scan`` is re-emitted as a new ``lax.scan`` whose xs carry a stacked leaf's children, so
  each iteration rebuilds its own slice and calls its site op; ``cond`` and ``while``
  are re-emitted with interpreted bodies that close over the leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxq.calib.trace import (
    VALUE_OPS,
    bind_parts,
    call_jaxpr,
    closed_parts,
    is_identity,
    layout_dims,
    placeholder,
    site_geometry,
    trace,
)
from jaxq.core.leaf import is_leaf, site_matmul
from jaxq.core.tree import flatten_with_paths


@dataclasses.dataclass(frozen=True, eq=False)
class _QVal:
    """A compressed leaf plus the layout equations applied to it so far."""

    qa: Any
    ops: tuple
    dims: tuple


def _bind(eqn: Any, ins: list) -> list:
    subfuns, params = bind_parts(eqn)
    out = eqn.primitive.bind(*subfuns, *ins, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _materialize(x: Any) -> Any:
    """The dense tensor at the point of use (then the recorded layout ops replayed)."""
    if not isinstance(x, _QVal):
        return x
    y = x.qa.materialize()
    for eqn in x.ops:
        y = _bind(eqn, [y])[0]
    return y


def _qdot(eqn: Any, ins: list, wi: int, products: dict) -> jax.Array | None:
    """A dot_general with a compressed operand as that leaf's site op, or None if it is not
    one (then the leaf is materialized). ``products`` gives each activation a cache that the
    leaves meeting it share (a fused group computes its product once)."""
    v: _QVal = ins[wi]
    qa = v.qa
    geo = site_geometry(eqn, wi, v.dims)
    if (geo is None or geo.leaf_axes != (qa.axis + qa.ndim,)
            or sorted(d for d in v.dims if d is not None) != list(range(qa.ndim))
            or len(v.dims) != qa.ndim):
        return None
    x = ins[1 - wi]
    xc = geo.x_contract[0]
    xm = jnp.moveaxis(x, xc, -1)
    # x is kept beside its cache so that its id is not reused while the cache lives.
    _, cache = products.setdefault((id(x), xc), (x, {}))
    y = site_matmul(qa, xm, cache)
    rest_leaf = [d for d in range(qa.ndim) if d != geo.leaf_axes[0]]
    w_free = [v.dims[d] for d in range(len(v.dims)) if d != geo.w_contract[0]]
    nx = xm.ndim - 1
    perm_w = [nx + rest_leaf.index(leaf_dim) for leaf_dim in w_free]
    perm = [*range(nx), *perm_w] if wi == 1 else [*perm_w, *range(nx)]
    return jnp.transpose(y, perm).astype(eqn.outvars[0].aval.dtype)


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def eval_jaxpr(jaxpr: Any, args: list) -> list:
    """Evaluate ``jaxpr`` where some values are compressed leaves (:class:`_QVal`)."""
    jaxpr, consts = closed_parts(jaxpr)
    env: dict = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    products: dict = {}  # per activation, the leaves' shared products (see _qdot)
    for eqn in jaxpr.eqns:
        outs = _eval_eqn(eqn, [_read(env, v) for v in eqn.invars], products)
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [_read(env, v) for v in jaxpr.outvars]


def _eval_eqn(eqn: Any, ins: list, products: dict) -> list:
    q = [i for i, x in enumerate(ins) if isinstance(x, _QVal)]
    if not q:
        return _bind(eqn, ins)
    name = eqn.primitive.name
    if name == "dot_general" and len(q) == 1:
        y = _qdot(eqn, ins, q[0], products)
        if y is not None:
            return [y]
    if q == [0]:
        dims = layout_dims(eqn, ins[0].dims)
        if dims is not None:
            return [_QVal(ins[0].qa, (*ins[0].ops, eqn), dims)]
    handler = _HIGHER_ORDER.get(name)
    if handler is not None:
        return handler(eqn, ins)
    body = call_jaxpr(eqn)
    if body is not None:
        k = len(closed_parts(body)[0].invars)
        return eval_jaxpr(body, ins[len(ins) - k:])
    if handler is not None:
        return handler(eqn, ins)
    return _bind(eqn, [_materialize(x) for x in ins])


def _scan(eqn: Any, ins: list) -> list:
    p = eqn.params
    nc, ncar = p["num_consts"], p["num_carry"]
    consts = ins[:nc]
    carry = [_materialize(c) for c in ins[nc:nc + ncar]]
    xs, kinds = [], []
    for x in ins[nc + ncar:]:
        if isinstance(x, _QVal) and x.qa.scannable and is_identity(x.dims):
            xs.append(x.qa)  # lax.scan slices its children: one leaf per layer
            kinds.append((tuple(e for e in x.ops if e.primitive.name in VALUE_OPS),
                          tuple(range(x.qa.ndim - 1))))
        else:
            xs.append(_materialize(x))
            kinds.append(None)

    def body(c, xt):
        x_t = [x if k is None else _QVal(x, *k) for x, k in zip(xt, kinds)]
        outs = [_materialize(o) for o in eval_jaxpr(p["jaxpr"], consts + list(c) + x_t)]
        return outs[:ncar], outs[ncar:]

    c, ys = jax.lax.scan(body, carry, xs, length=p["length"], reverse=p["reverse"],
                         unroll=p["unroll"])
    return list(c) + list(ys)


def _cond(eqn: Any, ins: list) -> list:
    ops = ins[1:]
    arrays = [o for o in ops if not isinstance(o, _QVal)]

    def branch(jaxpr):
        def run(*arr):
            it = iter(arr)
            args = [o if isinstance(o, _QVal) else next(it) for o in ops]
            return [_materialize(o) for o in eval_jaxpr(jaxpr, args)]
        return run

    return jax.lax.switch(ins[0], [branch(b) for b in eqn.params["branches"]], *arrays)


def _while(eqn: Any, ins: list) -> list:
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = ins[:cn], ins[cn:cn + bn]
    carry = [_materialize(c) for c in ins[cn + bn:]]

    def cond_fn(c):
        return _materialize(eval_jaxpr(p["cond_jaxpr"], cconsts + list(c))[0])

    def body_fn(c):
        return [_materialize(o) for o in eval_jaxpr(p["body_jaxpr"], bconsts + list(c))]

    return list(jax.lax.while_loop(cond_fn, body_fn, carry))


def _checkpoint(eqn: Any, ins: list) -> list:
    """A remat region stays one: the interpreted body under ``jax.checkpoint`` with the model's
    policy, the compressed leaves passed in by their children (so their float children are
    rematerialized, not saved, like the dense weights they replace)."""
    flat, specs = [], []
    for x in ins:
        if isinstance(x, _QVal):
            children, treedef = jax.tree.flatten(x.qa)
            specs.append((len(children), treedef, x.ops, x.dims))
            flat.extend(children)
        else:
            specs.append(None)
            flat.append(x)

    def body(*arrays):
        it = iter(arrays)
        args = [next(it) if spec is None else
                _QVal(jax.tree.unflatten(spec[1], [next(it) for _ in range(spec[0])]),
                      spec[2], spec[3]) for spec in specs]
        return [_materialize(o) for o in eval_jaxpr(eqn.params["jaxpr"], args)]

    return jax.checkpoint(body, prevent_cse=eqn.params["prevent_cse"],
                          policy=eqn.params["policy"])(*flat)


_HIGHER_ORDER: dict[str, Callable] = {"scan": _scan, "cond": _cond, "while": _while,
                                      "remat2": _checkpoint, "checkpoint": _checkpoint}


def apply(apply_fn: Callable) -> Callable:
    """``fn(params, *inputs)`` that runs ``apply_fn`` on params holding compressed leaves.

    Jit-compatible (wrap the result in ``jax.jit``) and differentiable with respect to the
    leaves' float children (see :func:`jaxq.partition`). Each leaf runs its own site op at its
    matmuls and is materialized at any other point of use, never all at once up front.

    >>> import jax.numpy as jnp, jaxq
    >>> params = {"w": jaxq.quantize(jnp.ones((64, 8)), bits=8, group_size=32, axis=-2)}
    >>> apply(lambda p, x: x @ p["w"])(params, jnp.ones((2, 64))).shape
    (2, 8)
    """
    cache: dict = {}

    def fn(params: Any, *inputs: Any) -> Any:
        named, treedef = flatten_with_paths(params)
        leaves = [leaf for _, leaf in named]
        flat_in, in_tree = jax.tree.flatten(inputs)
        key = (treedef, in_tree, tuple(_spec_key(x) for x in (*leaves, *flat_in)))
        traced = cache.get(key)
        if traced is None:
            specs = [jax.ShapeDtypeStruct(x.shape, x.dtype)
                     if is_leaf(x) else x for x in leaves]
            traced = cache[key] = trace(apply_fn, jax.tree.unflatten(treedef, specs), *inputs)
        args = [_QVal(x, (), tuple(range(x.ndim))) if is_leaf(x) else x
                for x in leaves]
        outs = eval_jaxpr(traced.jaxpr, args + flat_in)
        return jax.tree.unflatten(traced.out_tree, [_materialize(o) for o in outs])

    return fn


def _spec_key(x: Any) -> Any:
    if is_leaf(x):
        return ("q", x.shape, jnp.dtype(x.dtype).name, jax.tree.structure(x))
    s = placeholder(x)
    return (s.shape, jnp.dtype(s.dtype).name)
