"""The compressed-leaf protocol: what every compressed leaf (quantized, sparse, low-rank,
fake-quant, kernel layouts) is to the rest of jaxq.

A compressed leaf stands for one logical float tensor. Code outside a leaf's own file never
asks which kind it is; it uses only what :class:`Leaf` declares:

* ``shape``, ``dtype``, ``ndim``: the logical tensor's;
* ``axis``: the input axis (negative) that a matmul site contracts;
* ``nbytes``: the real storage (every child array at its stored dtype, nested leaves included),
  and ``bits_per_weight`` from it;
* ``materialize(dtype=None)``: the dense logical tensor;
* ``matmul(x, cache)``: ``x[..., K]`` contracted with the input axis, giving
  ``[..., *other dims in logical order]`` (the site op of compressed execution; the default
  materializes, leaves override it with something cheaper);
* ``kind``: a short label for size reports (``"quantized"``, ``"sparse"``, ``"low-rank"``);
* children: the fields named in ``_CHILDREN`` are pytree children (arrays, ``None``, or nested
  leaves), every other dataclass field is static. Float children are what gradients and
  optimizers reach (:func:`partition`); integer children (codes, masks, indices) stay fixed.

A subclass is a frozen dataclass; subclassing registers it as a pytree node. Decorating it
with :func:`register_leaf` lets :mod:`jaxq.core.serialize` save and load it; run-time forms
(fused slices, kernel layouts) stay unregistered, so saving them is a clear error.

A faster implementation of a leaf's site op can be plugged in from a layer above core
(the Pallas kernels do this for :class:`~jaxq.core.qarray.QArray`) with
:func:`register_matmul`, keyed on the exact type.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

#: Saved leaf classes by manifest name (:func:`register_leaf`).
_REGISTRY: dict[str, type[Leaf]] = {}
#: Site ops plugged in from above core, by exact leaf type (:func:`register_matmul`).
_MATMULS: dict[type, Callable[[Any, jax.Array], jax.Array]] = {}


class Leaf:
    """Base class of compressed leaves (see the module docstring for the protocol)."""

    _jaxq_leaf: ClassVar[bool] = True
    _CHILDREN: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "compressed"
    #: Children that transforms reach into (``chain(LowRank(...), RTN(...))`` quantizes a
    #: low-rank leaf's factors): name -> (the child's input axis, whether the child reads this
    #: leaf's own input, so that the leaf's calibration statistics hold for it).
    reachable: ClassVar[dict[str, tuple[int, bool]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Registered lazily on first use too: a dataclass decorator runs after this hook.
        jax.tree_util.register_pytree_with_keys(
            cls, cls._flatten_with_keys, cls._unflatten, cls._flatten)

    # --- pytree ---------------------------------------------------------------------------
    @classmethod
    def static_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls._CHILDREN)

    def _aux(self) -> tuple:
        return tuple(_hashable(getattr(self, name)) for name in self.static_fields())

    def _flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        return tuple((keys(n), getattr(self, n)) for n in self._CHILDREN), self._aux()

    def _flatten(self):
        return tuple(getattr(self, n) for n in self._CHILDREN), self._aux()

    @classmethod
    def _unflatten(cls, aux, children):
        # No __init__/__post_init__: transformations hand in tracers, None and sentinels.
        obj = object.__new__(cls)
        for name, value in zip(cls._CHILDREN, children):
            object.__setattr__(obj, name, value)
        for name, value in zip(cls.static_fields(), aux):
            object.__setattr__(obj, name, value)
        return obj

    # --- the protocol ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size_params(self) -> int:
        """Logical parameters (elements of the tensor this leaf stands for)."""
        return math.prod(self.shape)

    def children(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self._CHILDREN}

    @property
    def nbytes(self) -> int:
        """Real storage: every child at its stored dtype, nested leaves counted by theirs."""
        return sum(nbytes(c) for c in self.children().values() if c is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.size_params

    def materialize(self, dtype: Any = None) -> jax.Array:
        raise NotImplementedError

    def describe(self) -> str:
        """A short label for tables (``info``, size reports)."""
        return f"{self.kind} ({type(self).__name__})"

    def matmul(self, x: jax.Array, cache: dict | None = None) -> jax.Array:
        """``x[..., K]`` contracted with the input axis: ``[..., *other dims]``."""
        w = self.materialize(x.dtype)
        y = jnp.tensordot(x, w, axes=[[x.ndim - 1], [self.axis + self.ndim]],
                          preferred_element_type=jnp.float32)
        return y.astype(x.dtype)

    def map_reachable(self, fn: Callable[[str, Any, int, bool], Any]) -> Leaf:
        """A copy with each reachable child ``c`` replaced by ``fn(name, c, axis, own_input)``."""
        new = {n: fn(n, getattr(self, n), axis, own)
               for n, (axis, own) in self.reachable.items() if getattr(self, n) is not None}
        return dataclasses.replace(self, **new) if new else self

    @property
    def scannable(self) -> bool:
        """Whether ``lax.scan`` may slice every child along axis 0 to get one layer's leaf
        (a weight stacked for a scan over layers)."""
        return self.ndim >= 2 and self.axis > -self.ndim


def _hashable(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_hashable(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in x.items()))
    try:
        return jnp.dtype(x) if _is_dtype(x) else x
    except TypeError:
        return x


def _is_dtype(x: Any) -> bool:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return False
    try:
        jnp.dtype(x)
    except TypeError:
        return False
    return True


# --- functions over leaves and trees ----------------------------------------------------------

def is_leaf(x: Any) -> bool:
    """Compressed leaves are leaves for every jaxq traversal."""
    # The class attribute, not the instance's: wrappers such as flax.nnx ``Param`` forward
    # attribute reads to the value they hold and would pass for the leaf itself.
    return getattr(type(x), "_jaxq_leaf", False)


def nbytes(x: Any) -> int:
    """Stored bytes of a compressed leaf or an array."""
    if is_leaf(x):
        return int(x.nbytes)
    return math.prod(jnp.shape(x)) * jnp.dtype(jnp.result_type(x)).itemsize


def n_params(x: Any) -> int:
    """Logical parameters of a compressed leaf or an array."""
    return math.prod(x.shape if is_leaf(x) else jnp.shape(x))


def materialize(tree: Any, dtype: Any = None) -> Any:
    """Every compressed leaf of ``tree`` replaced by its dense tensor (arrays unchanged)."""
    return jax.tree.map(lambda x: x.materialize(dtype) if is_leaf(x) else x, tree,
                        is_leaf=is_leaf)


def site_matmul(leaf: Leaf, x: jax.Array, cache: dict | None = None) -> jax.Array:
    """The site op for ``leaf``: a registered fast path for its exact type, else its own."""
    fn = _MATMULS.get(type(leaf))
    return fn(leaf, x) if fn is not None else leaf.matmul(x, cache)


def register_matmul(cls: type, fn: Callable[[Any, jax.Array], jax.Array]) -> None:
    """Use ``fn(leaf, x)`` as the site op of leaves of exactly type ``cls`` (layers above core
    plug kernels in this way)."""
    _MATMULS[cls] = fn


def register_leaf(name: str) -> Callable[[type], type]:
    """Class decorator: save/load leaves of this class under manifest name ``name``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"leaf name {name!r} is already registered for "
                             f"{_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls._leaf_name = name
        return cls

    return deco


def leaf_class(name: str) -> type[Leaf]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown compressed-leaf class {name!r} (known: {sorted(_REGISTRY)})"
                         ) from None


def leaf_name(leaf: Any) -> str | None:
    """The manifest name of ``leaf``'s exact class, or None for a run-time form."""
    name = getattr(type(leaf), "_leaf_name", None)
    return name if name is not None and _REGISTRY.get(name) is type(leaf) else None


# --- gradients and optimizers -------------------------------------------------------------------

def _is_float(x: Any) -> bool:
    return (x is not None and hasattr(x, "dtype")
            and jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def partition(params: Any, where: Callable[[str, Any], bool] | None = None
              ) -> tuple[Any, Any]:
    """Split ``params`` into ``(trainable, frozen)`` trees of the same structure, ``None`` where
    a leaf went to the other side (equinox's ``partition``).

    Trainable: the float children of compressed leaves (scales, biases, factors, kept values),
    and, if ``where(path, array)`` says so, plain float arrays. Frozen: everything else, the
    integer codes, masks and indices included. ``jax.grad`` and any optax optimizer work on
    ``trainable``; :func:`combine` puts the two back together inside the loss.

    >>> import jax, jax.numpy as jnp, optax, jaxq
    >>> params = {"w": jaxq.quantize(jnp.ones((8, 64)), bits=4, group_size=32)}
    >>> train, frozen = jaxq.partition(params)
    >>> opt = optax.adam(1e-3); state = opt.init(train)
    """
    from jaxq.core.tree import path_to_str

    def inner(path: tuple, x: Any, in_leaf: bool) -> _Pair:
        take = _is_float(x) and (in_leaf or (where is not None and where(path_to_str(path), x)))
        return _Pair(x, None) if take else _Pair(None, x)

    def outer(path: tuple, x: Any) -> _Pair:
        if is_leaf(x):
            pairs = jax.tree_util.tree_map_with_path(
                lambda p, c: inner(path + p, c, True), x)
            return _Pair(*_split(pairs))
        return inner(path, x, False)

    return _split(jax.tree_util.tree_map_with_path(outer, params, is_leaf=is_leaf))


class _Pair:
    """Both sides of one leaf during :func:`partition` (a class of its own: a model's tuples
    must never be mistaken for one)."""

    def __init__(self, trainable: Any, frozen: Any) -> None:
        self.trainable, self.frozen = trainable, frozen


def _split(pairs: Any) -> tuple[Any, Any]:
    is_pair = lambda x: isinstance(x, _Pair)  # noqa: E731
    return (jax.tree.map(lambda t: t.trainable, pairs, is_leaf=is_pair),
            jax.tree.map(lambda t: t.frozen, pairs, is_leaf=is_pair))


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, frozen,
                        is_leaf=lambda x: x is None)


def mask(params: Any, where: Callable[[str, Any], bool] | None = None) -> Any:
    """A tree of bools shaped like ``partition(params)[0]``'s leaves: True where a leaf is
    trainable (for ``optax.masked`` or ``optax.multi_transform`` labels)."""
    trainable, _ = partition(params, where)
    return jax.tree.map(lambda x: x is not None, trainable, is_leaf=lambda x: x is None)
