"""Teachers: a frozen apply function, or its top-k logits cached on disk once and streamed.

A :class:`Teacher` is a pytree (its params are children, the apply function is static), so it
is passed *into* a jitted train step as an argument rather than closed over: closed-over
params would be baked into the compiled program as constants, and could not be sharded.

:func:`cache_topk` runs the teacher over a dataset once and stores, per position, the top-k
log-probabilities, their token ids and the tail's log-mass in memory-mapped ``.npy`` files;
:class:`TopKCache` streams them back by window index, so the student trains without a second
model in memory (k = 64 of a 49k vocabulary keeps ~0.5 KB per token).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.core.io import OutputKind, atomic_output
from jaxq.distill.losses import TopK, teacher_topk

_FILES = ("logprobs", "indices", "log_tail")
#: What :func:`cache_topk` writes (never over an existing path).
TOPK_CACHE = OutputKind(name="a teacher top-k cache", is_dir=True,
                        test=lambda p: (p / "meta.json").is_file())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Teacher:
    """``teacher(tokens) -> logits`` with gradients stopped, on params carried as pytree data."""

    params: Any
    apply_fn: Callable[[Any, jax.Array], jax.Array] = dataclasses.field(
        metadata={"static": True})

    def __call__(self, tokens: jax.Array) -> jax.Array:
        params = jax.lax.stop_gradient(self.params)
        return jax.lax.stop_gradient(self.apply_fn(params, tokens))

    def topk(self, tokens: jax.Array, k: int) -> TopK:
        """The live teacher's :class:`TopK` (what :func:`cache_topk` stores)."""
        return teacher_topk(self(tokens), k)


def frozen_teacher(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any) -> Teacher:
    """A frozen teacher from ``apply_fn(params, tokens) -> logits``."""
    return Teacher(params, apply_fn)


def cache_topk(teacher: Callable[[jax.Array], jax.Array], windows: np.ndarray, path: str | Path,
               *, k: int, chunk: int = 8, logprob_dtype: Any = np.float32) -> TopKCache:
    """Run ``teacher`` over ``windows [N, T]`` once and write its top-k to ``path`` (a directory).

    Written into a temporary sibling directory and renamed into place at the end, so a crash
    never leaves a half-written cache that looks complete. ``chunk`` windows per teacher call
    bound peak memory to one chunk's ``[chunk, T, V]`` logits.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2:
        raise ValueError(f"cache_topk: windows must be [N, T] token ids, got {windows.shape}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"cache_topk: {path} exists; remove it or open it with TopKCache")
    n, t = windows.shape
    with atomic_output(path, TOPK_CACHE, overwrite=False) as tmp:
        shapes = {"logprobs": ((n, t, k), logprob_dtype), "indices": ((n, t, k), np.int32),
                  "log_tail": ((n, t), np.float32)}
        out = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dt,
                                               shape=shape)
               for name, (shape, dt) in shapes.items()}
        if isinstance(teacher, Teacher):  # params as arguments, not compiled-in constants
            jitted = jax.jit(lambda m, toks: teacher_topk(m(toks), k))
            fn = functools.partial(jitted, teacher)
        else:
            fn = jax.jit(lambda toks: teacher_topk(teacher(toks), k))
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = windows[start:stop]
            if stop - start < chunk:  # pad the last chunk: one compiled shape
                block = np.concatenate([block, np.repeat(block[-1:], chunk - (stop - start), 0)])
            got = jax.device_get(fn(jnp.asarray(block)))
            for name, arr in zip(_FILES, got, strict=True):
                out[name][start:stop] = arr[: stop - start]
        for arr in out.values():
            arr.flush()
        del out
        (tmp / "meta.json").write_text(json.dumps({"k": k, "windows": n, "seq": t}))
    return TopKCache(path)


class TopKCache:
    """Memory-mapped teacher top-k written by :func:`cache_topk`; reads only what is asked."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"TopKCache: {self.path} is not a complete top-k cache "
                                    "(no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        self.k = int(self.meta["k"])
        self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r")
                        for name in _FILES}

    def __len__(self) -> int:
        return int(self.meta["windows"])

    def lookup(self, index: Iterable[int] | np.ndarray) -> TopK:
        """The cached :class:`TopK` of windows ``index [B]`` as host arrays ``[B, T, ...]``."""
        idx = np.asarray(index)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"TopKCache: window index out of [0, {len(self)}) in {self.path}")
        order = np.argsort(idx)  # sorted reads are sequential on disk
        inverse = np.argsort(order)
        return TopK(*(np.asarray(self._arrays[name][idx[order]])[inverse] for name in _FILES))

    def attach(self, data: Callable[[int], dict]) -> Callable[[int], dict]:
        """Wrap a data source (``step -> batch`` with an ``"index"`` entry of window ids) so
        each batch also carries ``batch["teacher"]``, the cached :class:`TopK`."""

        def with_teacher(step: int) -> dict:
            batch = dict(data(step))
            batch["teacher"] = self.lookup(batch["index"])
            return batch

        for attr in ("batch_size", "tokens_per_batch", "position"):
            if hasattr(data, attr):
                setattr(with_teacher, attr, getattr(data, attr))
        return with_teacher
