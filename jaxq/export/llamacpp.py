"""Run a GGUF file in llama.cpp (through llama-cpp-python): greedy tokens and protocol perplexity.

For the slow tests and ``scripts/bench_export.py``. Each 512-token window is one fresh
evaluation (``reset`` then ``eval``) with ``logits_all``, so every position's logits come from
llama.cpp; the NLL is computed in float64 with numpy, as the eval protocol asks.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def load(path: str | Path, *, n_ctx: int = 512, threads: int | None = None) -> Any:
    """A ``llama_cpp.Llama`` with all logits kept (batch = the whole window)."""
    import llama_cpp

    threads = threads or os.cpu_count() or 1
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                           logits_all=True, n_threads=threads, n_threads_batch=threads,
                           verbose=False)


def window_logits(llm: Any, tokens: Any) -> np.ndarray:
    """float32 logits ``[T, V]`` of one window evaluated from position 0."""
    llm.reset()
    llm.eval([int(t) for t in tokens])
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def greedy(llm: Any, prompt: Any, steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` (argmax of llama.cpp's logits, no sampler)."""
    llm.reset()
    llm.eval([int(t) for t in prompt])
    out = []
    for _ in range(steps):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def perplexity(llm: Any, windows: np.ndarray) -> dict[str, float]:
    """Protocol perplexity over ``windows [N, L]`` (L <= the context the model was loaded with)."""
    from jaxq.eval.perplexity import token_nll

    t0 = time.perf_counter()
    nll = [token_nll(window_logits(llm, w), w) for w in np.asarray(windows)]
    mean = float(np.concatenate(nll).mean())
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(sum(map(len, nll))),
            "seconds": time.perf_counter() - t0}
