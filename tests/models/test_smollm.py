"""The real SmolLM2-135M-Instruct: jaxq's forward against an independent float64 numpy forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import llama_ref
import numpy as np
import pytest

from jaxq.eval.perplexity import perplexity
from jaxq.models import llama

pytestmark = pytest.mark.slow


def test_config_and_size(smollm):
    params, cfg, _ = smollm
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.rope_interleaved
    assert (cfg.rope_theta, cfg.rms_norm_eps) == (100000.0, 1e-5)
    assert llama.param_count(params) == 134_515_008
    assert llama.check_params(params, cfg) == []


def test_perplexity_matches_float64_numpy_forward(smollm, smollm_eval_windows):
    """Two protocol windows through both forwards: same perplexity to well under 0.3%."""
    params, cfg, _ = smollm
    windows = smollm_eval_windows[:2]
    p64 = llama_ref.to_f64(params)
    ref_nll = np.concatenate([llama_ref.nll_f64(llama_ref.forward_f64(p64, w, cfg), w)
                              for w in windows])
    del p64
    ref_ppl = float(np.exp(ref_nll.mean()))
    res = perplexity(llama.make_apply_fn(cfg), params, windows, batch_size=1, progress=False)
    assert res.n_tokens == ref_nll.size == 2 * 511
    assert abs(res.ppl / ref_ppl - 1) < 3e-3, (res.ppl, ref_ppl)
    assert abs(res.nll - ref_nll.mean()) < 1e-5, (res.nll, ref_nll.mean())  # measured 8e-8


def test_hf_layout_gives_the_same_logits(smollm, smollm_eval_windows):
    """Un-permuting GGUF's Q/K rows and using half-split RoPE reproduces the logits."""
    params, cfg, _ = smollm
    hf_params, hf_cfg = llama.convert_rope_layout(params, cfg, interleaved=False)
    assert not hf_cfg.rope_interleaved
    toks = smollm_eval_windows[:1, :96]
    a = jax.jit(llama.make_apply_fn(cfg))(params, toks)
    b = jax.jit(llama.make_apply_fn(hf_cfg))(hf_params, toks)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4)
    assert (np.asarray(a).argmax(-1) == np.asarray(b).argmax(-1)).mean() > 0.99


def test_kv_cache_generation_matches_repeated_full_forward(smollm):
    params, cfg, tok = smollm
    prompt = tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    n = 8
    out = llama.generate(params, cfg, prompt, n, stop_at_eos=False)
    fwd = jax.jit(llama.make_apply_fn(cfg))
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, len(prompt) + n), np.int32)  # one shape; causal, padding inert
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(fwd(params, padded)[0, len(seq) - 1])))
    assert out.tolist() == seq[len(prompt):]
    assert "Paris" in tok.decode(out.tolist())
