"""Perplexity under jaxq's protocol (see eval-protocol.md).

Each window is one independent forward pass from position 0 and contributes ``L - 1``
next-token predictions; the log-softmax is computed in float64 (on the host, with numpy, from
the model's logits, so no global x64 switch is needed); perplexity is ``exp(mean NLL)`` over all
predictions.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

#: Windows per forward pass; the fastest measured for SmolLM2 on 2 CPU cores (see BENCHMARKS.md).
DEFAULT_BATCH_SIZE = 1


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


def next_token_loss(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss(params, tokens [B, T])``: mean next-token cross entropy of a causal LM, in float32
    (differentiable; what :func:`jaxq.quant.mixed.fisher_diagonal` takes)."""
    import jax.numpy as jnp

    def loss(params: Any, tokens: Any) -> Any:
        logits = apply_fn(params, tokens)[:, :-1].astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)
        return -jnp.mean(picked)

    return loss


def token_nll(logits: Any, tokens: Any, *, rows: int = 16) -> np.ndarray:
    """NLL of ``tokens[1:]`` under ``logits[:-1]``, the log-softmax computed in float64.

    ``logits [T, V]`` (any float dtype), ``tokens [T]``; returns float64 ``[T-1]``. Rows are
    converted ``rows`` at a time so the float64 temporaries stay in cache (25% faster).
    """
    logits = np.asarray(logits)
    tgt = np.asarray(tokens)[1:].astype(np.intp)
    n = logits.shape[0] - 1
    out = np.empty(n, np.float64)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        x = logits[s:e].astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        picked = x[np.arange(e - s), tgt[s:e]]
        np.exp(x, out=x)
        out[s:e] = np.log(x.sum(axis=-1)) - picked
    return out


def _batches(windows: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray, int]]:
    """(offset, fixed-shape batch, valid rows); the last batch is padded with its final window."""
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        valid = len(chunk)
        if valid < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - valid, axis=0)])
        yield i, chunk, valid


def perplexity(
    apply_fn: Callable[[Any, Any], Any],
    params: Any,
    windows: Any,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    description: str = "perplexity",
    allow_nonfinite: bool | None = None,
) -> PerplexityResult:
    """Perplexity of ``apply_fn(params, tokens [B, L]) -> logits [B, L, V]`` over ``windows``.

    ``windows`` is int ``[N, L]`` (e.g. :func:`jaxq.eval.data.eval_windows`). The forward is
    jit-compiled once (all batches share one shape) and the next batch is dispatched before the
    host computes the float64 NLL of the current one, so the two overlap.

    Logits holding NaN or Inf are a :class:`~jaxq.core.finite.NonFiniteError` naming the first
    window and position, unless ``allow_nonfinite`` (None: the enclosing
    :func:`jaxq.core.finite.allowing` block's setting) lets them through as a NaN figure. A
    finite NLL too large for ``exp`` gives a perplexity of ``inf``.
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
        pending: collections.deque = collections.deque()
        for offset, chunk, valid in _batches(windows, batch_size):
            pending.append((offset, chunk, valid, fwd(params, chunk)))  # async dispatch
            if len(pending) > 1:
                advance(_consume(*pending.popleft(), nll))
        while pending:
            advance(_consume(*pending.popleft(), nll))
    seconds = time.perf_counter() - start
    _check_logits(nll, allow_nonfinite)
    mean = float(nll.mean())
    return PerplexityResult(
        ppl=math.exp(mean) if mean < _EXP_MAX else math.inf if mean > 0 else math.nan,
        nll=mean,
        n_tokens=int(nll.size),
        seconds=seconds,
        window_nll=nll.mean(axis=1),
    )


#: The largest argument ``math.exp`` takes without an OverflowError.
_EXP_MAX = math.log(sys.float_info.max)


def _check_logits(nll: np.ndarray, allow: bool | None) -> None:
    """The float64 NLL of finite logits is finite: a NaN/Inf in it names the window and the
    position whose logits held NaN/Inf."""
    from jaxq.core.finite import report_nonfinite

    bad = ~np.isfinite(nll)
    if not bad.any():
        return
    w, t = (int(i) for i in np.argwhere(bad)[0])
    report_nonfinite(f"model output: the logits of window {w} hold NaN/Inf (first at position "
                     f"{t})", f"{int(bad.sum())} of {bad.size} predictions have no finite NLL",
                     "logits", allow=allow)


def _consume(offset: int, chunk: np.ndarray, valid: int, logits: Any, out: np.ndarray) -> int:
    """Float64 NLL of a finished batch into ``out``; returns the number of windows done."""
    logits = np.asarray(logits)
    for j in range(valid):
        out[offset + j] = token_nll(logits[j], chunk[j])
    return valid


@contextlib.contextmanager
def _progress_bar(enabled: bool, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A ``rich`` progress bar over windows (or a no-op); yields ``advance(n_windows)``."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
