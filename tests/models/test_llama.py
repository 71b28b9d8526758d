"""jaxq's Llama forward against an independent float64 numpy forward, plus cache and generation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import llama_ref
import numpy as np
import pytest
from _tinyllama import tiny_config, tiny_params
from jax.extend.core import Var

from jaxq.models import llama
from jaxq.models.llama import LlamaConfig

_cfg = functools.partial(tiny_config, vocab_size=61, hidden_size=48, intermediate_size=80,
                         num_heads=6, head_dim=8, rope_theta=500.0)


CASES = {
    "half-gqa-untied": _cfg(),
    "interleaved-gqa-tied": _cfg(rope_interleaved=True, tie_word_embeddings=True),
    "half-mha-biases": _cfg(num_kv_heads=6, attention_bias=True, mlp_bias=True),
    "interleaved-mqa-biases-tied": _cfg(num_kv_heads=1, rope_interleaved=True,
                                         tie_word_embeddings=True, attention_bias=True),
    "wide-head": _cfg(num_heads=4, num_kv_heads=2, head_dim=16),  # heads*head_dim != hidden
}


_fwd = jax.jit(llama.forward, static_argnames=("config", "attn_block"))


def _tokens(cfg: LlamaConfig, b: int, t: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_matches_float64_reference(name):
    cfg = CASES[name]
    params = tiny_params(cfg, 1, scale=0.15)
    toks = _tokens(cfg, 2, 19)
    # attn_block=8 splits 19 queries into causal blocks of 8, 8 and 3.
    out = _fwd(params, toks, config=cfg, attn_block=8)
    assert out.shape == (2, 19, cfg.vocab_size) and out.dtype == jnp.float32
    p64 = llama_ref.to_f64(params)
    ref = np.stack([llama_ref.forward_f64(p64, t, cfg) for t in toks])
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    assert err < 2e-5 * max(1.0, np.abs(ref).max()), err


def test_attention_blocking_and_batching_do_not_change_logits():
    cfg = CASES["interleaved-gqa-tied"]
    params = tiny_params(cfg, 2, scale=0.15)
    toks = _tokens(cfg, 3, 40)
    full = _fwd(params, toks, config=cfg, attn_block=40)
    np.testing.assert_allclose(_fwd(params, toks, config=cfg, attn_block=7), full,
                               rtol=1e-5, atol=1e-4)
    one = jax.jit(llama.make_apply_fn(cfg))(params, toks[1:2])
    np.testing.assert_allclose(one[0], full[1], rtol=1e-5, atol=1e-4)


def test_every_linear_is_a_dot_general_on_the_param_leaf():
    """The contract with jaxq's tracer: each weight feeds a dot_general directly."""
    cfg = CASES["half-mha-biases"]
    params = tiny_params(cfg, 3)
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    closed = jax.make_jaxpr(llama.make_apply_fn(cfg))(params, _tokens(cfg, 1, 5))
    invars = closed.jaxpr.invars[: len(leaves)]
    consumers = {v: [] for v in invars}
    for eqn in closed.jaxpr.eqns:
        for i, v in enumerate(eqn.invars):
            if isinstance(v, Var) and v in consumers:
                consumers[v].append((eqn.primitive.name, i))
    n_matrices = 0
    for (path, leaf), var in zip(leaves, invars, strict=True):
        if leaf.ndim == 2 and "embed_tokens" not in jax.tree_util.keystr(path):
            assert consumers[var] == [("dot_general", 1)], (path, consumers[var])
            n_matrices += 1
    assert n_matrices == 7 * cfg.num_layers + 1  # + untied lm_head


def test_convert_rope_layout_round_trip_and_same_logits():
    cfg = CASES["half-gqa-untied"]
    params = tiny_params(cfg, 4, scale=0.15)
    toks = _tokens(cfg, 1, 12)
    p_int, c_int = llama.convert_rope_layout(params, cfg, interleaved=True)
    assert c_int.rope_interleaved
    np.testing.assert_allclose(_fwd(p_int, toks, config=c_int), _fwd(params, toks, config=cfg),
                               rtol=1e-5, atol=1e-5)
    back, c_back = llama.convert_rope_layout(p_int, c_int, interleaved=False)
    assert c_back == cfg
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_check_params_reports_problems():
    cfg = CASES["half-gqa-untied"]
    params = tiny_params(cfg, 5)
    assert llama.check_params(params, cfg) == []
    del params["lm_head"]
    params["model"]["norm"]["weight"] = params["model"]["norm"]["weight"][:3]
    problems = llama.check_params(params, cfg)
    assert "missing lm_head/weight" in problems
    assert any(p.startswith("model/norm/weight has shape (3,)") for p in problems)
    assert llama.param_count(tiny_params(cfg)) == sum(
        int(np.prod(s.shape)) for s in jax.tree.leaves(llama.param_shapes(cfg)))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        _cfg(num_heads=6, num_kv_heads=4)
    cfg = _cfg()
    assert hash(cfg) == hash(dataclasses.replace(cfg))


def test_decode_step_prefill_then_steps_equals_forward():
    cfg = CASES["interleaved-mqa-biases-tied"]
    params = tiny_params(cfg, 6, scale=0.15)
    toks = _tokens(cfg, 2, 10)
    full = _fwd(params, toks, config=cfg)
    cache = llama.init_cache(cfg, 2, 16)
    step = jax.jit(lambda p, c, t, pos: llama.decode_step(p, c, t, pos, cfg))
    logits, cache = step(params, cache, toks[:, :6], 0)
    np.testing.assert_allclose(logits, full[:, :6], rtol=1e-5, atol=1e-5)
    last, _ = llama.decode_step(params, llama.init_cache(cfg, 2, 16), toks[:, :6], 0, cfg,
                                last_only=True)
    np.testing.assert_allclose(last[:, 0], full[:, 5], rtol=1e-5, atol=1e-5)
    for i in range(6, 10):
        logits, cache = step(params, cache, toks[:, i : i + 1], i)
        np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-5, atol=1e-5)


def _greedy_by_full_forward(params, cfg, prompt, n):
    """Argmax over repeated full forwards (padded to one length: causal, so padding is inert)."""
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, len(prompt) + n), np.int32)
        padded[0, : len(seq)] = seq
        logits = _fwd(params, padded, config=cfg)
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_generate_greedy_matches_repeated_forward_and_apply_hook():
    cfg = CASES["half-gqa-untied"]
    params = tiny_params(cfg, 7, scale=0.3)
    prompt = [3, 14, 15, 9, 26]
    calls = []

    def hook(fn):
        calls.append(fn)
        return fn

    out = llama.generate(params, cfg, prompt, 7, apply=hook)
    assert out.shape == (7,) and out.dtype == jnp.int32
    assert out.tolist() == _greedy_by_full_forward(params, cfg, prompt, 7)
    assert len(calls) == 1
    batched = llama.generate(params, cfg, np.array([prompt, prompt[::-1]]), 7)
    assert batched.shape == (2, 7)
    assert batched[0].tolist() == out.tolist()
    assert batched[1].tolist() == _greedy_by_full_forward(params, cfg, prompt[::-1], 7)


def test_generate_stops_at_eos_and_samples():
    cfg = CASES["half-gqa-untied"]
    params = tiny_params(cfg, 7, scale=0.3)
    prompt = [3, 14, 15, 9, 26]
    free = llama.generate(params, cfg, prompt, 6).tolist()
    eos = free[2]
    stop = llama.generate(params, dataclasses.replace(cfg, eos_token_id=eos), prompt, 6).tolist()
    first = free.index(eos)
    assert stop[: first + 1] == free[: first + 1]
    assert stop[first + 1 :] == [eos] * (5 - first)
    s1 = llama.generate(params, cfg, prompt, 6, greedy=False, temperature=1.0,
                        key=jax.random.key(1))
    s2 = llama.generate(params, cfg, prompt, 6, greedy=False, temperature=1.0,
                        key=jax.random.key(1))
    assert s1.tolist() == s2.tolist()
    assert all(0 <= t < cfg.vocab_size for t in s1.tolist())
