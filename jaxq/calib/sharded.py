"""Sharded calibration: batches over a data axis, weights over a model axis of a device mesh.

Nothing here changes the math. The statistics interpreter runs as it does on one device, but
on global arrays: every batch array is split along its leading (batch) axis over
``data_axis``, and each weight along its largest non-input axis over ``model_axis`` (when that
axis divides; otherwise it is replicated). Each equation is a ``jax.jit`` whose inputs carry
those shardings, so XLA partitions it; the per-batch statistics (``XᵀX``, sums, maxima,
counts) are computed by a ``jax.jit`` whose output is *replicated*, which is where XLA sums the
data shards' partial statistics (an all-reduce over ``data_axis``; a max for ``absmax``). Every
device, and every process, then holds the same statistics, so each compresses its weights
identically. GPTQ runs on each (model-sharded) weight as one jitted program against the
replicated Hessian: its rows are independent, so XLA can keep them split, and gathers what it
must (the Cholesky factor is computed whole on every device).

The same code runs across processes (``jax.distributed``): the mesh then spans every
process's devices, each process passes *its own* batches (``make_array_from_process_local_data``
joins process ``p``'s batch ``i`` with the others' batch ``i`` into one global batch ``i``) and
the same float params; the results are global arrays (replicated statistics, model-sharded
leaves; ``jax.experimental.multihost_utils.process_allgather`` brings a leaf to every host).
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxq.calib import collectors as coll
from jaxq.core.leaf import is_leaf


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshLayout:
    """Where calibration puts batches and weights on ``mesh``.

    Attributes:
      mesh: the device mesh (every process's devices, under ``jax.distributed``). Its axes are
        used in Auto mode (XLA propagates the input shardings through model code that carries
        no annotations).
      data_axis: the axis batches are split over; statistics are summed across it.
      model_axis: the axis weights are split over (None: weights are replicated).
    """

    mesh: Mesh
    data_axis: str = "data"
    model_axis: str | None = None

    def __post_init__(self) -> None:
        names = tuple(self.mesh.axis_names)
        for what, axis in (("data_axis", self.data_axis), ("model_axis", self.model_axis)):
            if axis is not None and axis not in names:
                raise ValueError(f"calibrate(): {what}={axis!r} is not an axis of the mesh "
                                 f"(its axes: {list(names)})")
        if self.data_axis == self.model_axis:
            raise ValueError(f"calibrate(): data_axis and model_axis are both {self.data_axis!r}"
                             "; give them different mesh axes")
        auto = (jax.sharding.AxisType.Auto,) * len(names)
        if tuple(self.mesh.axis_types) != auto:
            object.__setattr__(self, "mesh", Mesh(self.mesh.devices, names, axis_types=auto))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def _local_data_shards(self) -> int:
        """How many positions of ``data_axis`` this process's devices cover: a process-local
        batch is split that many ways."""
        axis = self.mesh.axis_names.index(self.data_axis)
        me = jax.process_index()
        return len({idx[axis] for idx, d in np.ndenumerate(self.mesh.devices)
                    if d.process_index == me})

    def _on_mesh(self, x: Any) -> bool:
        s = getattr(x, "sharding", None)
        return (isinstance(s, NamedSharding) and s.mesh.axis_names == self.mesh.axis_names
                and s.mesh.devices.tolist() == self.mesh.devices.tolist())

    def _keep(self, x: jax.Array) -> jax.Array:
        """An array the caller already placed on this mesh, as it is (on the Auto-axes mesh)."""
        return jax.device_put(x, NamedSharding(self.mesh, x.sharding.spec))

    def _global(self, host: np.ndarray, spec: PartitionSpec) -> jax.Array:
        """A global array from a value every process holds in full."""
        sharding = NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    # -- batches ---------------------------------------------------------------------------
    def place_batches(self, batches: Sequence[tuple], what: str = "batch") -> list[tuple]:
        """Each batch's arrays as global arrays split along their leading axis over
        ``data_axis`` (each process gives its own rows); arrays already on the mesh stay."""
        self._check_processes(batches)
        n = self._local_data_shards()
        split = NamedSharding(self.mesh, PartitionSpec(self.data_axis))

        def one(i: int, x: Any) -> Any:
            if self._on_mesh(x):
                return self._keep(x)
            host = np.asarray(x)
            if host.ndim == 0:
                return self._global(host, PartitionSpec())
            if host.shape[0] % n:
                raise ValueError(
                    f"calibration {what} {i}: its leading (batch) size {host.shape[0]} does not "
                    f"split over the {n} devices of mesh axis {self.data_axis!r} on this "
                    f"process; make every {what}'s leading size a multiple of {n}")
            return jax.make_array_from_process_local_data(split, host)

        return [jax.tree.map(functools.partial(one, i), b) for i, b in enumerate(batches)]

    def place_masks(self, masks: Sequence[Any] | None) -> list | None:
        if masks is None:
            return None
        masks = list(masks)
        placed = self.place_batches([(m,) for m in masks if m is not None], "mask")
        it = iter(placed)
        return [None if m is None else next(it)[0] for m in masks]

    def _check_processes(self, batches: Sequence[tuple]) -> None:
        """Across processes every one must walk the same program: the same number of batches
        with the same shapes (else a collective would wait forever)."""
        if jax.process_count() == 1:
            return
        from jax.experimental import multihost_utils

        sig = repr([[(np.shape(x), str(np.result_type(x))) for x in jax.tree.leaves(b)]
                    for b in batches])
        # int32: the gathered copy has JAX's default integer width
        mine = np.array([len(batches), zlib.crc32(sig.encode()) & 0x7FFFFFFF], np.int32)
        try:
            multihost_utils.assert_equal(mine, "calibration batches")
        except AssertionError:
            raise ValueError(
                f"calibrate(): process {jax.process_index()} has {len(batches)} calibration "
                "batches whose count or shapes differ from another process's; every process "
                "must pass as many batches, of the same shapes") from None

    # -- params ----------------------------------------------------------------------------
    def weight_spec(self, shape: tuple[int, ...], keep: Sequence[int] = ()) -> PartitionSpec:
        """Split the largest axis not in ``keep`` that ``model_axis`` divides (replicate if
        none does, or without a model axis)."""
        if self.model_axis is None or len(shape) < 2:
            return PartitionSpec()
        m = self.mesh.shape[self.model_axis]
        keep = {d % len(shape) for d in keep}
        dims = [d for d in sorted(range(len(shape)), key=lambda d: -shape[d])
                if d not in keep and shape[d] % m == 0 and shape[d] >= m]
        if not dims:
            return PartitionSpec()
        spec: list[str | None] = [None] * len(shape)
        spec[dims[0]] = self.model_axis
        return PartitionSpec(*spec)

    def place_params(self, leaves: Sequence[Any], keep: Sequence[Sequence[int]]) -> list:
        """Float leaves split over ``model_axis`` (never along the axes in ``keep[i]``: a
        site's input axis, a stacked leaf's layer axis), compressed leaves' children
        replicated; leaves already on the mesh stay as they are."""
        out = []
        for leaf, k in zip(leaves, keep):
            if self._on_mesh(leaf):
                out.append(self._keep(leaf))
            elif is_leaf(leaf):
                out.append(jax.tree.map(
                    lambda c: self._keep(c) if self._on_mesh(c) else
                    self._global(np.asarray(c), PartitionSpec()), leaf))
            else:
                host = np.asarray(leaf)
                out.append(self._global(host, self.weight_spec(host.shape, k)))
        return out

    # -- statistics ------------------------------------------------------------------------
    @functools.cached_property
    def _deltas(self) -> Any:
        return jax.jit(coll.batch_deltas, static_argnums=(0, 1, 2),
                       out_shardings=self.replicated)

    def batch_deltas(self, collectors: tuple, contract: tuple, k: int, x: jax.Array,
                     mask: jax.Array | None = None) -> tuple:
        """:func:`jaxq.calib.collectors.batch_deltas` with a replicated result: the data
        shards' partial statistics summed (maxed) across ``data_axis`` by XLA."""
        return self._deltas(collectors, contract, k, x, mask)
