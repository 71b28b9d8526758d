"""Scale groups from the trace: which op produces each site's input, so that a per-input-channel
scale (AWQ, SmoothQuant) can be folded into it instead of being kept beside the weight.

A site ``y = x W`` is unchanged by ``W -> W·diag(s)`` and ``x -> x·diag(1/s)``. Dividing ``x``
by ``s`` is free when ``x`` is made by an op with a per-channel weight: a norm's scale vector
(``x = n(h)·γ (+ β)``), or a linear layer whose output reaches the site through ops that are
*linear per channel*: layout ops, attention's value path (``softmax(qkᵀ)·v`` contracts over
positions, not channels), an elementwise product with another value (``act(gate)·up``), a
division by a value (softmax normalisation). Any other op on the way (a nonlinearity, a residual
sum, a contraction over channels) "poisons" the producer channels that pass through it: those
channels cannot be scaled, and a site reading any of them is not foldable.

The walk runs forward from every candidate producer over the model's jaxpr with calls
(``jit``, ``custom_jvp``/``custom_vjp``, ``checkpoint``) inlined, tracking for each value which
producer channel each element is (an integer array broadcastable to the value, size 1 along
dimensions the channel does not vary with). That is how grouped-query attention's ``o_proj`` is
found to read ``v_proj``'s row ``(h // g)·d + j`` at input channel ``h·d + j``, and a fused
``c_attn``'s value rows are found to feed ``c_proj`` while its query/key rows are poisoned.

Sites reading one activation (q/k/v, gate/up, a fused QKV) form one group; a selected site in no
group keeps its scale unfolded (the quantizers name such sites in a warning).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from jax.extend import core as jcore

from jaxq.calib.trace import (
    VALUE_OPS,
    Site,
    Traced,
    call_jaxpr,
    closed_parts,
    find_sites,
    layout_dims,
    placeholder,
    site_geometry,
    trace,
)
from jaxq.core.transform import Transform

#: ``prev_bias`` default: the ``bias`` leaf beside ``prev`` if there is one.
SIBLING = "sibling"
_MAX_INDEX = 1 << 24  # elements of a materialised channel index before a walk gives up


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScaleGroup:
    """Sites that read the same input, and the op producing that input.

    Attributes:
      sites: paths of the weight leaves (they share one per-input-channel scale).
      prev: path of the producing op's weight leaf, or None (scales stay as ``input_scale``).
      prev_kind: ``"norm"`` (a ``[N]`` scale vector, e.g. an RMSNorm/LayerNorm weight) or
        ``"linear_rows"`` (a 2-D linear whose output rows feed the sites).
      prev_bias: the producer's bias leaf, scaled with it: a path, None, or ``"sibling"`` (the
        ``bias`` leaf beside ``prev`` if any; the default for hand-written groups).
      tie: ``(heads_per_kv, head_dim)`` when the sites' input channel ``h*d + j`` comes from the
        previous linear's row ``(h // heads_per_kv)*d + j`` (grouped-query attention's o_proj
        fed by v_proj): the scale is then tied across the heads sharing a kv head.
      index: the general form of ``tie``: for each site input channel, the producer channel it
        is (found by the trace); None: the identity (or ``tie``).
    """

    sites: tuple[str, ...]
    prev: str | None = None
    prev_kind: str | None = None
    prev_bias: str | None = SIBLING
    tie: tuple[int, int] | None = None
    index: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.prev is not None and self.prev_kind not in ("norm", "linear_rows"):
            raise ValueError(f"ScaleGroup prev_kind must be 'norm' or 'linear_rows', "
                             f"got {self.prev_kind!r}")
        object.__setattr__(self, "sites", tuple(self.sites))
        if self.index is not None:
            object.__setattr__(self, "index", tuple(int(i) for i in self.index))

    def channel_index(self, size: int) -> np.ndarray:
        """For each of the sites' ``size`` input channels, the producer channel it is."""
        if self.index is not None:
            if len(self.index) != size:
                raise ValueError(f"ScaleGroup {self.sites}: index has {len(self.index)} "
                                 f"entries, the sites have {size} input channels")
            return np.asarray(self.index)
        return tie_index(size, self.tie)


def tie_index(size: int, tie: tuple[int, int] | None) -> np.ndarray:
    """For each site input channel, the index of the (previous op's) channel it is tied to."""
    c = np.arange(size)
    if tie is None:
        return c
    g, d = tie
    return (c // d // g) * d + c % d


# --- the jaxpr, calls inlined ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Eqn:
    eqn: Any
    ins: tuple      # canonical input keys (Vars) or Literals
    outs: tuple


def _flatten(traced: Traced) -> tuple[list[_Eqn], list, list]:
    """Equations with call bodies inlined; (eqns, the top invars, the top outvars)."""
    out: list[_Eqn] = []
    alias: dict = {}

    def key(v):
        if isinstance(v, jcore.Literal):
            return v
        return alias.get(v, v)

    def walk(jaxpr):
        jaxpr, _ = closed_parts(jaxpr)
        for eqn in jaxpr.eqns:
            body = call_jaxpr(eqn)
            if body is not None:
                inner = closed_parts(body)[0]
                ins = [key(v) for v in eqn.invars][len(eqn.invars) - len(inner.invars):]
                alias.update((bv, k) for bv, k in zip(inner.invars, ins))
                walk(body)
                for ov, bv in zip(eqn.outvars, inner.outvars):
                    if not isinstance(bv, jcore.Literal):
                        alias[ov] = key(bv)
                continue
            out.append(_Eqn(eqn, tuple(key(v) for v in eqn.invars), tuple(eqn.outvars)))

    top = closed_parts(traced.jaxpr)[0]
    walk(traced.jaxpr)
    return out, list(top.invars), [key(v) for v in top.outvars]


# --- channel index propagation -----------------------------------------------------------

def _reshape_groups(a: Sequence[int], b: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Contiguous dim runs of equal size product in ``a`` and ``b`` (size-1 dims attached)."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pa, pb = [], [], 1, 1
        while True:
            if pa <= pb and i < len(a) and (pa < pb or not gi or a[i] == 1):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b) and (pb < pa or not gj or b[j] == 1):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                break
            if pa == pb and gi and gj and (i >= len(a) or a[i] != 1) and (
                    j >= len(b) or b[j] != 1):
                break
        if pa != pb:
            return None
        groups.append((gi, gj))
    return groups


def _reshape_index(idx: np.ndarray, a: Sequence[int], b: Sequence[int]) -> np.ndarray | None:
    groups = _reshape_groups(a, b)
    if groups is None:
        return None
    full, out = list(idx.shape), []
    for gi, gj in groups:
        varies = any(idx.shape[d] > 1 for d in gi)
        for d in gi:
            full[d] = a[d] if varies else 1
        out += [b[d] if varies else 1 for d in gj]
    if int(np.prod(full)) > _MAX_INDEX:
        return None
    return np.broadcast_to(idx, full).reshape(out)


def _layout_index(eqn: Any, idx: np.ndarray) -> np.ndarray | None:
    name, p = eqn.primitive.name, eqn.params
    a = eqn.invars[0].aval.shape
    b = eqn.outvars[0].aval.shape
    if name in VALUE_OPS:
        return idx
    if name == "transpose":
        return np.transpose(idx, p["permutation"])
    if name == "squeeze":
        drop = {d % idx.ndim for d in p["dimensions"]}
        return idx.reshape([s for d, s in enumerate(idx.shape) if d not in drop])
    if name == "broadcast_in_dim":
        shape = [1] * len(b)
        for i, o in enumerate(p["broadcast_dimensions"]):
            shape[o] = idx.shape[i]
        return idx.reshape(shape)
    if name == "reshape" and p.get("dimensions") is None:
        return _reshape_index(idx, a, b)
    if name == "slice" and not any(s not in (None, 1) for s in (p.get("strides") or ())):
        sl = tuple(slice(lo, hi) if idx.shape[d] > 1 else slice(None)
                   for d, (lo, hi) in enumerate(zip(p["start_indices"], p["limit_indices"])))
        return idx[sl]
    return None


def _dot_index(eqn: Any, t: int, idx: np.ndarray) -> np.ndarray | None:
    """Index of a dot_general's output when operand ``t`` carries the channels: only batch and
    free dims may vary (a contraction over channels mixes them)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if t == 0 else (rc, rb)
    if any(idx.shape[d] > 1 for d in contract):
        return None
    nd = [len(v.aval.shape) for v in eqn.invars[:2]]
    free = [[d for d in range(nd[o]) if d not in (lc, rc)[o] and d not in (lb, rb)[o]]
            for o in (0, 1)]
    shape = [idx.shape[d] for d in batch]
    for o in (0, 1):
        shape += [idx.shape[d] if o == t else 1 for d in free[o]]
    order = list(batch) + free[t]
    moved = np.transpose(idx, order + [d for d in range(idx.ndim) if d not in order])
    return moved.reshape(shape)


# --- the walk ----------------------------------------------------------------------------

@dataclasses.dataclass
class _SiteUse:
    path: str
    leaf: int
    geo: Any
    x: Any          # activation key


@dataclasses.dataclass
class _Producer:
    path: str
    kind: str
    out: Any        # the output key the walk starts from
    index: np.ndarray
    size: int
    bias_ok: bool   # a 1-D bias leaf may be added to the output (it is folded too)
    at: int = 0     # the producing equation's position


def _origins(eqns: list[_Eqn], invars: list, n: int, ndims: list[int]) -> dict:
    """Param-derived values through layout ops: key -> (leaf, dims)."""
    org = {v: (i, tuple(range(ndims[i]))) for i, v in enumerate(invars[:n])}
    for e in eqns:
        ins = [org.get(k) if not isinstance(k, jcore.Literal) else None for k in e.ins]
        if ins and ins[0] is not None and not any(ins[1:]):
            dims = layout_dims(e.eqn, ins[0][1])
            if dims is not None:
                org[e.outs[0]] = (ins[0][0], dims)
    return org


def traced_scale_groups(traced: Traced, sites: dict[str, Site] | None = None
                        ) -> list[ScaleGroup]:
    """Scale groups of a traced model: every site whose input a norm weight or a preceding
    linear produces through per-channel-linear ops, grouped by the activation it reads."""
    sites = find_sites(traced) if sites is None else sites
    n = traced.n_params
    ndims = [len(placeholder(x).shape) for x in traced.leaves]
    eqns, invars, outvars = _flatten(traced)
    org = _origins(eqns, invars, n, ndims)
    escaped = {k for k in outvars if not isinstance(k, jcore.Literal)}

    # Leaves consumed other than through layout ops and their own site (they cannot be scaled).
    uses: dict[int, int] = {}
    site_at: dict[int, _SiteUse] = {}
    for i, e in enumerate(eqns):
        ins = [org.get(k) if not isinstance(k, jcore.Literal) else None for k in e.ins]
        if not any(ins) or (len(e.outs) == 1 and e.outs[0] in org):
            continue
        for o in ins:
            if o is not None:
                uses[o[0]] = uses.get(o[0], 0) + 1
        name = e.eqn.primitive.name
        w = [j for j, o in enumerate(ins[:2]) if o is not None]
        if name == "dot_general" and len(w) == 1 and len(ins) == 2:
            leaf, dims = ins[w[0]]
            path = traced.paths[leaf]
            geo = site_geometry(e.eqn, w[0], dims)
            s = sites.get(path)
            if geo is not None and s is not None and not s.stacked and len(geo.x_contract) == 1:
                site_at[i] = _SiteUse(path, leaf, geo, e.ins[1 - w[0]])
    single = {leaf for leaf, c in uses.items() if c == 1}

    producers: list[_Producer] = []
    for i, e in enumerate(eqns):
        name = e.eqn.primitive.name
        if i in site_at:
            su = site_at[i]
            if su.leaf not in single or ndims[su.leaf] != 2:
                continue
            (lc, rc), _ = e.eqn.params["dimension_numbers"]
            t = su.geo.operand
            nd = [len(v.aval.shape) for v in e.eqn.invars[:2]]
            free_w = [d for d in range(nd[t]) if d not in (lc, rc)[t]]
            if len(free_w) != 1:
                continue
            size = e.eqn.invars[t].aval.shape[free_w[0]]
            x_free = nd[1 - t] - len(su.geo.x_contract)
            pos = x_free if t == 1 else 0
            out_nd = len(e.eqn.outvars[0].aval.shape)
            shape = [1] * out_nd
            shape[pos] = size
            producers.append(_Producer(su.path, "linear_rows", e.outs[0],
                                       np.arange(size).reshape(shape), size, True, i))
        elif name == "mul" and len(e.ins) == 2:
            ins = [org.get(k) if not isinstance(k, jcore.Literal) else None for k in e.ins]
            w = [j for j, o in enumerate(ins) if o is not None]
            if len(w) != 1:
                continue
            leaf, dims = ins[w[0]]
            varying = [d for d, a in enumerate(dims) if a is not None]
            if ndims[leaf] != 1 or leaf not in single or len(varying) != 1:
                continue
            size = placeholder(traced.leaves[leaf]).shape[0]
            out_shape = e.eqn.outvars[0].aval.shape
            if out_shape[varying[0]] != size:
                continue
            shape = [1] * len(out_shape)
            shape[varying[0]] = size
            producers.append(_Producer(traced.paths[leaf], "norm", e.outs[0],
                                       np.arange(size).reshape(shape), size, True, i))

    claimed: set[str] = set()
    groups: list[ScaleGroup] = []
    for prod in producers:
        found = _walk_producer(prod, eqns, org, site_at, escaped, single, traced)
        if found is None:
            continue
        reached, bias = found
        taken: set[int] = set()
        for paths, idx in reached.values():
            paths = [p for p in paths if p not in claimed]
            chans = set(idx.tolist())
            if not paths or chans & taken:
                continue
            taken |= chans
            claimed.update(paths)
            index = None if (len(idx) == prod.size and np.array_equal(idx, np.arange(len(idx)))
                             ) else tuple(idx.tolist())
            groups.append(ScaleGroup(sites=tuple(paths), prev=prod.path, prev_kind=prod.kind,
                                     prev_bias=bias, index=index))
    return groups


def _walk_producer(prod: _Producer, eqns: list[_Eqn], org: dict,
                   site_at: dict, escaped: set, single: set, traced: Traced
                   ) -> tuple[dict, str | None] | None:
    """Forward from a producer: ``({activation: ([site paths], site index)}, bias path)``
    for the sites reachable without poisoned channels."""
    idx_of: dict = {prod.out: prod.index}
    poisoned: set[int] = set()
    reached: dict = {}
    bias: str | None = None

    def poison(*keys):
        for k in keys:
            if k in idx_of:
                poisoned.update(np.unique(idx_of[k]).tolist())

    for i in range(prod.at + 1, len(eqns)):  # in order: every input is settled when read
        e = eqns[i]
        name = e.eqn.primitive.name
        tracked = [j for j, v in enumerate(e.ins)
                   if not isinstance(v, jcore.Literal) and v in idx_of]
        if not tracked:
            continue
        new = None
        if (i in site_at and tracked == [1 - site_at[i].geo.operand]
                and site_at[i].leaf in single):
            su = site_at[i]
            idx = idx_of[e.ins[tracked[0]]]
            xc = su.geo.x_contract[0]
            shape = e.eqn.invars[tracked[0]].aval.shape
            if all(s == 1 for d, s in enumerate(idx.shape) if d != xc):
                flat = np.broadcast_to(idx.reshape(-1), (shape[xc],)) if idx.shape[xc] == 1 \
                    else idx.reshape(-1)
                reached.setdefault(su.x, ([], flat))[0].append(su.path)
            else:
                poison(e.ins[tracked[0]])
            continue
        if len(tracked) == 1 and len(e.outs) == 1:
            t = tracked[0]
            idx = idx_of[e.ins[t]]
            others = [v for j, v in enumerate(e.ins) if j != t]
            if name in ("mul", "div") and (name == "mul" or t == 0):
                new = idx
            elif name == "neg":
                new = idx
            elif name == "dot_general" and not any(
                    not isinstance(v, jcore.Literal) and v in org for v in others):
                new = _dot_index(e.eqn, t, idx)
            elif name == "add" and prod.bias_ok and bias is None:
                b = _bias_leaf(others[0], org, single, traced, idx, prod.size)
                if b is not None:
                    bias, new = b, idx
            elif t == 0 and len(e.ins) == 1:
                new = _layout_index(e.eqn, idx)
        elif name == "split" and tracked == [0]:
            idx = idx_of[e.ins[0]]
            ax, start = e.eqn.params["axis"], 0
            for size, out in zip(e.eqn.params["sizes"], e.outs):
                sl = [slice(None)] * idx.ndim
                if idx.shape[ax] > 1:
                    sl[ax] = slice(start, start + size)
                start += size
                idx_of[out] = idx[tuple(sl)]
            continue
        elif name == "concatenate" and len(tracked) == len(e.ins) and len(e.outs) == 1:
            ids = [idx_of[v] for v in e.ins]
            d = e.eqn.params["dimension"]
            if all(x.shape[d] == 1 and np.array_equal(x, ids[0]) for x in ids):
                new = ids[0]
        if new is None:
            poison(*[e.ins[j] for j in tracked])
            continue
        idx_of[e.outs[0]] = new
    poison(*(k for k in escaped if k in idx_of))  # the model returns it
    out = {x: (paths, idx) for x, (paths, idx) in reached.items()
           if not (set(idx.tolist()) & poisoned)}
    return out, bias


def _bias_leaf(v: Any, org: dict, single: set, traced: Traced, idx: np.ndarray,
               size: int) -> str | None:
    """The path of a 1-D bias leaf ``v`` added along the producer's own channel order."""
    o = None if isinstance(v, jcore.Literal) else org.get(v)
    if o is None or o[0] not in single or len(placeholder(traced.leaves[o[0]]).shape) != 1:
        return None
    varying = [d for d, a in enumerate(o[1]) if a is not None]
    if (len(varying) != 1 or idx.shape[varying[0]] != size
            or not np.array_equal(idx.reshape(-1), np.arange(size))):
        return None
    return traced.paths[o[0]]


def scale_groups(apply_fn: Callable, params: Any, *inputs: Any) -> list[ScaleGroup]:
    """Scale groups of ``apply_fn(params, *inputs)`` found from its trace (see module doc)."""
    return traced_scale_groups(trace(apply_fn, params, *inputs))


def bind_groups(transform: Any, groups: Sequence[ScaleGroup]) -> Any:
    """``transform`` with traced ``groups`` given to every step that folds scales and was left
    to find them (``groups=None``): chains, ``then=`` and a mixed-precision step's quantizers
    are walked (any dataclass field holding transforms)."""
    hook = getattr(transform, "with_traced_groups", None)
    if hook is not None:
        transform = hook(groups)
    if not dataclasses.is_dataclass(transform) or not isinstance(transform, Transform):
        return transform
    changes = {}
    for f in dataclasses.fields(transform):
        v = getattr(transform, f.name)
        if isinstance(v, Transform):
            new = bind_groups(v, groups)
        elif isinstance(v, tuple) and v and all(isinstance(x, Transform) for x in v):
            new = tuple(bind_groups(x, groups) for x in v)
        else:
            continue
        if new is not v:
            changes[f.name] = new
    return dataclasses.replace(transform, **changes) if changes else transform


def folding_steps(transform: Any) -> list[str]:
    """Names of the steps of ``transform`` that fold scales across leaves (whole-tree only)."""
    out = []
    if hasattr(transform, "with_traced_groups"):
        out.append(type(transform).__name__)
    if dataclasses.is_dataclass(transform) and isinstance(transform, Transform):
        for f in dataclasses.fields(transform):
            v = getattr(transform, f.name)
            for x in (v if isinstance(v, tuple) else (v,)):
                if isinstance(x, Transform):
                    out += folding_steps(x)
    return out
