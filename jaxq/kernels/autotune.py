"""A small block-size autotuner whose choices persist across processes as JSON.

Keys name the device kind and SM count, the problem (M bucket, K, N), the weight format and the
activation dtype, so a cache file can be shared between machines of different kinds. Their
version prefix changes when the kernels or the candidate set do (v6: a 128x256 ``scale_first``
tile for M > 128, 64x64 tiles on fewer stages at M <= 64), so choices timed on older kernels are
not reused. The file lives at ``$JAXQ_CACHE_DIR/autotune.json`` (default ``~/.cache/jaxq``);
writes merge with what is on disk and replace the file atomically, so concurrent processes lose
at most their own entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxq.core.io import atomic_write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How to run one quantized matmul.

    ``impl``: ``"pallas"`` (fused dequant kernel on tensor cores), ``"gemv"`` (the
    decode-size kernel of :mod:`jaxq.kernels.pallas_gemv`: FMA, no MMA; ``bm`` unused) or
    ``"xla"`` (XLA's dequantize + dot: tiny layers) or
    ``"dequant"`` (dequantize the weight once
    into the activation dtype, then the vendor GEMM: best when M is large enough that the GEMM
    is compute bound and the extra weight pass is amortised).
    """

    impl: str = "pallas"
    bm: int = 16
    bn: int = 64
    split_k: int = 1
    unroll: int = 1
    num_warps: int = 4
    num_stages: int = 3
    xsum_inside: bool = False  # gemv: form the group sums of x in-kernel (no extra launch)
    reduce_inside: bool = False  # split_k > 1: the last split sums the partials in-kernel
    pairs: bool = True  # tensor-core kernel: two codes per operand register where they fit
    scale_first: bool = False  # tensor-core kernel: scale the operand, one accumulator

    def label(self) -> str:
        """A short name for tables and logs: ``gemv 64 sk8 w4s3``, ``16x64 sk4 sum-in w4s3``,
        ``dequant 128 w8s1``."""
        if self.impl == "dequant":
            s = f"dequant {self.bn}" + (f" u{self.unroll}" if self.unroll > 1 else "")
            return s + f" w{self.num_warps}s{self.num_stages}"
        if self.impl not in ("pallas", "gemv"):
            return self.impl
        s = f"gemv {self.bn}" if self.impl == "gemv" else f"{self.bm}x{self.bn}"
        if self.split_k > 1:
            s += f" sk{self.split_k}"
        if self.unroll > 1:
            s += f" u{self.unroll}"
        if self.split_k > 1 and self.reduce_inside:
            s += " sum-in" + ("/x-in" if self.impl == "gemv" and self.xsum_inside else "")
        elif self.impl == "gemv" and self.xsum_inside:
            s += " x-in"
        if self.impl == "pallas" and not self.pairs:
            s += " unpaired"
        if self.impl == "pallas" and self.scale_first:
            s += " scale-first"
        return s + f" w{self.num_warps}s{self.num_stages}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KernelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def cache_path() -> Path:
    root = os.environ.get("JAXQ_CACHE_DIR") or os.path.join(Path.home(), ".cache", "jaxq")
    return Path(root) / "autotune.json"


def m_bucket(m: int) -> int:
    """Problems are tuned per power-of-two bucket of M (decode batches vary call to call)."""
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


H100_SMS = 132


def _core_count() -> int | None:
    count = getattr(jax.devices()[0], "core_count", None)
    return count if isinstance(count, int) and count > 0 else None


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of the default GPU (its ``core_count``); an H100's count where
    the device does not say (CPU hosts lowering for CUDA, interpret mode)."""
    return _core_count() or H100_SMS


def device_kind() -> str:
    """The device's name in tuning keys: its kind, and its SM count where it reports one (a
    MIG slice of an H100 has the H100's kind but a fraction of its SMs, and other choices)."""
    kind, count = jax.devices()[0].device_kind, _core_count()
    return f"{kind} ({count} SMs)" if count else kind


def make_key(*, m: int, k: int, n: int, bits: int, group_size: int, fmt: str, dtype: Any,
             backend: str, kind: str | None = None) -> str:
    kind = kind or device_kind()
    dt = jax.numpy.dtype(dtype).name
    return f"v6|{kind}|{backend}|m{m_bucket(m)}|k{k}|n{n}|{fmt}{bits}|g{group_size}|{dt}"


_MEMORY: dict[str, KernelConfig] | None = None


def _load_disk() -> dict[str, Any]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def lookup(key: str) -> KernelConfig | None:
    """The persisted choice for ``key``, if any (the file is read once per process)."""
    global _MEMORY
    if _MEMORY is None:
        _MEMORY = {k: KernelConfig.from_json(v["config"]) for k, v in _load_disk().items()
                   if isinstance(v, dict) and "config" in v}
    return _MEMORY.get(key)


def store(key: str, cfg: KernelConfig, timings_us: dict[str, float] | None = None) -> None:
    """Record ``cfg`` for ``key`` in memory and on disk (merge, then atomic replace)."""
    lookup(key)
    assert _MEMORY is not None
    _MEMORY[key] = cfg
    path = cache_path()
    try:
        data = _load_disk()
        data[key] = {"config": cfg.to_json(), "timings_us": timings_us or {}}
        atomic_write_json(path, data, indent=1, sort_keys=True)
    except OSError:
        pass  # a read-only cache dir must not break inference


def time_call(fn: Callable[[], Any], *, launches: int = 20, reps: int = 3) -> float:
    """Median µs per call: ``launches`` calls back to back, one sync, after a warm-up call."""
    jax.block_until_ready(fn())
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(launches):
            out = fn()
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / launches * 1e6)
    return statistics.median(samples)


def tune(key: str, candidates: Sequence[KernelConfig],
         bench: Callable[[KernelConfig], float]) -> KernelConfig:
    """Time every candidate with ``bench`` (µs; exceptions skip it), persist and return the best."""
    timings: dict[str, float] = {}
    best, best_t = None, float("inf")
    errors = []
    log.info("tuning %s: %d candidates (once; kept in %s)", key, len(candidates), cache_path())
    t0 = time.perf_counter()
    for cfg in candidates:
        try:
            t = bench(cfg)
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is not chosen
            errors.append(f"{cfg}: {type(e).__name__}: {str(e)[:200]}")
            log.debug("candidate skipped: %s", errors[-1])
            continue
        timings[json.dumps(cfg.to_json(), sort_keys=True)] = round(t, 2)
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no candidate config ran for {key}: " + "; ".join(errors[:2]))
    log.info("tuned %s in %.0f s: %.1f µs with %s (%d of %d candidates ran)", key,
             time.perf_counter() - t0, best_t, best.label(), len(timings), len(candidates))
    store(key, best, timings)
    return best
