"""Split-K partials summed inside a Pallas (Triton) kernel, so a split call is one launch.

Without it a split-K kernel writes ``[splits, M, N]`` float32 partials and XLA sums them in a
second launch, which at decode sizes costs as much as the kernel. Here every program of an
output tile stores its partial, then takes a ticket from a per-tile counter; the program that
draws the last ticket sums the partials in a fixed order and writes ``y``.

The counters start at zero each call (an input aliased to an output), so a call has no state
left over from the last one; the partials and counters are extra outputs the caller drops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def split_buffers(splits: int, rows: int, cols: int, block: tuple[int, int], tiles: int,
                  tile_index: Callable) -> tuple[list, list, jax.Array]:
    """Output shapes and specs for the partials ``[splits, rows, cols]`` and the ``tiles``
    ticket counters, and the zeroed counters to alias to the second.

    ``tile_index(*grid_ids) -> (row block, column block)`` of the program's output tile.
    """
    def part_map(*ids):
        return (0, *tile_index(*ids))

    shapes = [jax.ShapeDtypeStruct((splits, rows, cols), jnp.float32),
              jax.ShapeDtypeStruct((tiles,), jnp.int32)]
    specs = [pl.BlockSpec((splits, *block), part_map),
             pl.BlockSpec((tiles,), lambda *ids: (0,))]
    return shapes, specs, jnp.zeros((tiles,), jnp.int32)


def sum_splits(tiles: Sequence[tuple[int, jax.Array]], split: jax.Array, ticket: jax.Array,
               splits: int, o_ref, part_ref, ticket_ref, mask: jax.Array, *,
               barrier: bool) -> None:
    """Store this program's partial rows (``(first row, [h, bn] value)`` pairs), take a ticket
    for output tile ``ticket``, and, holding the last one, write ``o_ref`` (``mask``ed) as the
    sum over the splits.

    The barrier orders every thread's partial stores before the ticket (an acquire-release
    atomic at GPU scope, made by one thread); the last program's partial loads are volatile
    (not from L1, which is not coherent across SMs). Interpret mode runs the grid in order
    and has no barrier (``barrier=False``).
    """
    for r0, y in tiles:
        part_ref[split, pl.ds(r0, y.shape[0]), :] = y
    if barrier:
        plgpu.debug_barrier()
    drawn = plgpu.atomic_add(ticket_ref, ticket, jnp.int32(1))

    @pl.when(drawn == splits - 1)
    def _():
        for r0, y in tiles:
            parts = plgpu.load(part_ref.at[:, pl.ds(r0, y.shape[0]), :], volatile=True)
            total = jnp.sum(parts, axis=0)  # the splits in a fixed order
            plgpu.store(o_ref.at[pl.ds(r0, y.shape[0]), :], total.astype(o_ref.dtype),
                        mask=mask)
