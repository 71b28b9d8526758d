"""An independent float64 numpy forward of the Llama architecture, for testing jaxq's.

Written from the architecture's definition, not from jaxq's code: complex-number RoPE for the
interleaved layout, ``rotate_half`` for the half-split one, K/V heads repeated for GQA, and an
explicit ``-inf`` causal mask.
"""

from __future__ import annotations

import numpy as np


def _np(tree):
    if isinstance(tree, dict):
        return {k: _np(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_np(v) for v in tree]
    return np.asarray(tree, dtype=np.float64)


def to_f64(params):
    """The params pytree as float64 numpy arrays."""
    return _np(params)


def _lin(x, p):
    y = x @ p["weight"].T
    return y + p["bias"] if "bias" in p else y


def _norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, pos, theta, interleaved):
    # x [T, H, d]
    d = x.shape[-1]
    freqs = theta ** (-np.arange(0, d // 2, dtype=np.float64) * 2.0 / d)
    ang = pos[:, None] * freqs[None, :]  # [T, d/2]
    if interleaved:
        z = x[..., 0::2] + 1j * x[..., 1::2]
        z = z * np.exp(1j * ang)[:, None, :]
        out = np.empty_like(x)
        out[..., 0::2] = z.real
        out[..., 1::2] = z.imag
        return out
    cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, None, :]
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def forward_f64(p, tokens, cfg):
    """Logits ``[T, V]`` (float64) of one sequence ``tokens [T]``; ``p`` from :func:`to_f64`."""
    t = len(tokens)
    pos = np.arange(t, dtype=np.float64)
    h = p["model"]["embed_tokens"]["weight"][np.asarray(tokens)]
    hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for lp in p["model"]["layers"]:
        a = lp["self_attn"]
        x = _norm(h, lp["input_layernorm"]["weight"], cfg.rms_norm_eps)
        q = _rope(_lin(x, a["q_proj"]).reshape(t, nh, hd), pos, cfg.rope_theta,
                  cfg.rope_interleaved)
        k = _rope(_lin(x, a["k_proj"]).reshape(t, nkv, hd), pos, cfg.rope_theta,
                  cfg.rope_interleaved)
        v = _lin(x, a["v_proj"]).reshape(t, nkv, hd)
        k = np.repeat(k, nh // nkv, axis=1)
        v = np.repeat(v, nh // nkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(t, nh * hd)
        h = h + _lin(o, a["o_proj"])
        x = _norm(h, lp["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        m = lp["mlp"]
        g = _lin(x, m["gate_proj"])
        h = h + _lin(g / (1.0 + np.exp(-g)) * _lin(x, m["up_proj"]), m["down_proj"])
    h = _norm(h, p["model"]["norm"]["weight"], cfg.rms_norm_eps)
    head = p["model"]["embed_tokens"] if cfg.tie_word_embeddings else p["lm_head"]
    return h @ head["weight"].T


def nll_f64(logits, tokens):
    """Per-prediction NLL of ``tokens[1:]`` given float64 logits ``[T, V]``."""
    x = logits[:-1]
    m = x.max(-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(-1)) + m[:, 0]
    return lse - x[np.arange(len(x)), np.asarray(tokens[1:])]
