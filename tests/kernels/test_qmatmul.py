"""qmatmul on CPU: Pallas kernels in interpret mode, the XLA fallback, repack and autotune cache.

Every kernel run pre-fills its output with NaN (``poison=True``) so an unwritten tile fails.
Shapes are odd on purpose (M = 1, 3, 17; K and N not multiples of the blocks) and small,
because interpret mode executes the grid step by step.
"""

from __future__ import annotations

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxq.core.formats import quantize
from jaxq.core.packing import pack_numpy, unpack
from jaxq.core.qarray import QArray
from jaxq.kernels import NF4_CODEBOOK, KernelConfig, autotune, qmatmul, qmatmul_xla, repack
from jaxq.kernels.pallas_gpu import paired, qmatmul_triton
from jaxq.kernels.pallas_tpu import qmatmul_mosaic
from jaxq.kernels.repack import slot_slabs, unpack_kernel_codes, unsupported_reason

qm = importlib.import_module("jaxq.kernels.qmatmul")  # the module, not the function

TOL = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}
K, N = 384, 72  # K: 1.5 chunks of int4; N: not a multiple of any block


def make_weight(n: int, k: int, bits: int, group, fmt: str = "affine", seed: int = 0,
                dtype=jnp.bfloat16, axis: int = -1) -> QArray:
    rng = np.random.default_rng(seed)
    if fmt == "nf4":
        g = k if group == "channel" else group
        codes = rng.integers(0, 16, (n, k)).astype(np.uint32)
        absmax = rng.uniform(0.5, 2.0, (n, k // g))
        return QArray(packed=jnp.asarray(pack_numpy(codes, 4)), scales=jnp.asarray(absmax, dtype),
                      biases=None, bits=4, group_size=g, size=k, dtype=dtype, fmt="nf4")
    w = rng.standard_normal((n, k) if axis == -1 else (k, n)).astype(np.float32)
    return quantize(jnp.asarray(w, dtype), bits=bits, group_size=group, axis=axis)


def reference(x: jax.Array, w: QArray) -> np.ndarray:
    """float64 numpy: decode the canonical codes independently of the kernels' code paths."""
    codes = np.asarray(unpack(w.packed, w.bits, w.size), np.float64)
    n = codes.shape[0]
    grouped = codes.reshape(n, w.n_groups, w.group_size)
    s = np.asarray(w.scales.astype(jnp.float32), np.float64)[..., None]
    if w.fmt == "nf4":
        wd = NF4_CODEBOOK.astype(np.float64)[grouped.astype(np.int64)] * s
    else:
        wd = grouped * s + np.asarray(w.biases.astype(jnp.float32), np.float64)[..., None]
    return np.asarray(x.astype(jnp.float32), np.float64) @ wd.reshape(n, w.size).T


def rel_err(y: jax.Array, ref: np.ndarray) -> float:
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert y.shape == ref.shape
    assert np.isfinite(y).all(), "non-finite output: a tile was left unwritten (poison)"
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def inputs(m: int, k: int, dtype, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


def run_triton(x, w, **cfg):
    cfg = KernelConfig(**{"bm": 16, "bn": 64, **cfg})
    return qmatmul_triton(x, repack(w), cfg, interpret=True, poison=True)


# --- Triton kernel (interpret) -----------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [
    (4, 32), (4, 64), (4, 128), (4, "channel"), (8, 32), (8, 128), (8, "channel"), (2, 64)])
def test_triton_bits_and_groups(bits, group):
    w = make_weight(N, K, bits, group)
    x = inputs(3, K, jnp.bfloat16)
    assert rel_err(run_triton(x, w), reference(x, w)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_triton_activation_dtypes(dtype):
    w = make_weight(N, K, 4, 128)
    x = inputs(3, K, dtype)
    y = run_triton(x, w)
    assert y.dtype == dtype
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("bits,group,dtype,pairs", [
    (4, 128, jnp.bfloat16, True), (4, "channel", jnp.bfloat16, True), (2, 64, jnp.float16, True),
    (8, "channel", jnp.float16, True), (4, 32, jnp.bfloat16, False), (8, 128, jnp.bfloat16, False),
    (4, 128, jnp.float32, False)])
def test_triton_paired_decode(bits, group, dtype, pairs):
    """Two codes per 32-bit operand register where they fit a 16-bit mantissa and a pair stays
    inside one scale group (g32 is one slab); the other cases decode slab by slab."""
    w = make_weight(N, K, bits, group)
    p = repack(w)
    assert paired(p.meta, dtype) is pairs
    x = inputs(5, K, dtype)
    for cfg in (KernelConfig(bm=16, bn=64), KernelConfig(bm=16, bn=64, pairs=False),
                KernelConfig(bm=16, bn=64, scale_first=True),
                KernelConfig(bm=16, bn=64, pairs=False, scale_first=True)):
        y = qmatmul_triton(x, p, cfg, interpret=True, poison=True)
        assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("fmt,bits,group,dtype", [
    ("affine", 4, 128, jnp.bfloat16), ("affine", 8, "channel", jnp.float16),
    ("affine", 2, 64, jnp.float32), ("nf4", 4, 64, jnp.bfloat16)])
def test_triton_scale_first(fmt, bits, group, dtype):
    """``scale_first``: the operand is dequantized (scale and bias) before its dot, so the dots
    accumulate straight into the tile and no group sums of x are read."""
    w = make_weight(N, K, bits, group, fmt=fmt)
    x = inputs(33, K, dtype)
    y = run_triton(x, w, bm=32, bn=64, scale_first=True)
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("m,bits,group,dtype", [(17, 4, 128, jnp.bfloat16),
                                                 (1, 8, "channel", jnp.float32)])
def test_triton_sums_splits_in_kernel(m, bits, group, dtype):
    """reduce_inside on the tensor-core grid: one ticket counter per (column, row) tile; with
    M = 17 the second row tile is ragged."""
    w = make_weight(N, 1024, bits, group)
    x = inputs(m, 1024, dtype)
    y = run_triton(x, w, split_k=4, reduce_inside=True)
    assert y.shape == (m, N) and y.dtype == dtype
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 17])
def test_triton_odd_m(m):
    w = make_weight(N, K, 4, 64)
    x = inputs(m, K, jnp.bfloat16)
    assert rel_err(run_triton(x, w), reference(x, w)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_nf4(dtype):
    w = make_weight(N, K, 4, 64, fmt="nf4")
    x = inputs(3, K, dtype)
    assert rel_err(run_triton(x, w), reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("cfg", [dict(split_k=2), dict(unroll=2), dict(bm=32, bn=32),
                                 dict(split_k=2, reduce_inside=True),
                                 dict(bm=32, bn=32, split_k=2, reduce_inside=True)])
def test_triton_block_variants(cfg):
    w = make_weight(40, 512, 4, 64)  # N=40 < 128: padded to 64, partial last tile
    x = inputs(3, 512, jnp.bfloat16)
    assert rel_err(run_triton(x, w, **cfg), reference(x, w)) < TOL[jnp.bfloat16]


def test_triton_flax_kernel_axis():
    """A (K, N) kernel quantized along axis=-2 is stored as rows of N: same kernel path."""
    w = make_weight(N, K, 4, 128, axis=-2)
    assert w.shape == (K, N)
    x = inputs(3, K, jnp.bfloat16)
    assert rel_err(run_triton(x, w), reference(x, w)) < TOL[jnp.bfloat16]


def test_dispatch_interpret_leading_dims():
    w = make_weight(N, K, 4, 128)
    x = inputs(6, K, jnp.bfloat16).reshape(2, 3, K)
    y = qmatmul(x, w, backend="triton", interpret=True)
    assert y.shape == (2, 3, N)
    assert rel_err(y.reshape(6, N), reference(x.reshape(6, K), w)) < TOL[jnp.bfloat16]


# --- Mosaic kernel (interpret) -----------------------------------------------------------------

@pytest.mark.parametrize("bits,group,fmt,dtype", [
    (4, 128, "affine", jnp.bfloat16), (8, "channel", "affine", jnp.float32),
    (4, 64, "nf4", jnp.bfloat16)])
def test_mosaic_interpret(bits, group, fmt, dtype):
    w = make_weight(N, K, bits, group, fmt=fmt)
    x = inputs(3, K, dtype)
    y = qmatmul_mosaic(x, repack(w, "mosaic"), KernelConfig(bm=8, bn=128), interpret=True,
                       poison=True)
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("kind", ["TPU v5 lite", "TPU v6 lite"])
@pytest.mark.parametrize("bits,group,fmt,dtype", [
    (4, 128, "affine", jnp.bfloat16), (8, "channel", "affine", jnp.float32),
    (4, 64, "nf4", jnp.bfloat16)])
def test_mosaic_lowers_for_tpu(kind, bits, group, fmt, dtype):
    """Pallas's Mosaic lowering runs for a TPU chip described by an abstract device, so block
    shapes and ops the TPU lowering rejects fail here, without a TPU. (Mosaic's own compile,
    on a TPU host, is not exercised.)"""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    w = repack(make_weight(256, 1024, bits, group, fmt=fmt), "mosaic")
    f = jax.jit(lambda x, p: qmatmul_mosaic(x, p, KernelConfig(bm=8, bn=128)))
    tpu = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind=kind, num_cores=1, platform="tpu"))
    with use_abstract_mesh(tpu):
        text = f.trace(jnp.ones((8, 1024), dtype), w).lower(
            lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


# --- XLA fallback, repack, dispatch ------------------------------------------------------------

@pytest.mark.parametrize("bits,group,fmt", [
    (4, 128, "affine"), (8, "channel", "affine"), (3, 64, "affine"), (4, 64, "nf4")])
def test_xla_fallback(bits, group, fmt):
    w = make_weight(N, K, bits, group, fmt=fmt)
    x = inputs(3, K, jnp.bfloat16)
    assert rel_err(qmatmul_xla(x, w), reference(x, w)) < TOL[jnp.bfloat16]
    assert rel_err(qmatmul_xla(x, repack(w)) if bits != 3 else qmatmul(x, w, backend="triton"),
                   reference(x, w)) < TOL[jnp.bfloat16]


def test_cpu_default_is_xla_and_3bit_falls_back():
    w = make_weight(N, K, 3, 64)
    assert unsupported_reason(w) is not None
    x = inputs(3, K, jnp.float32)
    np.testing.assert_allclose(np.asarray(qmatmul(x, w)), np.asarray(qmatmul_xla(x, w)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_repack_roundtrip(bits):
    w = make_weight(N, K, bits, 64)
    p = repack(w)
    codes = np.asarray(unpack_kernel_codes(p))[:K, :N].T
    np.testing.assert_array_equal(codes, np.asarray(w.codes()))
    assert p.packed.shape[0] * 32 // bits % p.chunk == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_slot_order_puts_neighbouring_slabs_16_bits_apart(bits):
    per_word = 32 // bits
    order = slot_slabs(bits, "triton")
    assert sorted(order) == list(range(per_word))
    for j in range(per_word // 2):  # slot j + P/2 sits 16 bits above slot j
        assert (order[j], order[j + per_word // 2]) == (2 * j, 2 * j + 1)
    assert slot_slabs(bits, "mosaic") == tuple(range(per_word))


@pytest.mark.parametrize("bits,layout", [(2, "triton"), (4, "triton"), (8, "triton"),
                                         (4, "mosaic")])
def test_repack_layout_by_definition(bits, layout):
    """Bit-slot j of word row c*R + r holds the code of k = c*C + σ(j)*R + r (numpy, without
    unpack_kernel_codes)."""
    k = 512 if layout == "triton" else 2048
    w = make_weight(N, k, bits, "channel")
    p = repack(w, layout)
    per_word, rows = 32 // bits, p.rows
    words = np.asarray(p.packed).reshape(-1, rows, p.n_padded)  # [chunks, R, Np]
    codes = np.zeros((p.k_padded, p.n_padded), np.uint32)
    codes[:k, :N] = np.asarray(w.codes()).T
    codes = codes.reshape(-1, per_word, rows, p.n_padded)  # [chunks, slab, R, Np]
    for j, slab in enumerate(slot_slabs(bits, layout)):
        np.testing.assert_array_equal((words >> (j * bits)) & ((1 << bits) - 1),
                                      codes[:, slab], err_msg=f"slot {j}")


@st.composite
def repackable(draw):
    """A QArray the kernels take: any kernel bit width, a group that tiles the layout's chunks
    (or per channel), ragged K and N, either layout."""
    bits = draw(st.sampled_from([2, 4, 8]))
    layout = draw(st.sampled_from(["triton", "mosaic"]))
    group = draw(st.sampled_from([32, 64, 128, "channel"] if layout == "triton"
                                 else [128, "channel"]))
    g = 128 if group == "channel" else group
    k = g * draw(st.integers(1, 6))
    n = draw(st.integers(1, 70))
    return make_weight(n, k, bits, group, seed=draw(st.integers(0, 2**16))), layout


@settings(max_examples=15, deadline=None)
@given(repackable())
def test_repack_property(case):
    """For any weight the kernels take: every code lands where the layout's definition puts
    it (σ for Triton), the unpacker inverts the repack, and the kernel-layout weight
    dequantizes to the QArray's float tensor."""
    w, layout = case
    assert unsupported_reason(w, layout) is None
    p = repack(w, layout)
    n, k = w.shape
    per_word = 32 // w.bits
    codes = np.zeros((p.k_padded, p.n_padded), np.uint32)
    codes[:k, :n] = np.asarray(w.codes()).T
    by_slab = codes.reshape(-1, per_word, p.rows, p.n_padded)
    words = np.asarray(p.packed).reshape(-1, p.rows, p.n_padded)
    for j, slab in enumerate(slot_slabs(w.bits, layout)):
        np.testing.assert_array_equal((words >> (j * w.bits)) & ((1 << w.bits) - 1),
                                      by_slab[:, slab])
    np.testing.assert_array_equal(np.asarray(unpack_kernel_codes(p)), codes)
    np.testing.assert_allclose(np.asarray(p.dequantize(jnp.float32)),
                               np.asarray(w.dequantize(jnp.float32)), rtol=1e-6, atol=1e-6)


def test_repack_jits_and_is_a_pytree():
    w = make_weight(N, K, 4, 128)
    p = jax.jit(repack)(w)
    leaves, tree = jax.tree.flatten(p)
    assert len(leaves) == 3 and jax.tree.unflatten(tree, leaves).meta == p.meta


# --- autotune cache ------------------------------------------------------------------------------

def test_autotune_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "_MEMORY", None)
    key = autotune.make_key(m=3, k=K, n=N, bits=4, group_size=128, fmt="affine",
                            dtype=jnp.bfloat16, backend="triton", kind="test-device")
    assert "m4" in key and "test-device" in key
    times = {KernelConfig(bn=32): 5.0, KernelConfig(bn=64): 2.0, KernelConfig(bn=128): 9.0}

    def bench(cfg):
        if cfg.bn == 128:
            raise RuntimeError("does not compile")
        return times[cfg]

    best = autotune.tune(key, list(times), bench)
    assert best.bn == 64
    data = json.loads((tmp_path / "autotune.json").read_text())
    assert data[key]["config"]["bn"] == 64
    monkeypatch.setattr(autotune, "_MEMORY", None)  # a fresh process reads the file
    assert autotune.lookup(key) == best


def test_config_labels_tell_configs_apart():
    """Tables and logs name each candidate by ``label()``: distinct configs, distinct labels."""
    configs = [KernelConfig(impl="gemv", bn=64, split_k=8, reduce_inside=True, xsum_inside=True),
               KernelConfig(impl="gemv", bn=64, split_k=8, reduce_inside=True),
               KernelConfig(impl="gemv", bn=64, split_k=8), KernelConfig(impl="gemv", bn=64),
               KernelConfig(impl="gemv", bn=64, xsum_inside=True),
               KernelConfig(impl="gemv", bn=64, split_k=4, unroll=2),
               KernelConfig(bm=128, bn=128, num_warps=8, num_stages=2),
               KernelConfig(bm=128, bn=128, num_warps=8, num_stages=2, scale_first=True),
               KernelConfig(bm=16, bn=64, split_k=4, pairs=False),
               KernelConfig(bm=16, bn=64, split_k=4), KernelConfig(impl="dequant"),
               KernelConfig(impl="dequant", bn=128, num_warps=8),
               KernelConfig(impl="dequant", bn=128, num_warps=8, unroll=2, num_stages=1)]
    labels = [c.label() for c in configs]
    assert len(set(labels)) == len(labels), labels
    assert labels[0] == "gemv 64 sk8 sum-in/x-in w4s3"
    assert labels[7] == "128x128 scale-first w8s2" and labels[-1] == "dequant 128 u2 w8s1"


# --- GEMV kernel for decode-sized M (interpret) --------------------------------------------------

def run_gemv(x, w, **cfg):
    from jaxq.kernels.pallas_gemv import qmatmul_gemv

    cfg = KernelConfig(**{"impl": "gemv", "bn": 64, **cfg})
    return qmatmul_gemv(x, repack(w), cfg, interpret=True, poison=True)


@pytest.mark.parametrize("bits,group,fmt", [
    (4, 128, "affine"), (4, 32, "affine"), (4, "channel", "affine"), (8, 64, "affine"),
    (2, 64, "affine"), (4, 64, "nf4")])
def test_gemv_formats(bits, group, fmt):
    w = make_weight(N, K, bits, group, fmt=fmt)
    x = inputs(1, K, jnp.bfloat16)
    assert rel_err(run_gemv(x, w), reference(x, w)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("m,dtype", [(1, jnp.float32), (3, jnp.bfloat16), (8, jnp.float16)])
def test_gemv_rows_and_dtypes(m, dtype):
    w = make_weight(N, K, 4, 128)
    x = inputs(m, K, dtype)
    y = run_gemv(x, w)
    assert y.dtype == dtype and y.shape == (m, N)
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("cfg", [dict(split_k=2), dict(unroll=2), dict(bn=32, split_k=4),
                                 dict(bn=16), dict(split_k=4, reduce_inside=True),
                                 dict(bn=32, split_k=2, reduce_inside=True, xsum_inside=True)])
def test_gemv_block_variants(cfg):
    w = make_weight(40, 1024, 4, 128)  # N=40: padded to 64, partial tile; 4 chunks of K
    x = inputs(2, 1024, jnp.bfloat16)
    assert rel_err(run_gemv(x, w, **cfg), reference(x, w)) < TOL[jnp.bfloat16]


@pytest.mark.parametrize("m,bits,group,dtype", [(1, 4, 128, jnp.bfloat16),
                                                 (3, 8, "channel", jnp.float16),
                                                 (8, 4, 64, jnp.float32)])
def test_gemv_sums_splits_in_kernel(m, bits, group, dtype):
    """reduce_inside: the last of the split programs of a column tile writes y (every tile,
    under the NaN poison); the partials and tickets it used are outputs as well."""
    from jaxq.kernels.pallas_gemv import qmatmul_gemv

    w = make_weight(40, 1024, bits, group)
    p = repack(w)
    x = inputs(m, 1024, dtype)
    cfg = KernelConfig(impl="gemv", bn=32, split_k=p.k_padded // p.chunk, reduce_inside=True)
    fn = jax.jit(lambda x, p: qmatmul_gemv(x, p, cfg, interpret=True, poison=True))
    assert cfg.split_k > 1
    y = fn(x, p)
    assert y.shape == (m, 40) and y.dtype == dtype
    assert rel_err(y, reference(x, w)) < TOL[dtype]


def test_tuner_rejects_a_config_that_disagrees_with_xla(monkeypatch, caplog):
    """The tuner times only candidates whose output matches XLA's: a faster wrong one (here a
    kernel whose output is 5% off, and one returning NaN) is skipped. It says what it tunes
    and what it chose (logger ``jaxq.kernels.autotune``, INFO)."""

    w = make_weight(40, 1024, 4, 128)
    p = repack(w)
    x = inputs(1, 1024, jnp.bfloat16)
    want = qmatmul_xla(x, p)
    good = KernelConfig(impl="gemv", bn=32, split_k=2, reduce_inside=True)
    qm.check_config_output(good, run_gemv(x, w, bn=32, split_k=2, reduce_inside=True), want)
    with pytest.raises(ValueError, match="disagrees with the XLA path"):
        qm.check_config_output(good, want * 1.05, want)
    with pytest.raises(ValueError, match="disagrees"):
        qm.check_config_output(good, jnp.full_like(want, jnp.nan), want)
    x32 = inputs(1, 1024, jnp.float32)  # f32 output: the bound is a few f32 roundings
    want32 = qmatmul_xla(x32, p)
    qm.check_config_output(good, run_gemv(x32, w, bn=32, split_k=2, reduce_inside=True), want32)
    with pytest.raises(ValueError, match="disagrees"):
        qm.check_config_output(good, want32 * 1.001, want32)

    wrong = {KernelConfig(impl="gemv", bn=16): 1.05, KernelConfig(impl="gemv", bn=64): jnp.nan}
    cands = [KernelConfig(impl="gemv", bn=32), *wrong]
    monkeypatch.setattr(qm, "candidate_configs", lambda m, p: cands)
    monkeypatch.setattr(qm, "_run", lambda x, q, cfg, backend, interpret: (
        qmatmul_xla(x, q) * wrong.get(cfg, 1.0)))
    times = iter([9.0, 1.0, 0.5])  # each later candidate would be faster, were it timed
    monkeypatch.setattr(autotune, "time_call", lambda fn, launches: next(times))
    monkeypatch.setattr(autotune, "store", lambda *a, **k: None)
    with caplog.at_level("INFO", logger="jaxq.kernels.autotune"):
        assert qm._tune("test-key", x.shape, x.dtype, p, "triton") == cands[0]
    start, done = (r.getMessage() for r in caplog.records)
    assert start.startswith("tuning test-key: 3 candidates")
    assert "µs with gemv 32 w4s3 (1 of 3 candidates ran)" in done


@st.composite
def kernel_problem(draw):
    """A weight, an x and a valid config of either GPU kernel, with the options this layout
    and these kernels combine: paired or slab-by-slab decode, split-K summed by XLA or
    in-kernel, group sums of x in-kernel or not, several chunks per step."""
    bits = draw(st.sampled_from([2, 4, 8]))
    group = draw(st.sampled_from([32, 64, 128, "channel"]))
    k = 128 * draw(st.integers(1, 5))
    n = draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([jnp.bfloat16, jnp.float16, jnp.float32]))
    w = make_weight(n, k, bits, group, seed=draw(st.integers(0, 2**16)))
    p = repack(w)
    chunks = p.k_padded // p.chunk
    bns = [b for b in (16, 32, 64) if p.n_padded % b == 0]
    split = draw(st.sampled_from([s for s in (1, 2, 3, 4) if chunks % s == 0]))
    unroll = draw(st.sampled_from([u for u in (1, 2) if chunks % (split * u) == 0]))
    common = dict(split_k=split, unroll=unroll, reduce_inside=draw(st.booleans()))
    if draw(st.booleans()):
        m = draw(st.integers(1, 8))
        cfg = KernelConfig(impl="gemv", bn=draw(st.sampled_from(bns)),
                           xsum_inside=draw(st.booleans()), **common)
    else:
        m = draw(st.integers(1, 20))
        cfg = KernelConfig(bm=draw(st.sampled_from([16, 32])),
                           bn=draw(st.sampled_from(bns)), pairs=draw(st.booleans()),
                           scale_first=draw(st.booleans()), **common)
    return w, inputs(m, k, dtype, seed=draw(st.integers(0, 2**16))), cfg


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel_problem())
def test_kernels_property(problem):
    """Any valid combination of the kernels' options matches the float64 reference, with
    every output tile written (NaN poison)."""
    from jaxq.kernels.pallas_gemv import qmatmul_gemv

    w, x, cfg = problem
    kernel = qmatmul_gemv if cfg.impl == "gemv" else qmatmul_triton
    y = kernel(x, repack(w), cfg, interpret=True, poison=True)
    assert y.dtype == x.dtype
    assert rel_err(y, reference(x, w)) < TOL[jnp.dtype(x.dtype).type]


def test_gemv_rejects_large_m_and_dispatch_picks_it():
    from jaxq.kernels.pallas_gemv import MAX_GEMV_M, check_gemv_config
    from jaxq.kernels.qmatmul import candidate_configs, heuristic_config

    p = repack(make_weight(N, K, 4, 128))
    assert check_gemv_config(p, KernelConfig(impl="gemv"), MAX_GEMV_M + 1) is not None
    assert heuristic_config(1, p).impl == "gemv"
    assert all(c.impl != "gemv" for c in candidate_configs(16, p))
    x = inputs(1, K, jnp.bfloat16)
    y = qmatmul(x, p, backend="triton", interpret=True)
    assert rel_err(y, reference(x, make_weight(N, K, 4, 128))) < TOL[jnp.bfloat16]


def _gpu_kernels():
    from jaxq.kernels.pallas_dequant import dequantize_pallas
    from jaxq.kernels.pallas_gemv import qmatmul_gemv

    return {
        "gemv m=1": (1, lambda x, p: qmatmul_gemv(x, p, KernelConfig(
            impl="gemv", bn=128, split_k=2, unroll=2))),
        "gemv m=3": (3, lambda x, p: qmatmul_gemv(x, p, KernelConfig(impl="gemv", bn=64))),
        "gemv sum-in": (1, lambda x, p: qmatmul_gemv(x, p, KernelConfig(
            impl="gemv", bn=64, split_k=4, xsum_inside=True, reduce_inside=True))),
        "tiled": (16, lambda x, p: qmatmul_triton(x, p, KernelConfig(bm=16, bn=64))),
        "tiled split-k": (32, lambda x, p: qmatmul_triton(x, p, KernelConfig(
            bm=32, bn=32, split_k=2))),
        "tiled sum-in": (16, lambda x, p: qmatmul_triton(x, p, KernelConfig(
            bm=16, bn=64, split_k=4, reduce_inside=True))),
        "tiled scale-first": (64, lambda x, p: qmatmul_triton(x, p, KernelConfig(
            bm=64, bn=128, scale_first=True))),
        "tiled widest": (256, lambda x, p: qmatmul_triton(x, p, KernelConfig(
            bm=128, bn=256, num_warps=8, num_stages=2, scale_first=True))),
        "dequant": (64, lambda x, p: x @ dequantize_pallas(p, x.dtype)),
    }


@pytest.mark.parametrize("kernel", ["gemv m=1", "gemv m=3", "gemv sum-in", "tiled",
                                    "tiled split-k", "tiled sum-in", "tiled scale-first",
                                    "tiled widest", "dequant"])
@pytest.mark.parametrize("bits,group,fmt", [(4, 128, "affine"), (8, "channel", "affine"),
                                            (4, 64, "nf4")])
def test_gpu_kernels_lower_for_cuda(kernel, bits, group, fmt):
    """The Triton lowering runs without a GPU: catches unsupported ops and block shapes before
    a device run."""
    m, fn = _gpu_kernels()[kernel]
    p = repack(make_weight(256, 1024, bits, group, fmt=fmt))
    try:
        text = jax.jit(fn).trace(jnp.ones((m, 1024), jnp.bfloat16), p).lower(
            lowering_platforms=("cuda",)).as_text()
    except (ValueError, NotImplementedError, RuntimeError) as e:
        if "platform" in str(e).lower() or "cuda" in str(e).lower():
            pytest.skip(f"no CUDA lowering here: {e}")
        raise
    assert "triton" in text.lower()


@pytest.mark.parametrize("k,group,m,dtype", [
    (576, 64, 1, jnp.bfloat16), (576, 64, 3, jnp.float16), (384, 128, 2, jnp.float32)])
def test_gemv_single_launch_ragged_k(k, group, m, dtype):
    """xsum_inside: x read unpadded (K=576 is 2.25 chunks), group sums formed in-kernel."""
    w = make_weight(N, k, 4, group)
    x = inputs(m, k, dtype)
    y = run_gemv(x, w, xsum_inside=True)
    assert y.dtype == dtype
    assert rel_err(y, reference(x, w)) < TOL[dtype]


@pytest.mark.parametrize("bits,group,fmt", [(4, 64, "affine"), (8, 128, "affine"),
                                            (2, "channel", "affine"), (4, 128, "nf4")])
def test_gemv_inside_and_outside_agree(bits, group, fmt):
    """Both placements of Σx, every bit width, and the fast int4 slot plan for f16 vs f32."""
    w = make_weight(N, K, bits, group, fmt=fmt)
    for dtype in (jnp.float16, jnp.float32):
        x = inputs(2, K, dtype)
        ref = reference(x, w)
        for inside in (True, False):
            assert rel_err(run_gemv(x, w, xsum_inside=inside, unroll=1), ref) < TOL[dtype]


def test_slot_plan_places_every_code():
    """Each slot's code lands whole inside the mantissa, and c_s * 2**(p - 23) = 1 / L."""
    from jaxq.kernels.pallas_gemv import slot_plan

    for bits in (2, 4, 8):
        for fast in (False, True):
            plan, lift, cs = slot_plan(bits, fast)
            assert len(plan) == 32 // bits
            for s, ((d, pos), c) in enumerate(zip(plan, cs)):
                assert s * bits + d == pos and 0 <= pos and pos + bits <= 23
                assert c * 2.0 ** (pos - 23) == 1 / lift


@pytest.mark.parametrize("bits,group,fmt,dtype", [
    (4, 128, "affine", jnp.bfloat16), (4, "channel", "affine", jnp.float32),
    (8, 64, "affine", jnp.float16), (2, 64, "affine", jnp.bfloat16), (4, 64, "nf4", jnp.bfloat16)])
def test_dequant_kernel_then_dot(bits, group, fmt, dtype):
    """Large-M path: the Pallas dequantize kernel (interpret) + dot, K and N padded."""
    from jaxq.kernels.pallas_dequant import dequantize_pallas
    from jaxq.kernels.qmatmul import dequant_matmul

    w = make_weight(N, K, bits, group, fmt=fmt)
    p = repack(w)
    x = inputs(17, K, dtype)
    y = dequant_matmul(x, p, "triton", KernelConfig(impl="dequant", bn=32), interpret=True)
    assert y.dtype == dtype and rel_err(y, reference(x, w)) < TOL[dtype]
    wd = dequantize_pallas(p, jnp.float32, KernelConfig(impl="dequant", bn=16, unroll=1),
                           interpret=True)
    codes_ref = np.asarray(qmatmul_xla(jnp.eye(K, dtype=jnp.float32), w))  # W^T, [K, N]
    np.testing.assert_allclose(np.asarray(wd)[:K, :N], codes_ref, rtol=1e-6, atol=1e-6)


def test_environment_choices_are_checked(monkeypatch):
    """A misspelt JAXQ_TINY or JAXQ_AUTOTUNE is an error, not the opposite of what was meant."""
    p = repack(make_weight(N, K, 4, 128))
    monkeypatch.setenv("JAXQ_TINY", "off")
    with pytest.raises(ValueError, match="JAXQ_TINY='off': expected one of xla, gemv"):
        qm.tiny_config(p)
    monkeypatch.setenv("JAXQ_AUTOTUNE", "false")
    with pytest.raises(ValueError, match="JAXQ_AUTOTUNE='false'"):
        qmatmul(inputs(16, K, jnp.bfloat16), p, backend="triton")


def test_sm_count_reads_the_device(monkeypatch):
    """The SM count comes from the device's ``core_count`` (an H100's where it has none), and
    tuning keys name it: a MIG slice of an H100 does not reuse a whole H100's choices."""
    class H100:
        device_kind = "NVIDIA H100 80GB HBM3"
        core_count = 132

    class Slice(H100):
        core_count = 16

    class NoCount:
        device_kind = "cpu"

    keys = set()
    for device, want in ((H100(), 132), (Slice(), 16), (NoCount(), autotune.H100_SMS)):
        autotune.sm_count.cache_clear()
        monkeypatch.setattr(autotune.jax, "devices", lambda device=device: [device])
        assert autotune.sm_count() == want
        keys.add(autotune.make_key(m=1, k=K, n=N, bits=4, group_size=128, fmt="affine",
                                   dtype=jnp.bfloat16, backend="triton"))
    autotune.sm_count.cache_clear()
    assert len(keys) == 3 and any("H100 80GB HBM3 (16 SMs)" in k for k in keys)


def test_dispatch_large_m_and_tiny_layers(monkeypatch):
    """Untuned dispatch: dequantize + GEMM for large M; tiny decode layers go to XLA (or to
    the single-launch GEMV with JAXQ_TINY=gemv, K split to fill the SMs, partials summed
    in-kernel)."""
    from jaxq.kernels.qmatmul import heuristic_config, is_tiny, tiny_config

    p = repack(make_weight(N, K, 4, 128))
    assert heuristic_config(300, p).impl == "dequant"
    assert is_tiny(1, p) and not is_tiny(16, p)
    fused_gate_up = repack(make_weight(3072, 576, 4, 64))  # SmolLM2's, fused: still tiny
    assert is_tiny(1, fused_gate_up) and not is_tiny(1, repack(make_weight(1024, 4096, 4, 128)))
    monkeypatch.delenv("JAXQ_TINY", raising=False)
    assert tiny_config(p).impl == "xla"
    monkeypatch.setenv("JAXQ_TINY", "gemv")
    cfg = tiny_config(p)  # K=384: 2 chunks of int4, N=72: 3 tiles of 32
    assert cfg.impl == "gemv" and cfg.split_k == 2 and cfg.xsum_inside and cfg.reduce_inside
    big = repack(make_weight(1536, 576 * 4, 4, 128))  # 48 tiles, 9 chunks: 3 splits fill 132
    assert tiny_config(big).split_k == 3
    monkeypatch.setattr(autotune, "sm_count", lambda: 48)  # a smaller GPU: 1 split fills it
    assert tiny_config(big).split_k == 1
    x = inputs(1, K, jnp.bfloat16)
    w = make_weight(N, K, 4, 128)
    for block in (cfg, KernelConfig(impl="xla")):
        y = qmatmul(x, p, backend="triton", block=block, interpret=True)
        assert rel_err(y, reference(x, w)) < TOL[jnp.bfloat16]
    x = inputs(100, K, jnp.bfloat16)
    y = qmatmul(x, p, backend="triton", interpret=True)  # heuristic: Pallas dequant + dot
    assert rel_err(y, reference(x, w)) < TOL[jnp.bfloat16]
