"""Subprocess runner for the train tests: ``python _run.py OUT STEPS [--devices N --mode dp|fsdp]
[--ckpt DIR --every K] [--sleep S]``; appends one ``step loss`` line per step to OUT."""

from __future__ import annotations

import argparse
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("steps", type=int)
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--mode", default="none")
ap.add_argument("--ckpt")
ap.add_argument("--every", type=int, default=2)
ap.add_argument("--sleep", type=float, default=0.0)
a = ap.parse_args()
if a.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.devices}"
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # _tinyllama

import jax  # noqa: E402
from _tiny import fq_apply, fq_init, kd_loss, optimizer, setup  # noqa: E402

from jaxq.train import fit  # noqa: E402

student, teacher, data = setup()
for mode in a.mode.split(","):
    mesh = None
    if mode != "none":
        assert len(jax.devices()) == a.devices, jax.devices()
        mesh = jax.make_mesh((a.devices,), ("data",))
    out = a.out if mode == "none" else f"{a.out}.{mode}"

    def log(step, metrics, out=out):
        with open(out, "a") as f:
            f.write(f"{step} {metrics['loss']!r}\n")
        time.sleep(a.sleep)

    r = fit(kd_loss, student, data, optimizer=optimizer(), steps=a.steps, args=(teacher,),
            extra=fq_init(student), transform=fq_apply, mesh=mesh,
            sharding=mode if mode != "none" else "dp", checkpoint_dir=a.ckpt,
            checkpoint_every=a.every, callback=log, progress=False)
    emb = r.state.trainable["params"]["model"]["embed_tokens"]["weight"]
    print(mode, "embed sharding", emb.sharding.spec if mesh else None,
          "shard shape", emb.addressable_shards[0].data.shape, flush=True)
