"""The Mosaic GPU (Hopper) kernel on CPU: GPU interpret mode against float64, and its lowering.

Interpret mode starts every buffer as NaN, so an output tile the grid never writes fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tinyllama import tiny_llama

import jaxq
from jaxq.kernels import prepare, qmatmul
from jaxq.kernels.pallas_mosaic_gpu import (
    MosaicGPUWeight,
    qmatmul_mosaic_gpu,
    repack_mosaic_gpu,
    unsupported_reason,
)
from jaxq.models import llama

from .test_qmatmul import TOL, inputs, make_weight, reference, rel_err


@pytest.mark.parametrize("bits,group,dtype,m", [
    (4, 128, jnp.bfloat16, 1), (4, 64, jnp.bfloat16, 17), (4, "channel", jnp.float16, 3),
    (8, 128, jnp.float16, 70), (8, 64, jnp.bfloat16, 2)])
def test_mosaic_gpu_matches_float64(bits, group, dtype, m):
    """N = 100 (padded to 128 rows), K = 320 (five g64 steps; per channel padded to 384)."""
    k = 320 if group != 128 else 384
    w = make_weight(100, k, bits, group, dtype=dtype)
    x = inputs(m, k, dtype)
    y = qmatmul_mosaic_gpu(x, repack_mosaic_gpu(w), interpret=True)
    assert y.shape == (m, 100) and y.dtype == dtype
    assert rel_err(y, reference(x, w)) < TOL[dtype]


def test_repack_is_an_exact_relabelling():
    """Signed codes plus the shifted bias decode to exactly the QArray's weights."""
    for bits, group in ((4, 64), (8, "channel")):
        w = make_weight(70, 256, bits, group)
        p = repack_mosaic_gpu(w)
        assert p.codes.dtype == (jnp.int4 if bits == 4 else jnp.int8)
        assert p.codes.shape == (128, 256) and p.scales.shape[1] == 128
        np.testing.assert_allclose(np.asarray(p.dequantize(jnp.float32)),
                                   np.asarray(w.dequantize(jnp.float32)), rtol=1e-6, atol=1e-6)
        assert p.scales.dtype == w.scales.dtype and p.biases.dtype == w.biases.dtype
        scale_bytes = 2 * p.scales.size * p.scales.dtype.itemsize
        assert p.nbytes == 128 * 256 * bits // 8 + scale_bytes  # int4: half a byte


def test_k_not_a_whole_number_of_words():
    """Per channel, K = 100 ends mid-word (4-bit: 12.5 words a row): the repack drops the last
    word's unused codes instead of failing to reshape."""
    w = make_weight(10, 100, 4, "channel")
    p = repack_mosaic_gpu(w)
    np.testing.assert_allclose(np.asarray(p.dequantize(jnp.float32)),
                               np.asarray(w.dequantize(jnp.float32)), rtol=1e-6, atol=1e-6)
    x = inputs(3, 100, jnp.bfloat16)
    assert rel_err(qmatmul(x, w, backend="mosaic_gpu", interpret=True),
                   reference(x, w)) < TOL[jnp.bfloat16]


def test_what_it_takes_and_the_dispatch():
    assert unsupported_reason(make_weight(8, 128, 2, 64)) is not None
    assert unsupported_reason(make_weight(8, 128, 4, 32)) is not None
    assert unsupported_reason(make_weight(8, 128, 4, 64, fmt="nf4")) is not None
    w = make_weight(100, 256, 4, 128)
    x = inputs(5, 256, jnp.bfloat16)
    y = qmatmul(x, w, backend="mosaic_gpu", interpret=True)  # QArray: cached repack
    assert rel_err(y, reference(x, w)) < TOL[jnp.bfloat16]
    x32 = inputs(5, 256, jnp.float32)  # f32 activations: XLA on the dequantized weight
    y32 = qmatmul(x32, repack_mosaic_gpu(w), backend="mosaic_gpu")
    assert rel_err(y32, reference(x32, w)) < TOL[jnp.float32]
    odd = make_weight(100, 256, 3, 128)  # no kernel: XLA
    assert rel_err(qmatmul(x, odd, backend="mosaic_gpu"), reference(x, odd)) < 1e-2
    with pytest.raises(ValueError, match="bm must be"):
        qmatmul_mosaic_gpu(x, repack_mosaic_gpu(w), bm=32, interpret=True)


def test_prepared_model_runs_through_compressed_execution():
    """prepare(backend="mosaic_gpu") then jaxq.apply: same logits as the QArray path (the
    matmuls through XLA here: on this host the weights' kernel cannot run outside interpret
    mode, so the check is the leaf plumbing; the kernel itself is checked above)."""
    cfg, params = tiny_llama(hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=64, tie_word_embeddings=True)
    params["model"]["layers"] = jaxq.RTN(bits=4, group_size=64)(params["model"]["layers"])
    prepared = prepare(params, backend="mosaic_gpu")
    layer = prepared["model"]["layers"][0]
    assert isinstance(layer["mlp"]["up_proj"]["weight"], MosaicGPUWeight)
    fn = llama.make_apply_fn(cfg)
    tokens = jnp.arange(4, dtype=jnp.int32)[None]
    ref = jaxq.apply(fn)(params, tokens)
    got = jaxq.apply(fn)(prepared, tokens)  # f32 activations: the XLA fallback of the backend
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits,group,dtype,m", [(4, 128, jnp.bfloat16, 1),
                                                (8, 64, jnp.float16, 100),
                                                (4, "channel", jnp.bfloat16, 300)])
def test_mosaic_gpu_lowers_for_cuda(bits, group, dtype, m):
    """The Mosaic GPU lowering (layouts, swizzles, the TMA pipeline) runs without a GPU."""
    w = repack_mosaic_gpu(make_weight(256, 1024, bits, group))
    x = jnp.ones((m, 1024), dtype)
    try:
        text = jax.jit(lambda x, w: qmatmul_mosaic_gpu(x, w)).trace(x, w).lower(
            lowering_platforms=("cuda",)).as_text()
    except (NotImplementedError, RuntimeError) as e:
        if "platform" in str(e).lower() or "cuda" in str(e).lower():
            pytest.skip(f"no CUDA lowering here: {e}")
        raise
    assert "mosaic_gpu" in text
