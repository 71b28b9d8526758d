"""Helpers shared by the MLX and GGUF exporters: flat module paths, Q/K row order, atomic output.

Both runtimes name tensors by flat paths, so the exporters work on ``{"model.layers.0.mlp.
up_proj.weight": leaf}`` dicts. Q/K row permutations act on the *output* axis, which quantization
groups never cross, so they are lossless for :class:`QArray` leaves: the packed rows, scales and
biases move together.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxq.core import io as core_io
from jaxq.core.leaf import is_leaf
from jaxq.core.qarray import QArray
from jaxq.core.tree import flatten_with_paths
from jaxq.models.llama import rope_row_permutation


class ExportError(ValueError):
    """The model cannot be exported in the requested form."""


class ExportWarning(UserWarning):
    """An export step changed values (requantized or re-rounded some layers)."""


def flat_params(params: Any) -> dict[str, Any]:
    """``{"model.layers.0.self_attn.q_proj.weight": leaf}``. QArrays stay whole leaves (the
    exporters store them as they are); every other compressed leaf (sparse, low-rank) is
    written dense, since neither MLX nor GGUF has a format for it."""
    leaves, _ = flatten_with_paths(params)
    return {path.replace("/", "."): leaf if isinstance(leaf, QArray) or not is_leaf(leaf)
            else leaf.materialize() for path, leaf in leaves}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flat_params` for llama trees (``layers`` becomes a list)."""
    tree: dict[str, Any] = {}
    for key, leaf in flat.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    model = tree.get("model", {})
    if "layers" in model:
        layers = model["layers"]
        model["layers"] = [layers[str(i)] for i in range(len(layers))]
    return tree


def take_rows(leaf: Any, perm: np.ndarray) -> Any:
    """Reorder the output rows (axis 0) of an array or a 2-D/1-D QArray, losslessly."""
    if not isinstance(leaf, QArray):
        return jax.numpy.asarray(leaf)[perm]
    if leaf.ndim != 2 or leaf.axis != -1:
        raise ExportError(f"cannot permute rows of {leaf!r}: expected a 2-D (out, in) QArray")
    rows = leaf.shape[0]

    def rows_of(x: Any) -> Any:
        return x if x is None or x.shape[0] != rows else x[perm]

    return QArray(packed=leaf.packed[perm], scales=rows_of(leaf.scales),
                  biases=rows_of(leaf.biases), bits=leaf.bits, group_size=leaf.group_size,
                  size=leaf.size, axis=leaf.axis, dtype=leaf.dtype, fmt=leaf.fmt,
                  perm=leaf.perm, input_scale=leaf.input_scale)


def set_rope_layout(flat: dict[str, Any], config: Any, interleaved: bool) -> dict[str, Any]:
    """Permute the Q/K rows of flat llama params into the wanted RoPE layout (a new dict)."""
    if bool(config.rope_interleaved) == interleaved:
        return dict(flat)
    out = dict(flat)
    for key, leaf in flat.items():
        for proj, heads in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
            if f".self_attn.{proj}." in key:
                rows = leaf.shape[0]
                out[key] = take_rows(leaf, rope_row_permutation(rows, heads, interleaved))
    return out


def warn_layers(message: str, layers: list[str]) -> None:
    """One warning naming every affected layer (collapsed per module kind when long)."""
    if not layers:
        return
    shown = ", ".join(layers) if len(layers) <= 8 else (
        ", ".join(layers[:8]) + f", ... ({len(layers)} layers)")
    warnings.warn(f"{message}: {shown}", ExportWarning, stacklevel=3)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, kind: core_io.OutputKind, *, overwrite: bool = False
                  ) -> Iterator[Path]:
    """:func:`jaxq.core.io.atomic_output`, with an existing ``path`` an :class:`ExportError`
    unless ``overwrite`` (which replaces only an earlier ``kind`` output): a failed export never
    leaves partial output."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists (pass overwrite=True / --force to replace it)")
    with core_io.atomic_output(path, kind) as tmp:
        yield tmp
