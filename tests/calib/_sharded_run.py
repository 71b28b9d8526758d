"""Subprocess runner for the sharded-calibration tests (a device count or a process group is
fixed when JAX starts, so these runs cannot share the test process).

``python _sharded_run.py devices OUT MODEL N MESHES``: N forced host devices; for each mesh
``DxM`` (data x model) calibrate MODEL on all of ``case(MODEL).batches``.
``python _sharded_run.py process OUT MODEL PORT I``: process I of two under ``jax.distributed``
on 127.0.0.1:PORT (gloo CPU collectives), holding half of the batches (I=0 the first half).
Each writes ``OUT`` (npz: :func:`flat` of every run) and ``OUT.json`` (shardings, timings).
``indivisible OUT mlp N`` and ``uneven OUT mlp PORT I``: bad inputs (batches that do not split
over the data axis; processes with unequal batch counts); each writes its error line to
``OUT.<process index>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class Case:
    apply_fn: Callable
    params: Any
    batches: list
    masks: list
    transform: Any
    collectors: tuple = ("sq_norm", "mean_abs", "absmax", "count")


def case(model: str) -> Case:
    """``mlp``: two dense layers around a ``scan`` over a stacked weight (float inputs, padded
    rows masked); ``llama``: the tiny Llama with one block (token batches)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxq.quant.gptq import GPTQ

    rng = np.random.default_rng(0)
    if model == "mlp":
        def apply_fn(p, x):
            h = jax.nn.gelu(x @ p["w1"])
            h, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, p["ws"])
            return h @ p["w2"]

        params = {"w1": rng.normal(size=(32, 64)) / 6, "ws": rng.normal(size=(2, 64, 64)) / 8,
                  "w2": rng.normal(size=(64, 32)) / 8}
        params = jax.tree.map(lambda w: jnp.asarray(w, jnp.float32), params)
        batches = [jnp.asarray(rng.normal(size=(8, 6, 32)), jnp.float32) for _ in range(8)]
        masks = [jnp.asarray(rng.random((8, 6)) > 0.2) for _ in range(8)]
    else:
        sys.path.insert(0, os.path.dirname(HERE))
        from _tinyllama import tiny_llama

        from jaxq.models.llama import make_apply_fn

        cfg, params = tiny_llama(num_layers=1)
        apply_fn = make_apply_fn(cfg)
        batches = [jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 16)), jnp.int32)
                   for _ in range(8)]
        masks = [jnp.asarray(rng.random((4, 16)) > 0.1) for _ in range(8)]
    return Case(apply_fn, params, batches, masks, GPTQ(bits=4, group_size=32))


def run(c: Case, batches: list, masks: list, **mesh: Any) -> tuple[Any, Any]:
    import jaxq

    return jaxq.calibrate(c.apply_fn, c.params, batches, c.transform, progress=False,
                          collectors=list(c.collectors), mask=masks, **mesh)


def flat(params: Any, stats: Any) -> dict:
    """Every statistic (``stats/PATH/NAME``) and every leaf child (``leaf/PATH/CHILD``) as numpy
    (``process_allgather`` first: a leaf split over processes is not all on one host)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from jaxq.core.tree import flatten_with_paths

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    out = {f"stats/{p}/{n}": np.asarray(v) for p, d in stats.items() for n, v in d.items()}
    for path, leaf in flatten_with_paths(params)[0]:
        for kp, child in jax.tree_util.tree_flatten_with_path(leaf)[0]:
            out[f"leaf/{path}/{jax.tree_util.keystr(kp)}"] = np.asarray(child)
    return out


def spec(x: Any) -> str:
    return str(x.sharding.spec)


# --- the launching side (the tests) --------------------------------------------------------

TIMEOUT = 600  # a hung collective fails the test instead of hanging CI


def clean_env() -> dict:
    """The test's environment for a runner: CPU only, no inherited device-count flag."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], cwd: str, processes: int = 1) -> list[subprocess.Popen]:
    """Start the runner; with ``processes=2``, as processes 0 and 1 of a ``jax.distributed``
    group on a free loopback port (its port and process id appended to ``args``)."""
    extra: list[list[str]] = [[]]
    if processes > 1:
        port = str(free_port())
        extra = [[port, str(i)] for i in range(processes)]
    return [subprocess.Popen([sys.executable, __file__, *args, *e], env=clean_env(), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for e in extra]


def wait(procs: list[subprocess.Popen]) -> None:
    """Every process must exit 0 within ``TIMEOUT`` (one that hangs, in a collective say, is
    killed and fails the test)."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"


# --- the runner -----------------------------------------------------------------------------

def _distributed(port: str, pid: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=pid, initialization_timeout=120)


def _bad(mode: str, out: str, argv: list[str]) -> None:
    """One bad input, run through the reliability harness; its error line goes to ``OUT``."""
    import jax

    tests = os.path.dirname(HERE)
    sys.path[:0] = [tests, os.path.join(tests, "reliability")]
    from _probe import expect_clear_error

    if mode == "uneven":
        _distributed(argv[0], int(argv[1]))
    c = case("mlp")
    if mode == "indivisible":  # 8 rows per batch on a 3-way data axis
        mesh = jax.make_mesh((3, 1), ("data", "model"))
        line = expect_clear_error(lambda: run(c, c.batches, None, mesh=mesh),
                                  "batch 0", "'data'", "multiple of 3")
    else:  # process 1 passes one batch fewer than process 0
        mesh = jax.make_mesh((2, 1), ("data", "model"))
        mine = c.batches[:4 - jax.process_index()]
        line = expect_clear_error(lambda: run(c, mine, None, mesh=mesh),
                                  f"process {jax.process_index()}", "same shapes")
    with open(f"{out}.{jax.process_index()}", "w") as f:
        f.write(line)


def main(argv: list[str]) -> None:
    mode, out, model = argv[:3]
    if mode in ("devices", "indivisible"):
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={argv[3]}"
    if mode in ("indivisible", "uneven"):
        return _bad(mode, out, argv[3:])
    import jax
    import numpy as np

    from jaxq.calib.sharded import MeshLayout
    from jaxq.core.tree import flatten_with_paths

    if mode == "process":
        pid = int(argv[4])
        _distributed(argv[3], pid)
    c = case(model)
    arrays: dict = {}
    info: dict = {"devices": jax.device_count(), "processes": jax.process_count()}
    if mode == "devices":
        for shape in argv[4].split(","):
            d, m = (int(s) for s in shape.split("x"))
            mesh = jax.make_mesh((d, m), ("data", "model"))
            t0 = time.perf_counter()
            params, stats = run(c, c.batches, c.masks, mesh=mesh, model_axis="model")
            batch = MeshLayout(mesh=mesh).place_batches([(c.batches[0],)])[0][0]
            info[shape] = {"seconds": time.perf_counter() - t0, "batch": spec(batch),
                           "rows": int(c.batches[0].shape[0]),
                           "batch_rows": [x.data.shape[0] for x in batch.addressable_shards],
                           "stats": {p: {n: spec(v) for n, v in d.items()}
                                     for p, d in stats.items()},
                           "leaves": {p: spec(getattr(v, "packed", v))
                                      for p, v in flatten_with_paths(params)[0]}}
            arrays.update({f"{shape}/{k}": v for k, v in flat(params, stats).items()})
    else:
        mesh = jax.make_mesh((2, 1), ("data", "model"))
        half = len(c.batches) // 2
        mine = slice(pid * half, (pid + 1) * half)
        t0 = time.perf_counter()
        params, stats = run(c, c.batches[mine], c.masks[mine], mesh=mesh)
        info["seconds"] = time.perf_counter() - t0
        info["stats"] = {p: {n: spec(v) for n, v in d.items()} for p, d in stats.items()}
        arrays = flat(params, stats)
        if pid != 0:
            return
    np.savez(out, **arrays)
    with open(f"{out}.json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the worktree's jaxq
    main(sys.argv[1:])
