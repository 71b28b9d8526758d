"""SparseGPT against a float64 reference; quality against Wanda and magnitude; N:M validity;
joint 2:4 + 4-bit and GPTQ/RTN that keep a mask exactly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _ref import correlated, sparsegpt64

from jaxq.core.sparse import NMSparse, Sparse
from jaxq.prune import Magnitude, SparseGPT, Wanda, sparsegpt_prune
from jaxq.quant import GPTQ, RTN


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    x = correlated(rng, 1024, 128)
    w = rng.normal(size=(48, 128)).astype(np.float32)
    return w, x


def out_err(w, wh, x):
    d = np.asarray(w, np.float64) - np.asarray(wh, np.float64)
    return float(np.sum((d @ x.T.astype(np.float64)) ** 2))


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sweep_matches_float64_reference(layer, nm):
    w, x = layer
    h = x.T @ x
    pattern = None if nm is None else f"{nm[0]}:{nm[1]}"
    res = sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), sparsity=0.5, pattern=pattern,
                          blocksize=32)
    ref_w, ref_keep = sparsegpt64(w, h.astype(np.float64), sparsity=0.5, nm=nm, block=32)
    keep = np.asarray(res["keep"])
    assert (keep == ref_keep).mean() > 0.999
    same = keep == ref_keep
    np.testing.assert_allclose(np.asarray(res["w"])[same], ref_w[same], rtol=2e-3, atol=2e-3)
    assert np.isclose(out_err(w, res["w"], x), out_err(w, ref_w, x), rtol=2e-3)


@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_sparsegpt_beats_wanda_and_magnitude(layer, pattern):
    w, x = layer
    params = {"fc": {"weight": jnp.asarray(w)}}
    stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x),
                           "sq_norm": jnp.asarray((x * x).sum(0))}}
    errs = {}
    for name, t in [("magnitude", Magnitude(pattern=pattern)),
                    ("wanda", Wanda(pattern=pattern)), ("sparsegpt", SparseGPT(pattern=pattern))]:
        wh = np.asarray(t(params, stats=stats)["fc"]["weight"])
        assert (wh == 0).mean() == pytest.approx(0.5, abs=1e-6)
        errs[name] = out_err(w, wh, x)
    assert errs["sparsegpt"] < 0.8 * errs["wanda"] < 0.8 * errs["magnitude"], errs


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_every_group_valid(layer, pattern):
    w, x = layer
    n, m = map(int, pattern.split(":"))
    res = sparsegpt_prune(jnp.asarray(w), jnp.asarray(x.T @ x), pattern=pattern)
    nz = (np.asarray(res["w"]) != 0).reshape(48, -1, m).sum(-1)
    assert (nz <= n).all() and (np.asarray(res["keep"]).reshape(48, -1, m).sum(-1) == n).all()


def _groups_ok(dense, mask_zero, n, m):
    d = np.asarray(dense)
    return bool((d[mask_zero] == 0).all() and ((d != 0).reshape(d.shape[0], -1, m).sum(-1)
                                               <= n).all())


def test_joint_2of4_w4_keeps_every_group(layer):
    w, x = layer
    params = {"fc": {"weight": jnp.asarray(w)}}
    stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x)}}
    q = SparseGPT(pattern="2:4", bits=4, group_size=64)(params, stats=stats)["fc"]["weight"]
    assert isinstance(q, NMSparse) and q.values.bits == 4 and q.values.group_size == 32
    d = np.asarray(q.materialize())
    keep = np.asarray(q.materialize() != 0)
    assert _groups_ok(d, ~keep, 2, 4)
    # the quantized 2:4 layer is close to the float 2:4 one, and far better than pruning
    # then rounding without compensation
    e_sp = out_err(w, SparseGPT(pattern="2:4")(params, stats=stats)["fc"]["weight"], x)
    e_joint = out_err(w, d, x)
    wd = Magnitude(pattern="2:4")(params)
    e_naive = out_err(w, RTN(bits=4, group_size=64, keep_mask="2:4")(wd)["fc"]["weight"]
                      .materialize(), x)
    assert e_joint < 1.25 * e_sp and e_joint < 0.5 * e_naive


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_gptq_and_rtn_keep_an_existing_mask(layer, pattern):
    w, x = layer
    params = {"fc": {"weight": jnp.asarray(w)}}
    stats = {"fc/weight": {"gram": jnp.asarray(x.T @ x)}}
    pruned = SparseGPT(pattern=None if pattern == "unstructured" else pattern)(
        params, stats=stats)
    zero = np.asarray(pruned["fc"]["weight"]) == 0
    for t in (GPTQ(bits=4, group_size=64, keep_mask=pattern),
              RTN(bits=4, group_size=64, keep_mask=pattern)):
        leaf = t(pruned, stats=stats)["fc"]["weight"]
        assert isinstance(leaf, NMSparse if pattern == "2:4" else Sparse)
        d = np.asarray(leaf.materialize())
        assert (d[zero] == 0).all()  # every pruned weight stays an exact zero
        if pattern == "2:4":
            assert _groups_ok(d, zero, 2, 4)
    # plain GPTQ refills pruned weights (what llm-compressor's 2:4 + W4 suffers from)
    plain = np.asarray(GPTQ(bits=4, group_size=64)(pruned, stats=stats)["fc"]["weight"]
                       .materialize())
    assert (plain[zero] != 0).mean() > 0.1
    # GPTQ with the mask compensates: better than RTN with the mask
    e_g = out_err(w, GPTQ(bits=4, group_size=64, keep_mask=pattern)(pruned, stats=stats)[
        "fc"]["weight"].materialize(), x)
    e_r = out_err(w, RTN(bits=4, group_size=64, keep_mask=pattern)(pruned)["fc"]["weight"]
                  .materialize(), x)
    assert e_g < e_r


def test_keep_mask_rejects_a_dense_weight(layer):
    w, _ = layer
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        RTN(bits=4, group_size=64, keep_mask="2:4")({"fc": {"weight": jnp.asarray(w)}})
