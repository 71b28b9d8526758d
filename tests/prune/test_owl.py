"""OWL's per-layer sparsities, global magnitude, and pruning through jaxq.calibrate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.prune import OWL, Magnitude, SparseGPT, Wanda, outlier_ratio, owl_sparsities, plan


def test_owl_sparsities_weighted_target():
    ratios = np.array([0.01, 0.05, 0.02, 0.10])
    sizes = np.array([100, 300, 200, 400])
    sp = owl_sparsities(ratios, 0.7, 0.08, sizes)
    assert np.average(sp, weights=sizes) == pytest.approx(0.7)
    assert np.argsort(sp).tolist() == np.argsort(-ratios).tolist()  # more outliers, less pruned
    assert sp.max() - sp.min() == pytest.approx(0.16)


def test_outlier_ratio_counts_scores():
    w = np.ones((4, 10), np.float32)
    xn = np.ones(10, np.float32)
    xn[0] = 100.0  # one input column holds every outlier
    assert outlier_ratio(jnp.asarray(w), jnp.asarray(xn), 5.0) == pytest.approx(0.1)


def _model():
    rng = np.random.default_rng(0)
    params = {"l1": {"weight": jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)},
              "l2": {"weight": jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)},
              "l3": {"weight": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)}}
    scale = np.ones(64, np.float32)
    scale[:3] = 30.0  # outlier channels into l1

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["l1"]["weight"].T)
        h = jnp.tanh(h @ p["l2"]["weight"].T)
        return h @ p["l3"]["weight"].T

    batches = [jnp.asarray(rng.normal(size=(16, 64)) * scale, jnp.float32) for _ in range(3)]
    return apply_fn, params, batches


def test_owl_plan_then_calibrate():
    apply_fn, params, batches = _model()
    owl = OWL(Wanda(sparsity=0.6), lam=0.1)
    with pytest.raises(TypeError, match="jaxq.prune.plan"):
        jaxq.calibrate(apply_fn, params, batches, owl, progress=False)
    planned = plan(owl, apply_fn, params, batches, progress=False)
    qp, _ = jaxq.calibrate(apply_fn, params, batches, planned, progress=False)
    sp = {k: float((np.asarray(qp[k]["weight"]) == 0).mean()) for k in params}
    sizes = {k: params[k]["weight"].size for k in params}
    total = sum(sp[k] * sizes[k] for k in sp) / sum(sizes.values())
    assert total == pytest.approx(0.6, abs=0.025)  # Wanda drops floor(s * 32) per row
    assert sp["l1"] < 0.6 - 0.05  # the layer with outlier inputs is pruned less
    assert max(sp.values()) - min(sp.values()) == pytest.approx(0.2, abs=0.02)


def test_global_magnitude():
    _, params, _ = _model()
    params = dict(params, l2={"weight": params["l2"]["weight"] * 10})
    out = Magnitude(sparsity=0.5, scope="global")(params)
    zeros = sum(int((np.asarray(out[k]["weight"]) == 0).sum()) for k in out)
    total = sum(params[k]["weight"].size for k in params)
    assert abs(zeros - total // 2) <= len(out)  # one threshold: floor per leaf at most
    assert (np.asarray(out["l2"]["weight"]) == 0).mean() < 0.15  # the large layer keeps most
    with pytest.raises(TypeError, match="whole tree"):
        Magnitude(scope="global").apply_leaf("l1/weight", params["l1"]["weight"])


@pytest.mark.parametrize("sequential", [True, False])
def test_sparsegpt_through_calibrate(sequential):
    apply_fn, params, batches = _model()
    qp, stats = jaxq.calibrate(apply_fn, params, batches, SparseGPT(pattern="2:4"),
                               sequential=sequential, progress=False)
    for k in params:
        d = np.asarray(qp[k]["weight"])
        assert ((d != 0).reshape(d.shape[0], -1, 4).sum(-1) <= 2).all()
    x = jnp.concatenate(batches)
    ref = apply_fn(params, x)
    err_sgpt = float(jnp.mean((apply_fn(qp, x) - ref) ** 2))
    err_mag = float(jnp.mean((apply_fn(Magnitude(pattern="2:4")(params), x) - ref) ** 2))
    assert err_sgpt < 0.7 * err_mag


def test_stacked_leaf_prunes_per_slice():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.normal(size=(3, 16, 32)), jnp.float32)

    def apply_fn(p, x):
        h, _ = jax.lax.scan(lambda h, lw: (jnp.tanh(h @ lw), None), x, p["layers"])
        return h

    x = [jnp.asarray(rng.normal(size=(8, 16)), jnp.float32) for _ in range(2)]
    # layers are (in, out) here: the input axis is -2
    qp, _ = jaxq.calibrate(apply_fn, {"layers": w[:, :, :16]}, x,
                           SparseGPT(pattern="2:4"), progress=False)
    d = np.asarray(qp["layers"])
    assert d.shape == (3, 16, 16)
    assert ((np.moveaxis(d, -2, -1) != 0).reshape(3, 16, -1, 4).sum(-1) <= 2).all()
