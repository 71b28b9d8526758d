"""The statistics interpreter: evaluate a model's jaxpr on calibration batches, feed each site's
inputs to collectors, and (sequential mode) compress each weight as soon as its statistics are
complete, so that every later layer is calibrated on the outputs of the compressed earlier ones.

How it runs:

* All batches advance together, one equation at a time; a value that depends on the batch is
  kept as a list with one array per batch (:class:`Batched`), so memory is one layer's
  activations times the number of batches, and dead values are dropped as soon as their last
  reader has run. Equations whose inputs do not depend on the batch run once.
* Each equation runs through ``jax.jit(primitive.bind)`` cached by (primitive, params); jit's
  own cache keys on shapes. Sub-jaxprs without any weight inside are bound whole.
* The pass's outputs are thrown away, so only equations whose results reach a site, an effect
  or a needed output run (through ``jit`` bodies too): a language model's logits never do.
* A param leaf flows through the jaxpr as a :class:`_View`: a reference to the weight plus the
  layout ops applied to it so far. Replaying those ops on the *current* weight (float or
  compressed-and-dequantized) is how a compression made at one site reaches every later use.
* Sub-jaxprs holding weights are entered: ``jit``, ``custom_jvp``/``custom_vjp``,
  ``checkpoint``; ``cond`` (each batch takes its own branch); ``while`` (looped on concrete
  predicates, batches leaving the loop when their own predicate turns false); ``scan``
  (unrolled; a stacked leaf fed as ``xs`` becomes one weight per slice).

When is a weight's statistics "complete"? After the last of its site equations has been reached
by all batches (uses are counted statically, so a leaf used at several sites, e.g. a weight
applied twice, accumulates over all of them before it is compressed). A site inside a loop that
re-reads the same weight (a ``while`` body, or a ``scan`` body using a non-stacked weight) is
complete when that loop exits; sites in a ``cond`` branch that no batch took are counted as
done when the ``cond`` returns. Uses that are not sites (an embedding gather, a weight consumed
through arithmetic, or the same leaf contracted on another axis) see the weight as it is at that
point of the pass: float before its sites complete, compressed after. A tied embedding used as
a gather then as the output head is therefore compressed at the head with the head's inputs.

Stacked leaves: statistics and compression are per slice; ``stats[path][name]`` has a leading
layer dimension (index ``i`` = slice ``i`` of the stacked leaf), and the compressed leaf is the
slices' results stacked (a stacked QArray with per-layer scales, or a stacked float array).

Statistics are sums, counts and maxima until finalized; pass ``reduce_stats`` to combine the raw
states across data-parallel devices or hosts before they are finalized.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jaxq.calib import collectors as coll
from jaxq.calib.groups import bind_groups, folding_steps, traced_scale_groups
from jaxq.calib.sharded import MeshLayout
from jaxq.calib.trace import (
    SITE_PRIMITIVES,
    VALUE_OPS,
    Site,
    Traced,
    bind_parts,
    call_jaxpr,
    closed_parts,
    find_sites,
    is_identity,
    layout_dims,
    site_geometry,
    trace,
)
from jaxq.core.finite import check_finite
from jaxq.core.leaf import is_leaf
from jaxq.core.transform import Transform
from jaxq.core.tree import flatten_with_paths

Stats = dict[str, dict[str, Any]]
_UNSET = object()


class Checkpoint(Protocol):
    """Where calibration keeps each weight's result as it completes (its compressed leaf; in a
    statistics pass, its statistics), so that a killed run picks up where it stopped
    (:class:`jaxq.calib.LayerCheckpoint` keeps them on disk)."""

    def load(self, key: str) -> Any | None:
        """The result saved under ``key``, or None."""

    def save(self, key: str, leaf: Any) -> None:
        """Keep ``leaf``, the result of the weight ``key``."""


class Batched(list):
    """One value per calibration batch."""


# --- jit-compiled equation binds ---------------------------------------------------------------

_BINDS: dict[Any, Callable] = {}


def compiled(eqn: Any) -> Callable[..., list]:
    """``jax.jit`` of the equation's primitive bind, shared by equal (primitive, params)."""
    prim = eqn.primitive
    try:
        key: Any = (prim, tuple(sorted(eqn.params.items())))
        hash(key)
    except TypeError:
        key = (prim, id(eqn), eqn)  # the eqn itself keeps the id from being reused
    fn = _BINDS.get(key)
    if fn is None:
        subfuns, params = bind_parts(eqn)

        def run(*args):
            out = prim.bind(*subfuns, *args, **params)
            return list(out) if prim.multiple_results else [out]

        if len(_BINDS) > 8192:
            _BINDS.clear()
        fn = _BINDS[key] = jax.jit(run)
    return fn


@jax.jit
def _take(x: jax.Array, i: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _read(env: dict, v: Any) -> Any:
    return v.val if isinstance(v, jcore.Literal) else env[v]


def _last_uses(jaxpr: Any) -> list[list[Any]]:
    """Vars to drop after each equation (never the jaxpr's outputs)."""
    last: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                last[v] = i
    keep = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    drops: list[list[Any]] = [[] for _ in jaxpr.eqns]
    for v, i in last.items():
        if v not in keep:
            drops[i].append(v)
    return drops


def _live_outputs(jaxpr: Any, live_outs: Sequence[bool], holds_site: Callable[[int], bool]
                  ) -> list[tuple[bool, ...] | None]:
    """Per equation, which of its outputs something needs; None: the equation need not run.

    The pass's own outputs are thrown away, so work whose results reach neither a site, an
    effect nor a needed output (the logits of a language model's head, say) is skipped.
    """
    live = {v for v, keep in zip(jaxpr.outvars, live_outs)
            if keep and not isinstance(v, jcore.Literal)}
    plan: list[tuple[bool, ...] | None] = [None] * len(jaxpr.eqns)
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        outs = tuple(v in live for v in eqn.outvars)
        if any(outs) or eqn.effects or holds_site(i):
            plan[i] = outs
            live.update(v for v in eqn.invars if not isinstance(v, jcore.Literal))
    return plan


# --- weights as they flow through the pass ------------------------------------------------

@dataclasses.dataclass(eq=False)
class _Ref:
    """One weight being calibrated: a param leaf, or one slice of a stacked leaf."""

    path: str
    leaf: Any                   # what the transform receives (original leaf or its slice)
    value: Any                  # float array the pass computes with
    site: Site | None
    ids: frozenset              # site equations that feed this weight's statistics
    home: int                   # loop depth it lives at; completes only there
    collectors: tuple[coll.Collector, ...]
    pending: set = dataclasses.field(default_factory=set)
    states: tuple | None = None
    stats: dict | None = None
    done: bool = False
    compressed: Any = _UNSET
    version: int = 0
    slices: dict = dataclasses.field(default_factory=dict)
    key: str = ""               # its checkpoint key: the path, ``path@i`` for slice i
    restored: Any = _UNSET      # what a checkpoint held for it: compressed leaf or statistics


@dataclasses.dataclass(eq=False)
class _View:
    """A leaf-derived value: ``ops`` (layout equations) replayed on the weight's current value."""

    ref: _Ref
    ops: tuple
    dims: tuple
    cache: tuple = (-1, None)

    def value(self) -> Any:
        if self.cache[0] != self.ref.version:
            x = self.ref.value
            for eqn in self.ops:
                x = compiled(eqn)(x)[0]
            self.cache = (self.ref.version, x)
        return self.cache[1]


@jax.jit
def _dequantize(leaf: Any) -> jax.Array:
    return leaf.materialize()


def _as_float(leaf: Any, like: Any) -> Any:
    """The float tensor a compressed leaf stands for (jit-compiled: eager dequantization
    would compile each of its small ops separately)."""
    if is_leaf(leaf):
        leaf = _dequantize(leaf)
    return jnp.asarray(leaf).astype(jnp.result_type(like))


def _slice_leaf(leaf: Any, i: int) -> Any:
    return jax.tree.map(lambda c: c[i], leaf)


def stack_leaves(leaves: Sequence[Any], path: str = "") -> Any:
    """Stack per-slice results (QArrays with equal metadata, or arrays) along a new axis 0."""
    try:
        return jax.tree.map(lambda *cs: jnp.stack(cs), *leaves)
    except ValueError as e:
        raise ValueError(f"'{path}': the transform gave slices of a stacked leaf different "
                         f"structures or metadata, so they cannot be re-stacked: {e}") from None


# --- the interpreter ----------------------------------------------------------------------

class _Calibrator:
    def __init__(self, traced: Traced, sites: dict[str, Site], transform: Transform | None,
                 extra: Sequence[coll.Collector], sequential: bool,
                 reduce_stats: Callable | None, progress: Any, masks: list | None = None,
                 programs: _Programs | None = None, n: int = 1,
                 layout: MeshLayout | None = None, allow_nonfinite: bool | None = None,
                 checkpoint: Checkpoint | None = None):
        self.traced, self.sites, self.transform = traced, sites, transform
        # Per-batch statistics: replicated over the mesh (summed across its data axis).
        self.batch_deltas = layout.batch_deltas if layout is not None else coll.batch_deltas
        self.allow_nonfinite = allow_nonfinite
        self.checkpoint = checkpoint
        self.masks, self.programs = masks, programs
        self.ids: list[int] = list(range(n))  # global batch index of each batch in the pass
        self.sequential, self.reduce_stats, self.progress = sequential, reduce_stats, progress
        self.live: list[_Ref] = []
        # (activation, (collectors, contract, k), per-batch deltas) of the last site collected.
        self.shared_deltas: tuple | None = None
        # Every prefix of every site equation's identity: the equations that hold a site.
        self.site_scopes = {sid[:m] for s in sites.values() for sid in s.ids
                            for m in range(1, len(sid) + 1)}
        self.roots = [self._root(p, leaf, extra) for p, leaf in zip(traced.paths, traced.leaves)]

    # -- setup ---------------------------------------------------------------------------
    def _root(self, path: str, leaf: Any, extra: Sequence[coll.Collector]) -> _Ref:
        site = self.sites.get(path)
        cols: tuple[coll.Collector, ...] = ()
        if site is not None:
            needs = self.transform.required_stats(path, leaf) if self.transform else ()
            by_name = {n: coll.get_collector(n) for n in sorted(needs)}
            by_name.update({c.name: c for c in extra if c.name not in by_name})
            cols = tuple(by_name.values())
        ids = frozenset(site.ids) if site is not None and not site.stacked else frozenset()
        value = _dequantize(leaf) if is_leaf(leaf) else leaf
        ref = _Ref(path, leaf, value, site, ids, 0, cols, pending=set(ids), key=path)
        if ids:
            self.restore(ref)
            self.live.append(ref)
        return ref

    def restore(self, ref: _Ref) -> None:
        """Take what the checkpoint holds for a weight: its compressed result, or in a pass
        without a transform, its statistics."""
        if self.checkpoint is not None:
            found = self.checkpoint.load(ref.key)
            if found is not None:
                ref.restored = found
                if self.transform is None:
                    ref.stats = dict(found)

    def keep(self, ref: _Ref) -> None:
        """Hand a completed weight's result to the checkpoint (unless it came from there)."""
        if self.checkpoint is None or ref.restored is not _UNSET:
            return
        if self.transform is None:
            if ref.stats:
                self.checkpoint.save(ref.key, ref.stats)
        elif ref.compressed is not _UNSET and ref.compressed is not ref.leaf:
            self.checkpoint.save(ref.key, ref.compressed)

    # -- reading values ------------------------------------------------------------------
    @staticmethod
    def value(x: Any) -> Any:
        return x.value() if isinstance(x, _View) else x

    def bind(self, eqn: Any, ins: list, n: int, sid: tuple = ()) -> list:
        ins = [self.value(x) for x in ins]
        progs = self.programs
        if any(isinstance(x, Batched) for x in ins) or (progs is not None
                                                        and sid in progs.varying):
            fns = ([compiled(eqn)] * n if progs is None
                   else [self.compiled_for(b, eqn, sid) for b in range(n)])
            per = [fns[b](*[x[b] if isinstance(x, Batched) else x for x in ins])
                   for b in range(n)]
            return [Batched(col) for col in zip(*per)]
        return compiled(eqn)(*ins)

    def compiled_for(self, b: int, eqn: Any, sid: tuple) -> Callable[..., list]:
        """The bind of batch ``b``'s own equation (ragged batches trace their own program)."""
        if self.programs is not None and sid:
            own = self.programs.per_batch[self.ids[b]]
            if own is not None:
                eqn = own[sid]
        return compiled(eqn)

    def subset(self, members: Sequence[int]) -> list[int]:
        """Narrow the pass to some of its batches; returns the ids to restore after."""
        saved = self.ids
        self.ids = [saved[j] for j in members]
        return saved

    # -- the loop ------------------------------------------------------------------------
    def eval_jaxpr(self, jaxpr: Any, args: Sequence[Any], prefix: tuple, depth: int,
                   n: int, live_outs: Sequence[bool] | None = None) -> list:
        """Evaluate ``jaxpr``; ``live_outs`` marks the outputs the caller reads (None: all)."""
        jaxpr, consts = closed_parts(jaxpr)
        env: dict = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        if live_outs is None:
            live_outs = [True] * len(jaxpr.outvars)
        plan = _live_outputs(jaxpr, live_outs, lambda i: (*prefix, i) in self.site_scopes)
        for i, (eqn, outs_live, drops) in enumerate(zip(jaxpr.eqns, plan, _last_uses(jaxpr))):
            if outs_live is not None:
                ins = [_read(env, v) for v in eqn.invars]
                outs = self.eval_eqn(eqn, ins, (*prefix, i), depth, n, outs_live)
                for v, o, keep in zip(eqn.outvars, outs, outs_live):
                    if keep and not isinstance(v, jcore.DropVar):
                        env[v] = o
            for v in drops:
                env.pop(v, None)
        return [_read(env, v) if keep else None for v, keep in zip(jaxpr.outvars, live_outs)]

    def eval_eqn(self, eqn: Any, ins: list, sid: tuple, depth: int, n: int,
                 outs_live: tuple[bool, ...]) -> list:
        views = [i for i, x in enumerate(ins) if isinstance(x, _View)]
        if not views:
            return self.bind(eqn, ins, n, sid)
        name = eqn.primitive.name
        if name in SITE_PRIMITIVES:
            return self.site(eqn, ins, sid, depth, n, any(outs_live))
        if views == [0]:
            dims = layout_dims(eqn, ins[0].dims)
            if dims is not None:
                return [_View(ins[0].ref, (*ins[0].ops, eqn), dims)]
        handler = _HIGHER_ORDER.get(name)
        if handler is None and call_jaxpr(eqn) is not None:
            return self.call(eqn, ins, sid, depth, n, outs_live)
        if handler is not None:
            return handler(self, eqn, ins, sid, depth, n)
        return self.bind(eqn, ins, n, sid)

    # -- sites ---------------------------------------------------------------------------
    def site(self, eqn: Any, ins: list, sid: tuple, depth: int, n: int,
             out_needed: bool) -> list:
        w = [i for i in (0, 1) if isinstance(ins[i], _View)]
        if len(w) == 1 and sid in ins[w[0]].ref.ids:
            view = ins[w[0]]
            geo = site_geometry(eqn, w[0], view.dims)
            if geo is not None and not view.ref.done and view.ref.restored is _UNSET:
                self.collect(view.ref, geo.x_contract, geo.k, ins[1 - w[0]], n)
            view.ref.pending.discard(sid)
            self.settle(depth)
        return self.bind(eqn, ins, n, sid) if out_needed else [None] * len(eqn.outvars)

    def collect(self, ref: _Ref, contract: tuple, k: int, x: Any, n: int) -> None:
        if not ref.collectors:
            return
        if ref.states is None:
            ref.states = tuple(c.init(k) for c in ref.collectors)
        key = (ref.collectors, contract, k)
        shared = self.shared_deltas
        if shared is not None and shared[0] is x and shared[1] == key:
            deltas = shared[2]  # a sibling site read this very activation: reuse its work
        else:
            xs = x if isinstance(x, Batched) else [self.value(x)] * n
            deltas = [self.batch_deltas(ref.collectors, contract, k, xb,
                                        self.row_mask(xb, contract, ref.path, b))
                      for b, xb in enumerate(xs)]
            self.shared_deltas = (x, key, deltas)
        for d in deltas:
            ref.states = coll.combine(ref.collectors, ref.states, d)

    def row_mask(self, x: jax.Array, contract: tuple, path: str, b: int) -> jax.Array | None:
        """Batch ``b``'s mask over the rows of ``x`` (None: every row counts)."""
        if self.masks is None:
            return None
        m = self.masks[self.ids[b]]
        rows = 1
        for d in range(x.ndim):
            if d not in contract:
                rows *= x.shape[d]
        if m is None or m.shape[0] != rows:
            return None
        return m

    def settle(self, depth: int) -> None:
        """Complete every weight at this depth whose site equations have all run."""
        for ref in list(self.live):
            if ref.home == depth and not ref.pending:
                self.complete(ref)

    def clear(self, prefix: tuple) -> None:
        """A region (cond/while/scan) has returned: its site equations are all done."""
        m = len(prefix)
        for ref in self.live:
            ref.pending = {s for s in ref.pending if s[:m] != prefix}

    def complete(self, ref: _Ref) -> None:
        ref.done = True
        self.live.remove(ref)
        self.finalize(ref)
        if self.progress is not None:
            self.progress()
        if self.sequential:
            self.compress(ref)
        self.keep(ref)

    def finalize(self, ref: _Ref) -> dict | None:
        if ref.stats is None and ref.states is not None:
            out = {}
            for c, state in zip(ref.collectors, ref.states):
                if self.reduce_stats is not None:
                    state = jax.tree.map(lambda s, how=c.reduce: self.reduce_stats(s, how),
                                         state)
                out[c.name] = c.finalize(state)
            ref.stats = out
            # Named here, not as the next layer's failed factorization or NaN output.
            check_finite(out, f"the input of layer {ref.path} overflows or holds NaN/Inf: "
                         "calibration statistic", allow=self.allow_nonfinite)
        return ref.stats

    def compress(self, ref: _Ref) -> None:
        if ref.compressed is not _UNSET:
            return
        if ref.restored is not _UNSET and self.transform is not None:
            new = ref.restored
        else:
            stats = self.finalize(ref)
            axis = ref.site.axis if ref.site is not None else None
            new = (self.transform.apply_leaf(ref.path, ref.leaf, axis=axis, stats=stats)
                   if self.transform is not None else ref.leaf)
            if new is not ref.leaf:  # before later layers calibrate on its output
                check_finite({ref.path: new}, "compressed weight", allow=self.allow_nonfinite)
        ref.compressed = new
        if new is not ref.leaf:
            ref.value = _as_float(new, ref.value)
            ref.version += 1

    # -- higher-order primitives ---------------------------------------------------------
    def call(self, eqn: Any, ins: list, sid: tuple, depth: int, n: int,
             live_outs: Sequence[bool] | None = None) -> list:
        body = call_jaxpr(eqn)
        inner = closed_parts(body)[0]
        if live_outs is not None and len(live_outs) != len(inner.outvars):
            live_outs = None
        return self.eval_jaxpr(body, ins[len(ins) - len(inner.invars):], sid, depth, n,
                               live_outs)

    def cond(self, eqn: Any, ins: list, sid: tuple, depth: int, n: int) -> list:
        branches = eqn.params["branches"]
        idx, ops = self.value(ins[0]), ins[1:]

        def clamp(i):
            return min(max(int(i), 0), len(branches) - 1)

        if not isinstance(idx, Batched):
            b = clamp(idx)
            outs = self.eval_jaxpr(branches[b], ops, (*sid, b), depth, n)
        else:
            per: list = [None] * n
            groups: dict[int, list[int]] = {}
            for bi, v in enumerate(idx):
                groups.setdefault(clamp(v), []).append(bi)
            for b, members in groups.items():
                sub = [_subset(x, members) for x in ops]
                saved = self.subset(members)
                try:
                    outs = self.eval_jaxpr(branches[b], sub, (*sid, b), depth, len(members))
                finally:
                    self.ids = saved
                for j, bi in enumerate(members):
                    per[bi] = [self.pick(o, j) for o in outs]
            outs = [Batched(col) for col in zip(*per)]
        self.clear(sid)
        self.settle(depth)
        return outs

    def pick(self, x: Any, j: int) -> Any:
        return x[j] if isinstance(x, Batched) else self.value(x)

    def while_(self, eqn: Any, ins: list, sid: tuple, depth: int, n: int) -> list:
        p = eqn.params
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        cconsts, bconsts = ins[:cn], ins[cn:cn + bn]
        carry = [self.value(c) for c in ins[cn + bn:]]
        csid, bsid = (*sid, "cond"), (*sid, "body")
        if not any(isinstance(x, Batched) for x in ins):
            while bool(self.eval_jaxpr(p["cond_jaxpr"], cconsts + carry, csid, depth + 1, n)[0]):
                outs = self.eval_jaxpr(p["body_jaxpr"], bconsts + carry, bsid, depth + 1, n)
                carry = [self.value(o) for o in outs]
        else:
            per = [[self.pick(c, b) for b in range(n)] for c in carry]
            active = list(range(n))
            while active:
                sub = [Batched([c[b] for b in active]) for c in per]
                m = len(active)
                saved = self.subset(active)
                try:
                    pred = self.eval_jaxpr(p["cond_jaxpr"], [_subset(x, active)
                                                             for x in cconsts] + sub,
                                           csid, depth + 1, m)[0]
                finally:
                    self.ids = saved
                keep = [j for j in range(m) if bool(self.pick(pred, j))]
                if not keep:
                    break
                active = [active[j] for j in keep]
                sub = [Batched([c[b] for b in active]) for c in per]
                saved = self.subset(active)
                try:
                    outs = self.eval_jaxpr(p["body_jaxpr"], [_subset(x, active)
                                                             for x in bconsts] + sub,
                                           bsid, depth + 1, len(active))
                finally:
                    self.ids = saved
                for c, o in zip(per, outs):
                    for j, b in enumerate(active):
                        c[b] = self.pick(o, j)
            carry = [Batched(c) for c in per]
        self.clear(sid)
        self.settle(depth)
        return carry

    def scan(self, eqn: Any, ins: list, sid: tuple, depth: int, n: int) -> list:
        p = eqn.params
        nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
        if length == 0:
            return self.bind(eqn, ins, n, sid)
        consts, xs = ins[:nc], ins[nc + ncar:]
        carry = [self.value(c) for c in ins[nc:nc + ncar]]
        ys: list[list] = []
        stacked: list[_Ref] = []
        order = range(length - 1, -1, -1) if p["reverse"] else range(length)
        for t in order:
            x_t = [self.slice_xs(x, t, sid, depth, stacked) for x in xs]
            outs = self.eval_jaxpr(p["jaxpr"], consts + carry + x_t, sid, depth + 1, n)
            carry = [self.value(o) for o in outs[:ncar]]
            ys.append([self.value(o) for o in outs[ncar:]])
            for x in x_t:
                if isinstance(x, _View) and x.ref in self.live:
                    x.ref.pending.clear()
                    self.complete(x.ref)
        if p["reverse"]:
            ys.reverse()
        for root in stacked:
            if self.sequential:
                root.value = stack_leaves([root.slices[t].value for t in range(length)])
                root.version += 1
        self.clear(sid)
        self.settle(depth)
        return carry + [_stack(list(col), n) for col in zip(*ys)]

    def slice_xs(self, x: Any, t: int, sid: tuple, depth: int, stacked: list) -> Any:
        if isinstance(x, Batched):
            return Batched([_take(xb, t) for xb in x])
        if isinstance(x, _View) and is_identity(x.dims) and x.ref.site is not None:
            root = x.ref
            ids = frozenset(s for s in root.site.ids
                            if root.site.stacked and s[:len(sid)] == sid)
            if ids:
                ref = _Ref(root.path, _slice_leaf(root.leaf, t), _take(root.value, t),
                           root.site, ids, depth + 1, root.collectors, pending=set(ids),
                           key=f"{root.path}@{t}")
                self.restore(ref)
                root.slices[t] = ref
                self.live.append(ref)
                if root not in stacked:
                    stacked.append(root)
                ops = tuple(e for e in x.ops if e.primitive.name in VALUE_OPS)
                return _View(ref, ops, tuple(range(len(x.dims) - 1)))
        return _take(self.value(x), t)


_HIGHER_ORDER: dict[str, Callable] = {
    "cond": _Calibrator.cond,
    "while": _Calibrator.while_,
    "scan": _Calibrator.scan,
}


def _subset(x: Any, idx: Sequence[int]) -> Any:
    return Batched([x[i] for i in idx]) if isinstance(x, Batched) else x


def _stack(col: list, n: int) -> Any:
    if any(isinstance(y, Batched) for y in col):
        return Batched([jnp.stack([y[b] if isinstance(y, Batched) else y for y in col])
                        for b in range(n)])
    return jnp.stack(col)


# --- public entry point -------------------------------------------------------------------

def _normalize_batches(batches: Iterable[Any]) -> list[tuple]:
    out = [b if isinstance(b, tuple) else (b,) for b in batches]
    if not out:
        raise ValueError("calibrate() needs at least one batch")
    first = jax.tree.structure(out[0])
    for i, b in enumerate(out[1:], 1):
        if jax.tree.structure(b) != first:
            raise ValueError(f"calibration batch {i} differs in structure from batch 0 "
                             f"({jax.tree.structure(b)} vs {first})")
    return out


def _normalize_masks(mask: Sequence[Any] | None, n: int) -> list | None:
    if mask is None:
        return None
    masks = list(mask)
    if len(masks) != n:
        raise ValueError(f"calibrate(): mask has {len(masks)} entries for {n} batches "
                         "(give one per batch, None where nothing is padded)")
    return [None if m is None else jnp.asarray(m).astype(jnp.float32).reshape(-1)
            for m in masks]


def _signature(batch: tuple) -> tuple:
    return tuple((jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(batch))


def _eqn_map(jaxpr: Any, prefix: tuple, out: dict) -> dict:
    """Every equation by its identity in the interpreter (``sid``), sub-jaxprs included."""
    jaxpr, _ = closed_parts(jaxpr)
    for i, eqn in enumerate(jaxpr.eqns):
        sid = (*prefix, i)
        out[sid] = eqn
        body = call_jaxpr(eqn)
        name = eqn.primitive.name
        if body is not None:
            _eqn_map(body, sid, out)
        elif name == "cond":
            for b, br in enumerate(eqn.params["branches"]):
                _eqn_map(br, (*sid, b), out)
        elif name == "while":
            _eqn_map(eqn.params["cond_jaxpr"], (*sid, "cond"), out)
            _eqn_map(eqn.params["body_jaxpr"], (*sid, "body"), out)
        elif name == "scan":
            _eqn_map(eqn.params["jaxpr"], sid, out)
    return out


@dataclasses.dataclass
class _Programs:
    """Ragged batches: each batch's own equation at every ``sid`` (None: batch 0's program)
    and the equations whose shapes or parameters differ between programs (``varying``: they
    are bound per batch even when no batch-dependent value enters them, e.g. a position iota).
    """

    per_batch: list
    varying: frozenset


def _programs(apply_fn: Callable, params: Any, batches: list, traced: Traced
              ) -> _Programs | None:
    sigs = [_signature(b) for b in batches]
    if len(set(sigs)) == 1:
        return None
    base = _eqn_map(traced.jaxpr, (), {})
    maps: dict = {sigs[0]: None}
    varying: set = set()
    for sig, b in zip(sigs, batches):
        if sig in maps:
            continue
        other = _eqn_map(trace(apply_fn, params, *b).jaxpr, (), {})
        if other.keys() != base.keys() or any(
                other[k].primitive != e.primitive or (e.primitive.name == "scan" and
                                                      other[k].params["length"]
                                                      != e.params["length"])
                for k, e in base.items()):
            raise ValueError(
                f"calibration batches of shapes {[s for s, _ in sigs[0]]} and "
                f"{[s for s, _ in sig]} trace to different programs (the model branches on "
                "shape); calibrate each shape bucket that traces alike in its own call, or pad "
                "and pass mask=")
        for k, e in base.items():
            o = other[k]
            if ([v.aval.shape for v in o.outvars] != [v.aval.shape for v in e.outvars]
                    or (call_jaxpr(e) is None and e.primitive.name not in _HIGHER_ORDER
                        and str(o.params) != str(e.params))):
                varying.add(k)
        maps[sig] = other
    return _Programs([maps[s] for s in sigs], frozenset(varying))


def _check_needs(traced: Traced, sites: dict[str, Site], transform: Transform | None) -> None:
    if transform is None:
        return
    for path, leaf in zip(traced.paths, traced.leaves):
        needs = transform.required_stats(path, leaf)
        if needs and path not in sites:
            raise ValueError(
                f"{type(transform).__name__} needs calibration statistics {sorted(needs)} for "
                f"'{path}', but no matmul or convolution in apply_fn consumes that leaf (through "
                "layout ops only), so they cannot be collected; leave it out with where=")
        for name in needs:
            coll.get_collector(name)


def _progress_bar(total: int, enabled: bool) -> tuple[Any, Callable | None]:
    if not enabled or total == 0:
        return None, None
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("calibrating sites", total=total)
    bar.start()
    return bar, lambda: bar.advance(task)


def _prepare(apply_fn: Callable, params: Any, batches: list, mask: Sequence[Any] | None,
             layout: MeshLayout | None) -> tuple[Traced, Any, list, list | None]:
    """Trace the model; with a mesh, first split the batches (and masks) over its data axis,
    then place the params (a site weight is never split along its input axis, nor a stacked
    one along its layers)."""
    if layout is not None:
        batches = layout.place_batches(batches)
        mask = layout.place_masks(mask)
    masks = _normalize_masks(mask, len(batches))
    traced = trace(apply_fn, params, *batches[0])
    if layout is not None:
        sites = find_sites(traced)
        keep = [(*s.axes, *((0,) if s.stacked else ())) if s is not None else ()
                for s in (sites.get(p) for p in traced.paths)]
        traced = dataclasses.replace(traced, leaves=tuple(layout.place_params(traced.leaves,
                                                                               keep)))
        params = jax.tree.unflatten(traced.treedef, traced.leaves)
    return traced, params, batches, masks


def _layout(mesh: Any, data_axis: str, model_axis: str | None) -> MeshLayout | None:
    if mesh is None:
        if model_axis is not None:
            raise ValueError(f"calibrate(): model_axis={model_axis!r} needs mesh=")
        return None
    return MeshLayout(mesh=mesh, data_axis=data_axis, model_axis=model_axis)


def calibrate(apply_fn: Callable, params: Any, batches: Iterable[Any],
              transform: Transform | None = None, *,
              collectors: Sequence[str | coll.Collector] | None = None,
              sequential: bool | None = None, progress: bool = True,
              reduce_stats: Callable[[Any, str], Any] | None = None,
              mask: Sequence[Any] | None = None, mesh: Any = None,
              data_axis: str = "data", model_axis: str | None = None,
              allow_nonfinite: bool | None = None,
              checkpoint: Checkpoint | None = None) -> tuple[Any, Stats]:
    """Run ``apply_fn(params, *batch)`` over ``batches``, collecting statistics at every site,
    and apply ``transform`` with them: the one entry point for calibrated transforms (the CLI
    runs recipes through it).

    Args:
      apply_fn: the model, ``apply_fn(params, *inputs)``.
      params: the params pytree (may already hold compressed leaves; they are left as they are
        unless the transform selects them).
      batches: input tuples (or single arrays). Shapes may differ between batches (ragged
        sequence lengths) as long as every shape traces to the same program.
      transform: what to apply; ``required_stats`` says which collectors each leaf needs.
        None: only collect statistics.
      collectors: statistics to collect at every site in addition (names or Collectors).
      sequential: True: compress each weight as soon as its statistics are complete and run the
        rest of the pass on it (GPTQ's true-sequential mode). False: collect everything on the
        float model first, then apply ``transform`` to the whole tree with the scale groups
        found from the trace (what AWQ and SmoothQuant need: their scales fold into norms and
        earlier linears, and a chain hands their scaled statistics to the next step). None
        (default): False when a step folds scales, else True. Asking for sequential mode with a
        folding step is an error (it cannot reach the other leaves).
      progress: show a rich progress bar over sites.
      reduce_stats: ``(state, how) -> state`` applied to each raw collector state (sums,
        counts, maxima; ``how`` is ``"sum"`` or ``"max"``) before it is finalized: the hook for
        data-parallel reduction (e.g. summing a state over hosts).
      mask: one array per batch (or None), 1/True at the positions that count: padding is
        left out of every statistic. A batch's mask has the shape of a site activation's row
        dimensions (``[batch, seq]`` for ``[batch, seq, features]``; any activation whose rows
        number ``mask.size`` is masked in that row order). Sites whose rows do not line up with
        the mask (a pooled ``[batch, features]`` head) see all their rows.
      mesh: a ``jax.sharding.Mesh`` to calibrate on (:mod:`jaxq.calib.sharded`): each batch
        (and mask) is split along its leading axis over ``data_axis`` and every statistic is
        summed across it; float weights are split over ``model_axis`` (None: replicated).
        Under ``jax.distributed`` the mesh spans all processes and each process passes its own
        batches (as many, of the same shapes, on every process) and the same params.
      data_axis, model_axis: mesh axis names (see ``mesh``).
      allow_nonfinite: NaN/Inf in a statistic (naming the layer whose input went non-finite)
        or in a compressed leaf (16-bit scales that overflow) is a
        :class:`~jaxq.core.finite.NonFiniteError` unless this lets it through with a warning
        (None: the enclosing :func:`jaxq.core.finite.allowing` block's setting).
      checkpoint: makes the pass resumable. Sequential mode: each weight the pass compresses
        goes to ``checkpoint.save(key, leaf)`` (``key``: its path; ``path@i`` for slice ``i``
        of a stacked leaf), and a weight whose ``checkpoint.load(key)`` returns a result takes
        it as is, neither collecting statistics nor running the transform. The pass still runs
        through such a weight, so the weights after it are calibrated on the very activations
        the first run gave them: a resumed run ends bit-identical to an uninterrupted one.
        Weights read back have no entry in ``stats``. Collect mode (or no transform): the
        checkpoint keeps each weight's statistics instead, so a resumed run collects only the
        missing ones; the whole-tree transform then runs in full.

    Returns:
      ``(new_params, stats)`` with ``stats[path][name]``; stacked leaves' statistics have a
      leading layer dimension. With a mesh, both are global arrays on it (statistics
      replicated, weights split as placed).
    """
    batches = _normalize_batches(batches)
    layout = _layout(mesh, data_axis, model_axis)
    folding = folding_steps(transform) if transform is not None else []
    if sequential and folding:
        raise ValueError(
            f"{', '.join(sorted(set(folding)))} folds scales into other leaves (norms, earlier "
            "linears), which sequential calibration cannot do; run it with sequential=False "
            "(the default for it)")
    if sequential is None:
        sequential = not folding
    traced, params, batches, masks = _prepare(apply_fn, params, batches, mask, layout)
    sites = find_sites(traced)
    programs = _programs(apply_fn, params, batches, traced)
    if sequential or transform is None:
        return _calibrate_traced(traced, sites, batches, transform, collectors=collectors,
                                 sequential=sequential, progress=progress,
                                 reduce_stats=reduce_stats, masks=masks, programs=programs,
                                 layout=layout, allow_nonfinite=allow_nonfinite,
                                 checkpoint=checkpoint)
    # Collect mode: statistics of the float model, then the transform on the whole tree (the
    # only way for steps that fold scales or change shapes across layers).
    needed = set(c if isinstance(c, str) else c.name for c in (collectors or ()))
    extra = [c for c in (collectors or ()) if not isinstance(c, str)]
    for path, leaf in zip(traced.paths, traced.leaves):
        needed |= transform.required_stats(path, leaf)
    _check_needs(traced, sites, transform)
    names = sorted(n for n in needed if n not in {c.name for c in extra})
    _, stats = _calibrate_traced(traced, sites, batches, None, collectors=[*names, *extra],
                                 sequential=True, progress=progress,
                                 reduce_stats=reduce_stats, masks=masks, programs=programs,
                                 layout=layout, allow_nonfinite=allow_nonfinite,
                                 checkpoint=checkpoint)
    bound = bind_groups(transform, traced_scale_groups(traced, sites)) if folding else transform
    new = bound(params, stats=stats, axes={p: s.axis for p, s in sites.items()})
    check_finite(new, "compressed weight", allow=allow_nonfinite)
    return new, stats


def _calibrate_traced(traced: Traced, sites: dict[str, Site], batches: list, transform,
                      *, collectors, sequential: bool, progress: bool,
                      reduce_stats, masks: list | None = None,
                      programs: _Programs | None = None,
                      layout: MeshLayout | None = None,
                      allow_nonfinite: bool | None = None,
                      checkpoint: Checkpoint | None = None,
                      outputs: list | None = None) -> tuple[Any, Stats]:
    """:func:`calibrate` on a model already traced (with its sites found); ``outputs``, when
    given, receives each batch's flat outputs, computed in the same pass."""
    _check_needs(traced, sites, transform)
    extra = [coll.get_collector(c) for c in (collectors or ())]
    total = sum(_slice_count(traced, p, s) for p, s in sites.items())
    bar, tick = _progress_bar(total, progress)
    try:
        cal = _Calibrator(traced, sites, transform, extra, sequential, reduce_stats, tick,
                          masks, programs, len(batches), layout, allow_nonfinite, checkpoint)
        args: list = [_View(r, (), tuple(range(jnp.ndim(r.value)))) for r in cal.roots]
        flat = [jax.tree.leaves(b) for b in batches]
        args += [Batched(col) for col in zip(*flat)]
        if masks is not None:
            _check_masks(cal, masks, batches)
        outs = cal.eval_jaxpr(traced.jaxpr, args, (), 0, len(batches), live_outs=[
            outputs is not None] * len(closed_parts(traced.jaxpr)[0].outvars))
        if outputs is not None:
            outputs.extend([cal.pick(o, b) for o in outs] for b in range(len(batches)))
        new_leaves, stats = _assemble(cal)
    finally:
        if bar is not None:
            bar.stop()
    return jax.tree.unflatten(traced.treedef, new_leaves), stats


def calibrate_sequential(apply_fn: Callable, params: Any, batches: Iterable[Any],
                         transform: Transform, *, progress: bool = True
                         ) -> tuple[Any, list[Any]]:
    """:func:`calibrate` in sequential mode that also returns ``apply_fn``'s output for each
    batch, computed in the same pass on the weights as compressed: a model too large for
    memory is calibrated one block at a time this way, each block's outputs the next one's
    batches (:mod:`jaxq.recipes.stream`), with the very values a whole-model pass computes."""
    batches = _normalize_batches(batches)
    folding = folding_steps(transform)
    if folding:
        raise ValueError(f"{', '.join(sorted(set(folding)))} folds scales into other leaves, "
                         "which sequential calibration cannot do")
    traced = trace(apply_fn, params, *batches[0])
    outputs: list = []
    new, _ = _calibrate_traced(traced, find_sites(traced), batches, transform, collectors=None,
                               sequential=True, progress=progress, reduce_stats=None,
                               programs=_programs(apply_fn, params, batches, traced),
                               outputs=outputs)
    return new, [jax.tree.unflatten(traced.out_tree, o) for o in outputs]


def collect_stats(apply_fn: Callable, params: Any, batches: Iterable[Any],
                  transforms: Sequence[Transform], *, progress: bool = True,
                  mask: Sequence[Any] | None = None, mesh: Any = None,
                  data_axis: str = "data", model_axis: str | None = None
                  ) -> tuple[Stats, dict[str, int]]:
    """Every statistic any of ``transforms`` needs, from one pass over the float model, and
    each site's input axis: for running several whole-tree transforms on one pass,
    ``t(params, stats=stats, axes=axes)``. Steps that fold scales (AWQ, SmoothQuant) need the
    scale groups too: give them ``jaxq.calib.bind_groups(t, scale_groups(apply_fn, params,
    *batches[0]))``, or run each through :func:`calibrate`, which does all of this. ``mesh``,
    ``data_axis`` and ``model_axis`` as in :func:`calibrate`."""
    batches = _normalize_batches(batches)
    needed: set[str] = set()
    for path, leaf in flatten_with_paths(params)[0]:
        for t in transforms:
            needed |= t.required_stats(path, leaf)
    layout = _layout(mesh, data_axis, model_axis)
    traced, params, batches, masks = _prepare(apply_fn, params, batches, mask, layout)
    sites = find_sites(traced)
    _, stats = _calibrate_traced(traced, sites, batches, None, collectors=sorted(needed),
                                 sequential=True, progress=progress, reduce_stats=None,
                                 masks=masks, programs=_programs(apply_fn, params, batches,
                                                                 traced), layout=layout)
    return stats, {p: s.axis for p, s in sites.items()}


def _check_masks(cal: _Calibrator, masks: list, batches: list) -> None:
    """Every collector must know how to leave rows out when a mask is given."""
    if all(m is None for m in masks):
        return
    cols = {c.name: c for r in cal.roots for c in r.collectors}
    bad = sorted(n for n, c in cols.items() if c.update_masked is None)
    if bad:
        raise ValueError(f"collector(s) {bad} cannot leave masked rows out (they define no "
                         "update_masked); calibrate without mask= or give them one")


def _slice_count(traced: Traced, path: str, site: Site) -> int:
    """Progress units: one per site, one per layer for a stacked one."""
    return traced.leaves[traced.paths.index(path)].shape[0] if site.stacked else 1


def _assemble(cal: _Calibrator) -> tuple[list, Stats]:
    """Final leaves (compressing whatever the pass did not) and the statistics by path."""
    leaves, stats = [], {}
    for root in cal.roots:
        if root.slices:
            refs = [root.slices[t] for t in sorted(root.slices)]
            for ref in refs:
                cal.compress(ref)
            leaves.append(stack_leaves([r.compressed for r in refs], root.path))
            per = [cal.finalize(r) for r in refs]
            if all(per):  # slices read back from a checkpoint have none
                stats[root.path] = {k: jnp.stack([s[k] for s in per]) for k in per[0]}
            continue
        cal.compress(root)
        leaves.append(root.compressed)
        if cal.finalize(root):
            stats[root.path] = root.stats
    return leaves, stats
