"""Perplexity under jaxq's protocol (see eval-protocol.md).

Each window is one independent forward pass from position 0 and contributes ``L - 1``
next-token predictions; the log-softmax is computed in float64 (on the host, with numpy, from
the model's logits, so no global x64 switch is needed); perplexity is ``exp(mean NLL)`` over all
predictions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

#: Windows per forward pass; the fastest measured for SmolLM2 on 2 CPU cores (see BENCHMARKS.md).
DEFAULT_BATCH_SIZE = 4


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Perplexity, mean NLL (nats), number of predictions, wall seconds (compile included)."""

    ppl: float
    nll: float
    n_tokens: int
    seconds: float
    window_nll: np.ndarray = dataclasses.field(repr=False, compare=False)

    def __str__(self) -> str:
        return (
            f"ppl {self.ppl:.4f} (mean NLL {self.nll:.6f} over {self.n_tokens} tokens, "
            f"{self.seconds:.1f} s)"
        )


def token_nll(logits: Any, tokens: Any) -> np.ndarray:
    """NLL of ``tokens[..., 1:]`` under ``logits[..., :-1, :]``, log-softmax in float64.

    ``logits [..., T, V]`` (any float dtype), ``tokens [..., T]``; returns float64 ``[..., T-1]``.
    """
    x = np.asarray(logits)[..., :-1, :].astype(np.float64)
    tgt = np.asarray(tokens)[..., 1:].astype(np.intp)
    m = x.max(axis=-1, keepdims=True)
    x -= m
    picked = np.take_along_axis(x, tgt[..., None], axis=-1)[..., 0]
    np.exp(x, out=x)
    return np.log(x.sum(axis=-1)) - picked


def _batches(windows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Fixed-shape batches (the last padded with copies of its final window) and valid counts."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
        yield chunk, valid


def perplexity(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    windows: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    description: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of ``apply_fn(params, tokens [B, L]) -> logits [B, L, V]`` over ``windows``.

    ``windows`` is int ``[N, L]`` (e.g. :func:`jaxq.eval.data.eval_windows`). The forward is
    jit-compiled once (all batches share one shape) and the next batch is dispatched before the
    host computes the float64 NLL of the current one, so the two overlap.
    """
    windows = np.asarray(windows, dtype=np.int32)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, L] with L >= 2, got {windows.shape}")
    n = len(windows)
    batch_size = max(1, min(int(batch_size), n))
    fwd = jax.jit(apply_fn)
    start = time.perf_counter()
    nll = np.zeros((n, windows.shape[1] - 1), np.float64)
    with _progress_bar(progress, description, n) as advance:
        pending: list[tuple[Any, np.ndarray, int, int]] = []
        done = 0
        for offset, (chunk, valid) in zip(
            range(0, n, batch_size), _batches(windows, batch_size)
        ):
            pending.append((fwd(params, chunk), chunk, valid, offset))
            if len(pending) > 1:
                done += _consume(pending.pop(0), nll)
                advance(done)
        while pending:
            done += _consume(pending.pop(0), nll)
            advance(done)
    seconds = time.perf_counter() - start
    mean = float(nll.mean())
    return PerplexityResult(
        ppl=math.exp(mean),
        nll=mean,
        n_tokens=int(nll.size),
        seconds=seconds,
        window_nll=nll.mean(axis=1),
    )


def _consume(item: tuple[Any, np.ndarray, int, int], out: np.ndarray) -> int:
    logits, chunk, valid, offset = item
    logits = np.asarray(logits)
    for j in range(valid):  # one window at a time bounds the float64 temporaries
        out[offset + j] = token_nll(logits[j], chunk[j])
    return valid


class _progress_bar:
    """``rich`` progress bar over windows, or a no-op; yields ``advance(completed)``."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled, description, total
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda completed: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("windows"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._bar.__enter__()
        task = self._bar.add_task(self.description, total=self.total)
        return lambda completed: self._bar.update(task, completed=completed)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
