"""Foundation figures: RTN quantize time, pack/unpack throughput, compressed execution vs float.

    .venv/bin/python scripts/bench_core.py   # writes the 'core' section of BENCHMARKS.md
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from benchlib import header, median_time, table, write_section

import jaxq
from jaxq.core import packing


def bench_rtn() -> list[list]:
    rows = []
    for shape in [(4096, 4096), (14336, 4096)]:
        w = jax.random.normal(jax.random.key(0), shape, jnp.float32)
        for bits, gs, clip in [(4, 64, "minmax"), (4, 128, "minmax"), (4, 128, "mse"),
                               (8, "channel", "minmax")]:
            f = lambda: jax.block_until_ready(
                jaxq.rtn_quantize(w, bits=bits, group_size=gs, clip=clip).packed)
            t = median_time(f, repeats=3)
            rows.append([f"{shape[0]}x{shape[1]}", bits, gs, clip, f"{t * 1e3:.0f}"])
    return rows


def bench_packing() -> list[list]:
    rows = []
    n = 4096 * 4096
    for bits in [2, 3, 4, 8]:
        q = jax.random.randint(jax.random.key(1), (4096, 4096), 0, 2**bits).astype(jnp.uint32)
        pack = jax.jit(lambda a, b=bits: packing.pack(a, b))
        packed = jax.block_until_ready(pack(q))
        unpack = jax.jit(lambda p, b=bits: packing.unpack(p, b, 4096))
        tp = median_time(lambda: jax.block_until_ready(pack(q)))
        tu = median_time(lambda: jax.block_until_ready(unpack(packed)))
        packed_gb = n * bits / 8 / 1e9
        rows.append([bits, f"{tp * 1e3:.1f}", f"{packed_gb / tp:.2f}", f"{tu * 1e3:.1f}",
                     f"{packed_gb / tu:.2f}", f"{n / tu / 1e9:.2f}"])
    return rows


def bench_compressed_execution() -> list[list]:
    from jaxq.calib import apply as compressed_apply

    k = jax.random.split(jax.random.key(2), 4)
    dims = [1024, 4096, 4096, 1024]
    params = {f"layer{i}": {"kernel": jax.random.normal(k[i], (dims[i], dims[i + 1])) * 0.02}
              for i in range(3)}

    def mlp(p, x):
        for i in range(3):
            x = x @ p[f"layer{i}"]["kernel"]
            x = jax.nn.gelu(x) if i < 2 else x
        return x

    rows = []
    for batch in [1, 64, 1024]:
        x = jax.random.normal(k[3], (batch, 1024))
        float_fn = jax.jit(mlp)
        t_float = median_time(lambda: jax.block_until_ready(float_fn(params, x)), repeats=10)
        for bits in [4, 8]:
            qparams = jaxq.RTN(bits=bits, group_size=64)(params)
            q_fn = jax.jit(compressed_apply(mlp))
            t_q = median_time(lambda: jax.block_until_ready(q_fn(qparams, x)), repeats=10)
            rows.append([batch, bits, f"{t_float * 1e3:.2f}", f"{t_q * 1e3:.2f}",
                         f"{t_q / t_float:.2f}"])
    return rows


def main() -> None:
    body = ["## Foundation (issue 2): RTN, packing, compressed execution on CPU", "",
            header(), "", "RTN quantize time (median of 3, after one warm-up compile):", "",
            table(["matrix", "bits", "group", "clip", "ms"], bench_rtn()), "",
            "Pack/unpack of a 4096x4096 code matrix (GB/s of packed data; unpack also in "
            "G codes/s):", "",
            table(["bits", "pack ms", "pack GB/s", "unpack ms", "unpack GB/s", "unpack Gcodes/s"],
                  bench_packing()), ""]
    try:
        rows = bench_compressed_execution()
        body += ["Compressed execution of a 3-layer MLP (1024-4096-4096-1024, jit, XLA "
                 "dequantize-at-use fallback) against float32:", "",
                 table(["batch", "bits (g64)", "float ms", "jaxq.apply ms", "ratio"], rows)]
    except ImportError as err:
        body += [f"Compressed execution: not measured ({err})."]
    text = "\n".join(body)
    print(text)
    write_section("core", text)


if __name__ == "__main__":
    main()
