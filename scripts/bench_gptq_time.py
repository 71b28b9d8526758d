"""GPTQ wall time on this machine, side by side: jaxq against mlx-lm's GPTQ (issue 4's speed goal).

All three quantize SmolLM2-135M-Instruct at W4 g64 from the protocol's 128 x 512 PTB-train
calibration tokens, one after the other in this process, with nothing else running:

* jaxq true-sequential: ``jaxq compress --recipe gptq-w4-g64`` minus loading and saving
  (each layer calibrated on the outputs of the already-quantized earlier layers);
* jaxq from float-model statistics: one statistics pass, then GPTQ of every linear (the same
  schedule as mlx-lm's: all Hessians from the float model);
* mlx-lm: ``mlx_lm.quant.gptq.gptq_quantize`` on the bf16 model, fed the same windows.

    python scripts/bench_gptq_time.py [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_quality as bq  # noqa: E402
import benchlib  # noqa: E402


def jaxq_sequential() -> float:
    import jax

    from jaxq.cli import LoadedModel, compress_params
    from jaxq.recipes import load_recipe

    params, config, tok = bq.model()
    t0 = time.perf_counter()
    q = compress_params(LoadedModel(params, config, tok, "default", {}),
                        load_recipe("gptq-w4-g64"), progress=False)
    jax.block_until_ready(jax.tree.leaves(q))
    return time.perf_counter() - t0


def jaxq_collect() -> tuple[float, float]:
    """(statistics pass, GPTQ of every linear) seconds."""
    import jax
    import jax.numpy as jnp

    from jaxq.calib import calibrate, discover_sites
    from jaxq.models.llama import make_apply_fn
    from jaxq.recipes import load_recipe

    params, config, _ = bq.model()
    apply_fn = make_apply_fn(config)
    windows = bq.calib_set()
    batches = [(jnp.asarray(windows[i:i + 8]),) for i in range(0, len(windows), 8)]
    t0 = time.perf_counter()
    axes = {p: s.axis for p, s in discover_sites(apply_fn, params, *batches[0]).items()}
    _, stats = calibrate(apply_fn, params, batches, None, collectors=["gram"], progress=False)
    jax.block_until_ready(jax.tree.leaves(stats))
    t1 = time.perf_counter()
    q = load_recipe("gptq-w4-g64").build(head_dim=config.head_dim)(params, stats=stats,
                                                                    axes=axes)
    jax.block_until_ready(jax.tree.leaves(q))
    return t1 - t0, time.perf_counter() - t1


def mlx_gptq() -> float:
    import mlx.core as mx
    from mlx_lm.quant.gptq import gptq_quantize
    from mlx_lm.utils import load

    src = bq.mlx_float32_dir()  # MLX's CPU backend has no fast bf16 matmul
    model, _, _ = load(str(src), lazy=True, return_config=True)
    data = mx.array(bq.calib_set())
    t0 = time.perf_counter()
    model, _ = gptq_quantize(model, data, 4, 64, 6, 64)
    mx.eval(model.parameters())
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-sequential", action="store_true",
                        help="skip the true-sequential run (the slowest of the three)")
    args = parser.parse_args()
    from mlx_backend.verify import reexec_with_openblas

    reexec_with_openblas()
    bq.calib_set()
    bq.mlx_float32_dir()
    mlx_s = mlx_gptq()
    print(f"mlx-lm GPTQ: {mlx_s:.1f} s", flush=True)
    stats_s, gptq_s = jaxq_collect()
    print(f"jaxq from float statistics: {stats_s:.1f} + {gptq_s:.1f} s", flush=True)
    seq_s = None if args.no_sequential else jaxq_sequential()
    print(f"jaxq true-sequential: {seq_s} s", flush=True)
    rows = [
        ["mlx-lm `gptq_quantize` (Hessians from the float model, float32)", f"{mlx_s:.1f}",
         "1.00x"],
        ["jaxq GPTQ from float-model statistics (same schedule as mlx-lm)",
         f"{stats_s + gptq_s:.1f} ({stats_s:.1f} statistics + {gptq_s:.1f} GPTQ)",
         f"{mlx_s / (stats_s + gptq_s):.2f}x"],
    ]
    if seq_s is not None:
        rows.append(["jaxq GPTQ true-sequential (`--recipe gptq-w4-g64`)", f"{seq_s:.1f}",
                     f"{mlx_s / seq_s:.2f}x"])
    text = "\n".join([
        "### GPTQ wall time: jaxq against mlx-lm, side by side", "",
        benchlib.header(), "",
        "SmolLM2-135M-Instruct, W4 g64, the protocol's 128 x 512 PTB-train calibration tokens, "
        "the runs one after the other in one process on the otherwise idle machine "
        "(model loading and saving excluded, compilation included). Speed-up = mlx-lm's time / "
        "this row's.", "",
        benchlib.table(["GPTQ", "seconds", "speed-up vs mlx-lm"], rows)])
    print(text)
    if not args.no_write:
        benchlib.write_section("gptq-time", text)


if __name__ == "__main__":
    main()
