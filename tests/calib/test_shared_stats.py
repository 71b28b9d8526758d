"""Sites reading the same activation (q/k/v-style) compute its statistics once."""

import jax.numpy as jnp
import numpy as np

import jaxq
from jaxq.calib import collectors as coll


def test_sibling_sites_share_batch_statistics(monkeypatch):
    r = np.random.default_rng(0)
    params = {n: {"weight": jnp.asarray(r.standard_normal((16, 32)), jnp.float32)}
              for n in ("q", "k", "v")}
    params["o"] = {"weight": jnp.asarray(r.standard_normal((8, 48)), jnp.float32)}

    def fn(p, x):
        h = jnp.concatenate([x @ p[n]["weight"].T for n in ("q", "k", "v")], axis=-1)
        return jnp.tanh(h) @ p["o"]["weight"].T

    batches = [jnp.asarray(r.standard_normal((3, 5, 32)), jnp.float32) for _ in range(4)]
    calls = []
    original = coll.batch_deltas

    def counting(*args, **kwargs):
        calls.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(coll, "batch_deltas", counting)
    _, stats = jaxq.calibrate(fn, params, batches, collectors=["gram", "absmax"],
                              progress=False)
    # q, k and v read one activation: 4 batches for them together, 4 for o.
    assert sorted(calls) == [32] * 4 + [48] * 4
    rows = np.concatenate([np.asarray(b).reshape(-1, 32) for b in batches]).astype(np.float64)
    for n in ("q", "k", "v"):
        st = stats[f"{n}/weight"]
        np.testing.assert_allclose(np.asarray(st["gram"]), rows.T @ rows, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(st["absmax"]), np.abs(rows).max(0), rtol=1e-6)
