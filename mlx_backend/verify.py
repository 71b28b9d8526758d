"""Run an exported directory in the real mlx-lm runtime: logits, greedy tokens, perplexity.

Used by the tests and ``scripts/bench_export.py`` to check that what jaxq writes is what mlx-lm
computes. The perplexity follows the eval protocol: the windows are jaxq's
(:func:`jaxq.eval.data.eval_windows`), each one forward through mlx-lm's model, and the
log-softmax is taken in float64 with numpy.

The ``mlx[cpu]`` Linux wheel ships a slow reference BLAS; :func:`openblas_path` finds Debian's
OpenBLAS so a process can be started with ``LD_PRELOAD`` set to it (it must be set before the
process starts, see :func:`reexec_with_openblas`).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def load(path: str | Path, *, with_tokenizer: bool = False) -> Any:
    """The mlx-lm model of an exported directory (``(model, tokenizer)`` with the tokenizer)."""
    import mlx_lm

    if with_tokenizer:
        return mlx_lm.load(str(path))
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    return model


def logits(model: Any, tokens: Any) -> np.ndarray:
    """float32 logits ``[B, T, V]`` of int tokens ``[B, T]`` from a full forward (no cache)."""
    import mlx.core as mx

    out = model(mx.array(np.asarray(tokens, np.int32)))
    out = out.astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def greedy(model: Any, prompt: Any, steps: int) -> list[int]:
    """``steps`` greedy tokens after ``prompt`` through mlx-lm's KV cache (no EOS stop)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    x = mx.array(np.asarray(prompt, np.int32))[None]
    out: list[int] = []
    for _ in range(steps):
        step_logits = model(x, cache=cache)[:, -1, :]
        tok = mx.argmax(step_logits, axis=-1)
        mx.eval(tok)
        out.append(int(tok.item()))
        x = tok[None]
    return out


def dequantize_model(model: Any) -> Any:
    """Replace mlx-lm's quantized layers by float32 ones, dequantized by ``mx.dequantize``.

    mlx's CPU ``quantized_matmul`` is a plain loop (about 8x slower than a dequantized float
    matmul through OpenBLAS here), so the benchmark's full-protocol perplexity runs on weights
    that mlx itself dequantized from the exported files, in float32 (mlx-lm's own
    ``dequantize_model`` keeps float16 scales' precision, which is coarser). The tests check on
    small models that both paths give the same logits.
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        biases = module.get("biases")
        scales = module.scales
        if module.mode == "affine":
            scales = scales.astype(mx.float32)
            biases = biases.astype(mx.float32)
        weight = mx.dequantize(module.weight, scales, biases, module.group_size, module.bits,
                               mode=module.mode, dtype=mx.float32)
        if isinstance(module, nn.QuantizedEmbedding):
            new = nn.Embedding(*weight.shape)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            if "bias" in module:
                new.bias = module.bias
        new.weight = weight
        swaps.append((name, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    mx.eval(model.parameters())
    return model


def perplexity(model: Any, windows: np.ndarray, *, batch: int = 1) -> dict[str, float]:
    """Protocol perplexity of an mlx-lm model over ``windows [N, L]``."""
    from jaxq.eval.perplexity import token_nll

    t0 = time.perf_counter()
    nll = []
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        out = logits(model, chunk)
        nll.extend(token_nll(out[j], chunk[j]) for j in range(len(chunk)))
    mean = float(np.concatenate(nll).mean())
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": int(sum(map(len, nll))),
            "seconds": time.perf_counter() - t0}


def openblas_path() -> str | None:
    """Debian's pthread OpenBLAS (``apt-get install libopenblas0-pthread``), if installed."""
    try:
        listing = subprocess.run(["dpkg", "-L", "libopenblas0-pthread"], capture_output=True,
                                 text=True, check=False).stdout
    except OSError:
        return None
    libs = [line for line in listing.splitlines() if line.endswith("/libopenblas.so.0")]
    return libs[0] if libs and Path(libs[0]).exists() else None


def reexec_with_openblas() -> bool:
    """Restart this Python process with OpenBLAS preloaded (once); False if not available.

    Returns only when no restart happened (already preloaded, opted out with
    ``JAXQ_NO_OPENBLAS=1``, or OpenBLAS is not installed).
    """
    lib = openblas_path()
    if lib is None or os.environ.get("JAXQ_NO_OPENBLAS") or lib in os.environ.get(
            "LD_PRELOAD", ""):
        return False
    env = dict(os.environ, LD_PRELOAD=lib)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return True  # pragma: no cover - execve does not return
