"""Sparse leaves: exact materialization, real nbytes, save/load, compressed execution, size
report, and a property test of the index packing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _ref import nm_keep
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxq
from jaxq.core import packing
from jaxq.core.sparse import NMSparse, Sparse, index_bits, to_sparse
from jaxq.eval.size import size_report
from jaxq.prune import SparseGPT


def _nm_weight(rng, shape, n, m):
    w = rng.normal(size=shape).astype(np.float32)
    keep = nm_keep(np.abs(w), n, m)
    return np.where(keep, w, 0.0), keep


@given(st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 8), (5, 16)]),
       st.sampled_from([1, 3]), st.sampled_from([1, 5, 12]), st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_nm_indices_round_trip(nm, rows, groups, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    w, keep = _nm_weight(rng, (rows, groups * m), n, m)
    leaf = to_sparse(jnp.asarray(w), jnp.asarray(keep), pattern=f"{n}:{m}")
    np.testing.assert_array_equal(np.asarray(leaf.materialize()), w)
    # the packed indices are the numpy bitstream of each kept value's position
    pos = np.stack([np.flatnonzero(g) for g in keep.reshape(-1, m)]).reshape(rows, -1)
    np.testing.assert_array_equal(np.asarray(leaf.indices),
                                  packing.pack_numpy(pos, index_bits(m)))


def test_nbytes_hand_count():
    rng = np.random.default_rng(0)
    w, keep = _nm_weight(rng, (10, 64), 2, 4)
    leaf = to_sparse(jnp.asarray(w), jnp.asarray(keep), pattern="2:4")
    # 32 float32 values per row + 32 two-bit indices = 2 uint32 words per row
    assert leaf.nbytes == 10 * (32 * 4 + 2 * 4)
    leaf8 = to_sparse(*(jnp.asarray(a) for a in _nm_weight(rng, (10, 64), 4, 8)),
                      pattern="4:8")
    # 32 values + 32 three-bit indices = 96 bits = 3 words per row
    assert leaf8.nbytes == 10 * (32 * 4 + 3 * 4)
    ws = np.where(rng.random((10, 70)) < 0.3, 0.0, rng.normal(size=(10, 70))).astype(np.float32)
    us = to_sparse(jnp.asarray(ws), jnp.asarray(ws != 0))
    assert isinstance(us, Sparse)
    assert us.nbytes == int((ws != 0).sum()) * 4 + 10 * 3 * 4  # values + ceil(70/32) words
    np.testing.assert_array_equal(np.asarray(us.materialize()), ws)


def test_quantized_nm_leaf_nbytes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 128)).astype(np.float32)
    w = rng.normal(size=(16, 128)).astype(np.float32)
    q = SparseGPT(pattern="2:4", bits=4, group_size=64, scale_dtype=jnp.float16)(
        {"w": jnp.asarray(w)}, stats={"w": {"gram": jnp.asarray(x.T @ x)}})["w"]
    # 64 kept 4-bit codes (8 words), 2 groups x (scale + bias) f16, 64 two-bit indices (4 words)
    assert q.nbytes == 16 * (8 * 4 + 2 * 2 * 2 + 4 * 4)
    assert q.bits_per_weight == pytest.approx(8 * 56 / 128)


@pytest.mark.parametrize("axis", [-1, -2])
def test_axis_and_save_load(tmp_path, axis):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(128, 32)).astype(np.float32)
    shape = (24, 32) if axis == -1 else (32, 24)
    params = {"a": {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)},
              "b": {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)},
              "c": {"w": jnp.asarray(rng.normal(size=shape), jnp.float32)}}
    stats = {f"{k}/w": {"gram": jnp.asarray(x.T @ x)} for k in "abc"}
    axes = {p: axis for p in stats}
    out = {
        "a": SparseGPT(pattern="2:4", storage="sparse")({"a": params["a"]}, stats=stats,
                                                         axes=axes)["a"],
        "b": SparseGPT(sparsity=0.5, storage="sparse")({"b": params["b"]}, stats=stats,
                                                        axes=axes)["b"],
        "c": SparseGPT(pattern="4:8", bits=4, group_size=16)({"c": params["c"]}, stats=stats,
                                                             axes=axes)["c"],
    }
    for k in "abc":
        assert out[k]["w"].shape == shape
        d = np.asarray(out[k]["w"].materialize())
        assert (d == 0).mean() >= 0.5
    jaxq.save(tmp_path / "m", out)
    back, _ = jaxq.load(tmp_path / "m")
    for k in "abc":
        assert type(back[k]["w"]) is type(out[k]["w"])
        np.testing.assert_array_equal(np.asarray(back[k]["w"].materialize()),
                                      np.asarray(out[k]["w"].materialize()))


def test_runs_in_apply_and_size_report():
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(16, 64)).astype(np.float32)
    w2 = rng.normal(size=(8, 16)).astype(np.float32)

    def apply_fn(p, x):
        return jnp.tanh(x @ p["l1"]["weight"].T) @ p["l2"]["weight"].T

    params = {"l1": {"weight": jnp.asarray(w1)}, "l2": {"weight": jnp.asarray(w2)}}
    batches = [jnp.asarray(rng.normal(size=(4, 64)), jnp.float32) for _ in range(3)]
    qp, _ = jaxq.calibrate(apply_fn, params, batches,
                           SparseGPT(pattern="2:4", storage="sparse"), progress=False)
    assert isinstance(qp["l1"]["weight"], NMSparse)
    dense = jaxq.materialize(qp)
    x = batches[0]
    np.testing.assert_allclose(np.asarray(jax.jit(jaxq.apply(apply_fn))(qp, x)),
                               np.asarray(apply_fn(dense, x)), rtol=1e-5, atol=1e-5)
    rep = size_report(qp)
    assert rep.by_kind["sparse"][1] == 16 * 64 + 8 * 16
    assert rep.by_kind["sparse"][0] == qp["l1"]["weight"].nbytes + qp["l2"]["weight"].nbytes


def test_chain_reaches_nm_values():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(128, 128)).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(8, 128)), jnp.float32)}
    stats = {"w": {"gram": jnp.asarray(x.T @ x)}}
    out = jaxq.chain(SparseGPT(pattern="2:4", storage="sparse"),
                     jaxq.RTN(bits=4, group_size=32))(params, stats=stats)["w"]
    assert isinstance(out, NMSparse) and isinstance(out.values, jaxq.QArray)
    d = np.asarray(out.materialize())
    assert ((d != 0).reshape(8, -1, 4).sum(-1) <= 2).all()
