"""jaxq.kernels.prepare: repack once, then compressed execution on PackedForKernel leaves."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tinyllama import tiny_llama

import jaxq
from jaxq.core.formats import quantize
from jaxq.kernels import PackedForKernel, prepare, qmatmul, repack
from jaxq.models import llama


def test_prepare_replaces_supported_2d_qarrays():
    w3 = quantize(jnp.ones((2, 16, 64)), bits=4, group_size=32)  # stacked: stays a QArray
    w5 = quantize(jnp.ones((16, 64)), bits=5, group_size=32)  # no kernel: stays
    params = {"a": quantize(jnp.ones((16, 64)), bits=4, group_size=32), "b": w3, "c": w5,
              "f": jnp.ones(3)}
    out = prepare(params, backend="triton")
    assert isinstance(out["a"], PackedForKernel) and out["a"].shape == (16, 64)
    assert out["b"] is w3 and out["c"] is w5 and out["f"] is params["f"]
    assert prepare(params, backend="xla") is params


def test_prepare_flax_kernel_keeps_logical_shape():
    w = quantize(jax.random.normal(jax.random.key(1), (64, 24)), bits=4, group_size=32, axis=-2)
    p = prepare({"k": w}, backend="triton")["k"]
    assert p.shape == (64, 24) and p.axis == -2
    np.testing.assert_array_equal(np.asarray(p.dequantize(jnp.float32)),
                                  np.asarray(w.dequantize(jnp.float32)))
    x = jax.random.normal(jax.random.key(2), (3, 64))
    f = jaxq.apply(lambda prm, x: x @ prm["k"])
    np.testing.assert_allclose(np.asarray(f({"k": p}, x)), np.asarray(f({"k": w}, x)),
                               rtol=1e-6, atol=1e-6)


def test_apply_on_prepared_params_matches_qarray_path():
    cfg, params = tiny_llama(dtype=jnp.bfloat16, tie_word_embeddings=True)
    params["model"]["layers"] = jaxq.RTN(bits=4, group_size=32)(params["model"]["layers"])
    prepared = prepare(params, backend="triton")
    leaves = jax.tree.leaves(prepared, is_leaf=lambda x: isinstance(x, PackedForKernel))
    assert sum(isinstance(x, PackedForKernel) for x in leaves) == 14
    prompt = jnp.arange(5, dtype=jnp.int32)[None]
    fn = llama.make_apply_fn(cfg)
    ref = jax.jit(jaxq.apply(fn))(params, prompt)
    got = jax.jit(jaxq.apply(fn))(prepared, prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    toks_ref = llama.generate(params, cfg, prompt, 6, apply=jaxq.apply)
    toks = llama.generate(prepared, cfg, prompt, 6, apply=jaxq.apply)
    np.testing.assert_array_equal(np.asarray(toks), np.asarray(toks_ref))


def test_prepared_weight_non_matmul_use_dequantizes():
    w = quantize(jax.random.normal(jax.random.key(3), (16, 64)), bits=4, group_size=32)
    p = prepare({"w": w}, backend="triton")
    f = jaxq.apply(lambda prm: jnp.sum(prm["w"] ** 2))
    np.testing.assert_allclose(float(f(p)), float(f({"w": w})), rtol=1e-6)


def test_qmatmul_interpret_on_prepared_weight():
    w = quantize(jax.random.normal(jax.random.key(4), (40, 256)), bits=4, group_size=128)
    p = prepare({"w": w}, backend="triton")["w"]
    x = jax.random.normal(jax.random.key(5), (1, 256))
    y = qmatmul(x, p, backend="triton", interpret=True)
    ref = x @ w.dequantize(jnp.float32).T
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5)
    assert repack(w).meta == p.meta


def test_input_transforms_move_onto_activations():
    """Act-order (perm) and unfolded AWQ (input_scale) QArrays match their dequantized matmul."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxq
    from jaxq.kernels import qmatmul

    r = np.random.default_rng(0)
    w = jnp.asarray(r.standard_normal((24, 128)), jnp.float32)
    qa = jaxq.quantize(w, bits=4, group_size=32)
    qa = dataclasses.replace(qa, perm=jnp.asarray(r.permutation(128), jnp.int32),
                             input_scale=jnp.asarray(r.uniform(0.5, 2.0, 128), jnp.float32))
    x = jnp.asarray(r.standard_normal((5, 128)), jnp.float32)
    ref = np.asarray(x, np.float64) @ np.asarray(qa.dequantize(), np.float64).T
    for kwargs in ({"backend": "xla"}, {"backend": "triton", "interpret": True}):
        y = jax.jit(lambda x, q, kw=kwargs: qmatmul(x, q, **kw))(x, qa)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)


def test_prepare_keeps_input_transforms_beside_the_layout(monkeypatch):
    """Act-order and unfolded-AWQ weights are repacked once too: the kernel weight carries the
    permutation and input scale, ``qmatmul`` applies them to x, and nothing repacks under jit."""
    import dataclasses
    import importlib

    from jaxq.kernels.pallas_mosaic_gpu import MosaicGPUWeight

    rp = importlib.import_module("jaxq.kernels.repack")  # the module, not the function

    r = np.random.default_rng(1)
    qa = quantize(jnp.asarray(r.standard_normal((40, 256)), jnp.float32), bits=4, group_size=64)
    qa = dataclasses.replace(qa, perm=jnp.asarray(r.permutation(256), jnp.int32),
                             input_scale=jnp.asarray(r.uniform(0.5, 2.0, 256), jnp.float32))
    want = np.asarray(qa.dequantize(jnp.float32))
    x = jnp.asarray(r.standard_normal((3, 256)), jnp.float32)
    ref = np.asarray(x, np.float64) @ want.T.astype(np.float64)
    for backend, kind in (("triton", PackedForKernel), ("mosaic_gpu", MosaicGPUWeight)):
        p = prepare({"w": qa}, backend=backend)["w"]
        assert isinstance(p, kind) and p.has_input_transforms, backend
        assert p.nbytes > prepare({"w": dataclasses.replace(qa, perm=None, input_scale=None)},
                                  backend=backend)["w"].nbytes
        np.testing.assert_allclose(np.asarray(p.dequantize(jnp.float32)), want, rtol=1e-6,
                                   atol=1e-6)
    p = prepare({"w": qa}, backend="triton")["w"]
    monkeypatch.setattr(rp, "_repack", lambda *a, **k: pytest.fail("repacked under jit"))
    for kwargs in ({"backend": "xla"}, {"backend": "triton", "interpret": True}):
        y = jax.jit(lambda x, w, kw=kwargs: qmatmul(x, w, **kw))(x, p)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=2e-5, atol=2e-5)
    f = jax.jit(jaxq.apply(lambda prm, x: x @ prm["w"].T))
    np.testing.assert_allclose(np.asarray(f({"w": p}, x)), ref, rtol=2e-5, atol=2e-5)


def test_act_order_llama_fused_and_prepared():
    """Act-order GPTQ on a Llama: q/k/v and gate/up share their permutation, so they fuse;
    prepare repacks every weight (transforms kept beside it); logits match the QArray path."""
    from jaxq.core.fused import FusedSlice

    cfg, params = tiny_llama(num_layers=1)
    fn = llama.make_apply_fn(cfg)
    batches = [jax.random.randint(jax.random.key(1), (2, 16), 0, 96)]
    gptq = jaxq.GPTQ(bits=4, group_size=32, act_order=True)
    qparams, _ = jaxq.calibrate(fn, params, batches, gptq, progress=False)
    prompt = batches[0][:1]
    fused = jaxq.fuse_siblings(fn, qparams, prompt)
    layer = fused["model"]["layers"][0]
    q_proj = layer["self_attn"]["q_proj"]["weight"]
    assert isinstance(q_proj, FusedSlice) and q_proj.fused.perm is not None
    prepared = prepare(fused, backend="triton")
    slices = [x for x in jax.tree.leaves(prepared, is_leaf=lambda x: isinstance(x, FusedSlice))
              if isinstance(x, FusedSlice)]
    assert len(slices) == 5 and all(isinstance(s.fused, PackedForKernel)
                                    and s.fused.has_input_transforms for s in slices)
    ref = jax.jit(jaxq.apply(fn))(qparams, prompt)
    got = jax.jit(jaxq.apply(fn))(prepared, prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_prepare_leaves_w8a8_to_its_own_matmul():
    """A W8A8 weight quantizes its activations too: repacking it as a weight-only kernel
    weight would silently drop that, so prepare keeps it (and the kernels refuse it)."""
    from jaxq.kernels import unsupported_reason
    from jaxq.quant.smoothquant import w8a8_quantize

    w = w8a8_quantize(jax.random.normal(jax.random.key(2), (32, 64)))
    assert "runs its own matmul" in unsupported_reason(w)
    assert prepare({"w": w}, backend="triton")["w"] is w


def test_cached_repack_follows_every_array_of_the_weight():
    """Two QArrays sharing codes but not scales get their own repacks (the cache keys on all
    of a weight's arrays, not the codes alone)."""
    import dataclasses

    from jaxq.kernels.repack import cached_repack

    w = quantize(jax.random.normal(jax.random.key(3), (16, 64)), bits=4, group_size=32)
    w2 = dataclasses.replace(w, scales=2 * w.scales, biases=2 * w.biases)
    assert cached_repack(w) is cached_repack(w)
    np.testing.assert_allclose(np.asarray(cached_repack(w2).dequantize(jnp.float32)),
                               2 * np.asarray(w.dequantize(jnp.float32)), rtol=1e-6)
    x = jax.random.normal(jax.random.key(4), (3, 64))
    ratio = qmatmul(x, w2, backend="triton", interpret=True) / qmatmul(
        x, w, backend="triton", interpret=True)
    np.testing.assert_allclose(np.asarray(ratio), 2.0, rtol=1e-4)


def test_qmatmul_refuses_stacked_weights_and_unknown_block_fields():
    x = jnp.ones((2, 64))
    with pytest.raises(ValueError, match=r"2-D weight, got a QArray of shape \(2, 16, 64\)"):
        qmatmul(x, quantize(jnp.ones((2, 16, 64)), bits=4, group_size=32), backend="xla")
    w = quantize(jnp.ones((16, 64)), bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"unknown KernelConfig field\(s\) \['split-k'\]"):
        qmatmul(x, w, backend="triton", block={"split-k": 2}, interpret=True)
