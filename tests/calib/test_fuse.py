"""Sibling fusion: which leaves are siblings, the fused weight, and compressed execution on it."""

from __future__ import annotations

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import dequantized, nnx_case
from _tinyllama import tiny_llama

import jaxq
from jaxq.calib.fuse import fuse_siblings
from jaxq.calib.trace import sibling_groups, trace
from jaxq.core.formats import quantize
from jaxq.core.fused import FusedSlice, concat_rows
from jaxq.core.leaf import nbytes as leaf_bytes
from jaxq.core.serialize import save
from jaxq.kernels import PackedForKernel, prepare
from jaxq.models import llama


def _llama(**overrides):
    """The tiny llama (tied head) with its layers RTN-quantized, 4-bit g32."""
    cfg, params = tiny_llama(tie_word_embeddings=True, **overrides)
    params["model"]["layers"] = jaxq.RTN(bits=4, group_size=32)(params["model"]["layers"])
    return cfg, params


def _count_qmatmuls(monkeypatch) -> list:
    kernel_module = sys.modules["jaxq.kernels.qmatmul"]  # QArray's registered site op calls it
    calls = []
    real = kernel_module.qmatmul

    def spy(x, w, **kw):
        calls.append(w)
        return real(x, w, **kw)

    monkeypatch.setattr(kernel_module, "qmatmul", spy)
    return calls


def test_llama_siblings_are_qkv_and_gate_up():
    cfg, params = _llama()
    groups = sibling_groups(trace(llama.make_apply_fn(cfg), params, jnp.zeros((1, 4), int)))
    want = []
    for i in range(2):
        pre = f"model/layers/{i}/"
        want.append(tuple(f"{pre}self_attn/{n}_proj/weight" for n in "qkv"))
        want.append(tuple(f"{pre}mlp/{n}_proj/weight" for n in ("gate", "up")))
    assert groups == want  # not o_proj/down_proj, nor the tied head (it reads h, alone)


def test_siblings_need_the_same_activation_at_every_use():
    w = {n: jnp.ones((8, 4)) for n in "abc"}

    def fn(p, x):
        y = x @ p["a"].T + x @ p["b"].T + x @ p["c"].T  # all three read x ...
        return y + (2 * x) @ p["b"].T  # ... and b also reads 2x: a and c only

    assert sibling_groups(trace(fn, w, jnp.ones((1, 4)))) == [("a", "c")]
    apart = lambda p, x: (x @ p["a"].T, (x + 1) @ p["c"].T)  # noqa: E731
    assert sibling_groups(trace(apart, w, jnp.ones(4))) == []
    flax_style = {n: jnp.ones((4, 8)) for n in "ab"}  # x @ k contracts x's last dim with k's 0
    both = lambda p, x: (x @ p["a"], x @ p["b"])  # noqa: E731
    assert sibling_groups(trace(both, flax_style, jnp.ones((2, 4)))) == [("a", "b")]


def test_fused_llama_matches_unfused_with_fewer_matmuls(monkeypatch):
    cfg, params = _llama()
    fn = llama.make_apply_fn(cfg)
    prompt = jnp.arange(5, dtype=jnp.int32)[None]
    fused = fuse_siblings(fn, params, prompt)
    attn = fused["model"]["layers"][1]["self_attn"]
    q, k, v = (attn[f"{n}_proj"]["weight"] for n in "qkv")
    assert all(isinstance(m, FusedSlice) for m in (q, k, v))
    assert q.fused is k.fused is v.fused and (q.start, k.start, v.start) == (0, 64, 96)
    assert isinstance(fused["model"]["layers"][1]["self_attn"]["o_proj"]["weight"], jaxq.QArray)
    for a, b in [(q, params["model"]["layers"][1]["self_attn"]["q_proj"]["weight"]),
                 (v, params["model"]["layers"][1]["self_attn"]["v_proj"]["weight"])]:
        assert a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a.materialize()), np.asarray(b.materialize()))

    calls = _count_qmatmuls(monkeypatch)
    got = jaxq.apply(fn)(fused, prompt)
    assert len(calls) == 2 * 4  # per layer: qkv, o, gate+up, down (7 unfused)
    calls.clear()
    ref = jaxq.apply(fn)(params, prompt)
    assert len(calls) == 2 * 7
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    dense = llama.forward(dequantized(params), prompt, cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-4, atol=1e-4)


def test_fused_decode_generates_the_same_tokens_and_fuses_in_the_loop(monkeypatch):
    cfg, params = _llama()
    prompt = jnp.arange(5, dtype=jnp.int32)[None]
    fused = fuse_siblings(llama.make_apply_fn(cfg), params, prompt)
    ref = llama.generate(params, cfg, prompt, 6, apply=jaxq.apply)
    calls = _count_qmatmuls(monkeypatch)
    got = llama.generate(fused, cfg, prompt, 6, apply=jaxq.apply)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # prefill and the decode step (traced once each): 4 matmuls per layer in both
    assert len(calls) == 2 * 2 * 4


def test_prepared_fused_group_shares_one_repacked_weight():
    cfg, params = _llama(num_layers=1)
    fn = llama.make_apply_fn(cfg)
    prompt = jnp.arange(4, dtype=jnp.int32)[None]
    fused = fuse_siblings(fn, params, prompt)
    prepared = prepare(fused, backend="triton")
    mlp = prepared["model"]["layers"][0]["mlp"]
    gate, up = mlp["gate_proj"]["weight"], mlp["up_proj"]["weight"]
    assert isinstance(gate.fused, PackedForKernel) and gate.fused is up.fused
    assert gate.fused.n == 2 * cfg.intermediate_size
    np.testing.assert_array_equal(
        np.asarray(up.materialize(jnp.float32)),
        np.asarray(params["model"]["layers"][0]["mlp"]["up_proj"]["weight"].materialize()))
    got = jax.jit(jaxq.apply(fn))(prepared, prompt)
    ref = jax.jit(jaxq.apply(fn))(params, prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # the members' byte shares add up to the group's storage
    assert leaf_bytes(gate) + leaf_bytes(up) == gate.fused.nbytes


def test_fused_nnx_attention_kernels_three_axes():
    """flax.nnx q/k/v kernels are ``(d, heads, head_dim)``, contracted on axis -3."""
    case = nnx_case()
    named, treedef = jaxq.core.tree.flatten_with_paths(case.params)
    q = jax.tree.unflatten(treedef, [
        quantize(leaf, bits=4, group_size=8, axis=case.sites[path][0]) if path in case.sites
        else leaf for path, leaf in named])
    x = case.batches[0]
    fused = fuse_siblings(case.apply_fn, q, x)
    names = [f"attn/{n}/kernel" for n in ("query", "key", "value")]
    flat = dict(jaxq.core.tree.flatten_with_paths(fused)[0])
    assert all(isinstance(flat[n], FusedSlice) and flat[n].shape == (16, 2, 8) for n in names)
    got = jaxq.apply(case.apply_fn)(fused, x)
    ref = jaxq.apply(case.apply_fn)(q, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_only_compatible_members_fuse():
    k = jax.random.split(jax.random.key(1), 4)
    ws = [jax.random.normal(kk, (8, 64)) for kk in k]
    s = jnp.linspace(0.5, 2.0, 64)
    params = {
        "a": quantize(ws[0], bits=4, group_size=32),
        "b": quantize(ws[1], bits=4, group_size=32),
        "c": quantize(ws[2], bits=8, group_size=32),  # other bits: left alone
        "d": jnp.asarray(ws[3]),  # float: left alone
    }

    def fn(p, x):
        return sum(x @ p[n].T for n in "abcd")

    x = jax.random.normal(jax.random.key(2), (3, 64))
    fused = fuse_siblings(fn, params, x)
    assert isinstance(fused["a"], FusedSlice) and fused["a"].fused is fused["b"].fused
    assert fused["c"] is params["c"] and fused["d"] is params["d"]
    np.testing.assert_allclose(np.asarray(jaxq.apply(fn)(fused, x)),
                               np.asarray(jaxq.apply(fn)(params, x)), rtol=1e-5, atol=1e-5)

    # input scales: equal ones fuse (one copy kept), different ones do not
    scaled = {n: dataclasses.replace(params[n], input_scale=s) for n in "ab"}
    scaled["e"] = dataclasses.replace(params["a"], input_scale=s * 2)
    fn3 = lambda p, x: sum(x @ p[n].T for n in "abe")  # noqa: E731
    fused3 = fuse_siblings(fn3, scaled, x)
    assert isinstance(fused3["a"], FusedSlice) and isinstance(fused3["b"], FusedSlice)
    assert fused3["e"] is scaled["e"]
    np.testing.assert_allclose(np.asarray(jaxq.apply(fn3)(fused3, x)),
                               np.asarray(jaxq.apply(fn3)(scaled, x)), rtol=1e-5, atol=1e-5)


def test_concat_rows_checks_members_and_broadcasts_per_tensor_scales():
    a = quantize(jnp.ones((4, 64)), bits=4, group_size=32)
    with pytest.raises(ValueError, match="formats differ"):
        concat_rows([a, quantize(jnp.ones((4, 64)), bits=4, group_size=64)])
    w = jax.random.normal(jax.random.key(3), (6, 64))
    t = quantize(w, bits=8, group_size="tensor")
    c = quantize(-w, bits=8, group_size="tensor")
    both = concat_rows([t, c])
    assert both.shape == (12, 64) and both.scales.shape == (12, 1)
    np.testing.assert_array_equal(np.asarray(both.materialize()),
                                  np.concatenate([t.materialize(), c.materialize()]))


def test_fuse_siblings_names_a_missing_leaf():
    params = {"a": quantize(jnp.ones((4, 64)), bits=4, group_size=32)}
    with pytest.raises(KeyError, match="nope"):
        fuse_siblings(None, params, groups=[("a", "nope")])


@pytest.mark.slow
def test_real_smollm2_fused_matches_unfused(smollm):
    """SmolLM2-135M at W4 g64: 30 layers x (q/k/v, gate/up) fused, same logits and greedy path,
    same stored bytes."""
    params, cfg, tok = smollm
    q = jaxq.RTN(bits=4, group_size=64)(params)
    prompt = jnp.asarray(tok.encode("The quick brown fox jumps over the lazy dog."))[None]
    fn = llama.make_apply_fn(cfg)
    fused = fuse_siblings(fn, q, prompt)
    leaves = jax.tree.leaves(fused, is_leaf=jaxq.core.tree.is_leaf)
    members = [x for x in leaves if isinstance(x, FusedSlice)]
    assert len(members) == 30 * 5 and len({x.group for x in members}) == 30 * 2
    qkv = fused["model"]["layers"][0]["self_attn"]["v_proj"]["weight"]
    assert (qkv.start, qkv.stop, qkv.fused.shape) == (768, 960, (960, 576))
    assert sum(leaf_bytes(x) for x in leaves) == sum(
        leaf_bytes(x) for x in jax.tree.leaves(q, is_leaf=jaxq.core.tree.is_leaf))
    got = jax.jit(jaxq.apply(fn))(fused, prompt)
    ref = jax.jit(jaxq.apply(fn))(q, prompt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(
        np.asarray(llama.generate(fused, cfg, prompt, 8, apply=jaxq.apply)),
        np.asarray(llama.generate(q, cfg, prompt, 8, apply=jaxq.apply)))


def test_fused_params_are_not_saved(tmp_path):
    q = lambda n: quantize(jnp.ones((n, 64)), bits=4, group_size=32)  # noqa: E731
    fused = fuse_siblings(None, {"a": q(8), "b": q(4)}, groups=[("a", "b")])
    with pytest.raises(TypeError, match="save the params before fuse_siblings"):
        save(tmp_path / "m", fused)
    assert not (tmp_path / "m").exists()
