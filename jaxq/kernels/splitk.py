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


def outputs(*, m: int, n: int, n_padded: int, dtype, block: tuple[int, int],
            tile_index: Callable, splits: int, reduce_inside: bool, poison: bool,
            in_specs: list, args: list) -> tuple[list, list, dict[int, int]]:
    """``(out_shape, out_specs, input_output_aliases)`` of a matmul kernel whose grid ends with
    the split index: ``y [m, n]`` itself, or float32 partials ``[splits, m, n]`` for XLA to sum
    (:func:`finish`). ``reduce_inside`` adds the partial buffer and the ticket counters (zeroed,
    appended to ``in_specs``/``args`` as an aliased input); ``poison`` pre-fills ``y`` with NaN
    the same way, so a tile the grid never writes fails a test.

    ``block`` is the output tile, ``tile_index(*grid_ids) -> (row block, column block)``.
    """
    if splits == 1 or reduce_inside:
        shapes = [jax.ShapeDtypeStruct((m, n), dtype)]
        specs = [pl.BlockSpec(block, tile_index)]
    else:
        shapes = [jax.ShapeDtypeStruct((splits, m, n), jnp.float32)]
        specs = [pl.BlockSpec((None, *block), lambda *ids: (ids[-1], *tile_index(*ids)))]
    aliases = {}
    if poison:
        in_specs.append(specs[0])
        args.append(jnp.full(shapes[0].shape, jnp.nan, shapes[0].dtype))
        aliases[len(args) - 1] = 0
    if splits > 1 and reduce_inside:  # every split's partial tile, a ticket per output tile
        row_blocks, tiles = -(-m // block[0]), -(-m // block[0]) * (n_padded // block[1])
        shapes += [jax.ShapeDtypeStruct((splits, row_blocks * block[0], n_padded), jnp.float32),
                   jax.ShapeDtypeStruct((tiles,), jnp.int32)]
        specs += [pl.BlockSpec((splits, *block), lambda *ids: (0, *tile_index(*ids))),
                  pl.BlockSpec((tiles,), lambda *ids: (0,))]
        in_specs.append(specs[-1])
        args.append(jnp.zeros((tiles,), jnp.int32))
        aliases[len(args) - 1] = 2
    return shapes, specs, aliases


def finish(outs: Sequence[jax.Array], dtype, *, summed: bool) -> jax.Array:
    """``y`` from the kernel's outputs: the first, or the XLA sum of its split partials."""
    return outs[0] if summed else jnp.sum(outs[0], axis=0).astype(dtype)


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
