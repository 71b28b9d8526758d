"""Llama-family decoder as pure functions over a params pytree.

The params pytree mirrors mlx-lm's module paths as nested dicts, weights in torch/MLX layout
``(out_features, in_features)``::

    {"model": {"embed_tokens": {"weight": (V, D)},
               "layers": [{"self_attn": {"q_proj": {"weight", "bias"?}, "k_proj", "v_proj",
                                         "o_proj"},
                           "mlp": {"gate_proj", "up_proj", "down_proj"},
                           "input_layernorm": {"weight"},
                           "post_attention_layernorm": {"weight"}}, ...],
               "norm": {"weight"}},
     "lm_head": {"weight": (V, D)}}          # only when the head is not tied

Every linear layer is one ``lax.dot_general`` whose right operand *is* the param leaf (no
transpose, no fused QKV, no cast other than ``.astype`` right before use), so that jaxq's
model-agnostic tracer sees exactly which dot_general consumes which weight and can substitute
compressed weights there. Biases are optional per projection: a ``"bias"`` leaf next to a
``"weight"`` is added when present.

RoPE comes in two row layouts. HF checkpoints rotate the two *halves* of each head
(``rope_interleaved=False``); llama.cpp permutes the Q/K rows at conversion time and rotates
*adjacent pairs* (``rope_interleaved=True``). Both give identical logits;
:func:`convert_rope_layout` moves weights between them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.calib.groups import ScaleGroup
from jaxq.core.tree import flatten_with_paths

Params = dict[str, Any]
Cache = list[dict[str, jax.Array]]
StepFn = Callable[[Params, Cache, jax.Array, jax.Array], tuple[jax.Array, Cache]]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static hyper-parameters of a Llama-family decoder (hashable, so usable as a jit static)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_interleaved: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    #: One id, or a tuple of all the ids that end a sequence (Llama 3 lists <|end_of_text|>,
    #: <|eom_id|> and <|eot_id|>; a GGUF names eos and eot): generation stops on any of them.
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, (list, tuple)):  # a list from JSON metadata, say
            ids = tuple(dict.fromkeys(int(i) for i in self.eos_token_id))
            object.__setattr__(self, "eos_token_id",
                               None if not ids else ids[0] if len(ids) == 1 else ids)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends a sequence (empty when the model names none)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (int(eos),)


# ----------------------------------------------------------------------------------------------
# Building blocks


def linear(x: jax.Array, p: Params) -> jax.Array:
    """``x @ w.T (+ b)`` as a single dot_general on the weight leaf, contracting its input axis."""
    w = p["weight"].astype(x.dtype)
    y = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (as HF and llama.cpp do), returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[..., head_dim // 2]``; frequency ``i`` is ``theta ** (-2i / head_dim)``."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate ``x [B, T, H, d]`` by angles ``[B or 1, T, d/2]``.

    Interleaved: pairs ``(x[2i], x[2i+1])`` (llama.cpp). Half-split: pairs ``(x[i], x[i+d/2])``
    (HF ``rotate_half``).
    """
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    if interleaved:
        pairs = xf.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)
    else:
        a, b = jnp.split(xf, 2, axis=-1)
        out = jnp.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.astype(x.dtype)


#: Query rows per attention block in the full forward. Each causal block skips the keys after
#: its last query (a quarter of the scores at T=512 with two blocks) and the score buffer's
#: memory stays bounded for long sequences. Smaller blocks cost compile time (x3 at 128, x6 at
#: 64 for SmolLM2); 256 measured best end to end for the 512-token protocol on CPU.
ATTN_BLOCK = 256


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Grouped-query attention. q ``[B,T,H,d]``, k/v ``[B,S,KV,d]``, additive bias ``[T,S]``.

    Heads are moved ahead of positions first so both products are plain batched matmuls over
    (batch, kv head) with the query group folded into M (measured 1.7x faster on CPU than
    contracting in the input layout), and the softmax is normalised after the PV product (a
    ``[T,d]`` divide instead of ``[T,S]``). Every row must have at least one unmasked key.
    """
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    qg = (q * (1.0 / np.sqrt(d)).astype(q.dtype)).reshape(b, t, kv, g, d)
    qg = qg.transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    kt = k.transpose(0, 2, 1, 3)  # [b, kv, s, d]
    vt = v.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, kt, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kv, g, t, s) + bias
    m = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    e = jnp.exp(scores - m)
    denom = jnp.sum(e, axis=-1, keepdims=True)  # [b, kv, g, t, 1]
    out = jnp.einsum("bkqs,bksd->bkqd", e.reshape(b, kv, g * t, s).astype(v.dtype), vt,
                     preferred_element_type=jnp.float32)
    out = out.reshape(b, kv, g, t, d) / denom
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h * d)


def _mask_bias(qpos: jax.Array, kpos: jax.Array) -> jax.Array:
    """Additive causal bias ``[len(qpos), len(kpos)]``: 0 where key <= query, else -inf."""
    return jnp.where(kpos[None, :] <= qpos[:, None], 0.0, -jnp.inf).astype(jnp.float32)


def _causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Causal self-attention at positions ``0..T-1``, one query block at a time."""
    t = q.shape[1]
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        bias = _mask_bias(jnp.arange(start, end), jnp.arange(end))
        outs.append(_attend(q[:, start:end], k[:, :end], v[:, :end], bias))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _qkv(
    p: Params, x: jax.Array, cos: jax.Array, sin: jax.Array, cfg: LlamaConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t, _ = x.shape
    q = linear(x, p["q_proj"]).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear(x, p["k_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear(x, p["v_proj"]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    q = apply_rope(q, cos, sin, cfg.rope_interleaved)
    k = apply_rope(k, cos, sin, cfg.rope_interleaved)
    return q, k, v


def _mlp(p: Params, x: jax.Array) -> jax.Array:
    return linear(jax.nn.silu(linear(x, p["gate_proj"])) * linear(x, p["up_proj"]), p["down_proj"])


def _embed(params: Params, tokens: jax.Array) -> jax.Array:
    emb = params["model"]["embed_tokens"]["weight"]
    return jnp.take(emb, tokens, axis=0)


def _head(params: Params, h: jax.Array, cfg: LlamaConfig) -> jax.Array:
    h = rms_norm(h, params["model"]["norm"]["weight"], cfg.rms_norm_eps)
    head = params["model"]["embed_tokens"] if cfg.tie_word_embeddings else params["lm_head"]
    return linear(h, head).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Full forward


def forward(
    params: Params, tokens: jax.Array, config: LlamaConfig, *, attn_block: int = ATTN_BLOCK
) -> jax.Array:
    """Causal LM logits ``[B, T, V]`` (float32) for ``tokens [B, T]`` at positions ``0..T-1``."""
    *_, h = _blocks(params, tokens, config, attn_block)
    return _head(params, h, config)


def residual_stream(
    params: Params, tokens: jax.Array, config: LlamaConfig, *, attn_block: int = ATTN_BLOCK
) -> jax.Array:
    """Hidden states ``[L + 1, B, T, D]``: the embedding, then the residual after each block.

    Block ``l`` maps entry ``l`` to entry ``l + 1``; structured pruning compares them to rank
    blocks for removal (:mod:`jaxq.models.structure`).
    """
    return jnp.stack(list(_blocks(params, tokens, config, attn_block)))


def _blocks(params: Params, tokens: jax.Array, cfg: LlamaConfig, attn_block: int
            ) -> Iterator[jax.Array]:
    """The residual stream entering each block, then after the last one (a generator, so a
    forward holds one hidden state at a time)."""
    t = tokens.shape[1]
    cos, sin = rope_angles(jnp.arange(t)[None], cfg.head_dim, cfg.rope_theta)
    h = _embed(params, tokens)
    yield h
    for layer in params["model"]["layers"]:
        h = decoder_layer(layer, h, cos, sin, cfg, attn_block=attn_block)
        yield h


def decoder_layer(layer: Params, h: jax.Array, cos: jax.Array, sin: jax.Array,
                  config: LlamaConfig, *, attn_block: int = ATTN_BLOCK) -> jax.Array:
    """One decoder block on the residual stream ``h [B, T, D]`` at positions ``0..T-1`` (RoPE
    angles from :func:`rope_angles`): what the full forward runs per layer, on its own for
    callers that hold one layer at a time (streaming compression, :mod:`jaxq.recipes.stream`).
    """
    cfg = config
    x = rms_norm(h, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
    q, k, v = _qkv(layer["self_attn"], x, cos, sin, cfg)
    att = _causal_attention(q, k, v, attn_block)
    h = h + linear(att, layer["self_attn"]["o_proj"])
    x = rms_norm(h, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    return h + _mlp(layer["mlp"], x)


@functools.lru_cache(maxsize=32)
def make_apply_fn(config: LlamaConfig) -> Callable[[Params, jax.Array], jax.Array]:
    """The pure two-argument ``apply_fn(params, tokens) -> logits`` that the rest of jaxq uses.

    Cached per config: the same function object comes back, so ``jax.jit`` of it reuses
    compiled executables across callers (perplexity runs, calibration, the CLI).
    """

    def apply_fn(params: Params, tokens: jax.Array) -> jax.Array:
        return forward(params, tokens, config)

    return apply_fn


# ----------------------------------------------------------------------------------------------
# KV cache and generation


def init_cache(
    config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.float32
) -> Cache:
    """Zeroed per-layer K/V buffers ``[batch, max_len, num_kv_heads, head_dim]``."""
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for _ in range(config.num_layers)
    ]


def decode_step(
    params: Params,
    cache: Cache,
    tokens: jax.Array,
    pos: jax.Array | int,
    config: LlamaConfig,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
    """Run ``tokens [B, S]`` at positions ``pos..pos+S-1`` against the cache.

    Used both for the prefill (S = prompt length, pos = 0) and for one-token decode steps;
    ``pos + S`` must not exceed the cache length. Returns float32 logits ``[B, S, V]`` (``[B, 1,
    V]`` for the last position only with ``last_only``, which skips the head for the rest of a
    prefill) and the updated cache.
    """
    cfg = config
    b, s = tokens.shape
    max_len = cache[0]["k"].shape[1]
    pos = jnp.asarray(pos, jnp.int32)
    qpos = pos + jnp.arange(s, dtype=jnp.int32)
    cos, sin = rope_angles(qpos[None], cfg.head_dim, cfg.rope_theta)
    bias = _mask_bias(qpos, jnp.arange(max_len, dtype=jnp.int32))
    h = _embed(params, tokens)
    new_cache = []
    for layer, c in zip(params["model"]["layers"], cache, strict=True):
        x = rms_norm(h, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
        q, k, v = _qkv(layer["self_attn"], x, cos, sin, cfg)
        ck = lax.dynamic_update_slice(c["k"], k.astype(c["k"].dtype), (0, pos, 0, 0))
        cv = lax.dynamic_update_slice(c["v"], v.astype(c["v"].dtype), (0, pos, 0, 0))
        new_cache.append({"k": ck, "v": cv})
        att = _attend(q, ck.astype(q.dtype), cv.astype(q.dtype), bias)
        h = h + linear(att, layer["self_attn"]["o_proj"])
        x = rms_norm(h, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
        h = h + _mlp(layer["mlp"], x)
    if last_only:
        h = h[:, -1:]
    return _head(params, h, cfg), new_cache


def _identity(fn: Callable) -> Callable:
    return fn


@functools.partial(
    jax.jit,
    static_argnames=(
        "config", "max_new_tokens", "greedy", "eos_ids", "pad_id", "apply", "cache_dtype",
    ),
)
def _generate(
    params: Params,
    prompt: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    *,
    config: LlamaConfig,
    max_new_tokens: int,
    greedy: bool,
    eos_ids: tuple[int, ...],
    pad_id: int,
    apply: Callable[[StepFn], StepFn],
    cache_dtype: Any,
) -> jax.Array:
    b, p = prompt.shape
    step = apply(
        lambda prm, cache, toks, pos: decode_step(prm, cache, toks, pos, config, last_only=True)
    )

    def pick(logits: jax.Array, k: jax.Array) -> jax.Array:
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(k, logits / temperature, axis=-1).astype(jnp.int32)

    def is_eos(tok: jax.Array) -> jax.Array:
        if not eos_ids:
            return jnp.zeros_like(tok, bool)
        return jnp.any(tok[..., None] == jnp.asarray(eos_ids, jnp.int32), axis=-1)

    cache = init_cache(config, b, p + max_new_tokens, cache_dtype)
    logits, cache = step(params, cache, prompt, jnp.int32(0))
    tok = pick(logits[:, -1], jax.random.fold_in(key, 0))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)

    def cond(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done = state
        logits, cache = step(params, cache, tok[:, None], p + i - 1)
        nxt = pick(logits[:, -1], jax.random.fold_in(key, i))
        nxt = jnp.where(done, pad_id, nxt)
        out = lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, cache, out, done | is_eos(nxt)

    state = (jnp.int32(1), tok, cache, out, is_eos(tok))
    return lax.while_loop(cond, body, state)[3]


def generate(
    params: Params,
    config: LlamaConfig,
    prompt_tokens: Any,
    max_new_tokens: int,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    key: jax.Array | None = None,
    stop_at_eos: bool = True,
    eos_ids: Sequence[int] | None = None,
    apply: Callable[[StepFn], StepFn] | None = None,
    cache_dtype: Any = None,
) -> jax.Array:
    """Generate ``max_new_tokens`` ids after ``prompt_tokens`` (``[T]`` or ``[B, T]``).

    One jit-compiled program (per prompt shape and ``max_new_tokens``): a prefill through the
    KV cache, then a ``lax.while_loop`` of one-token steps that stops early once every row has
    produced any of ``eos_ids`` (default: ``config.eos_ids``; later slots hold the first of
    them), and after ``max_new_tokens`` in any case. Sampling uses ``temperature`` and ``key`` when
    ``greedy`` is false (a temperature <= 0 means greedy).
    ``apply`` transforms the step function ``(params, cache, tokens, pos) -> (logits, cache)``
    before use, e.g. ``jaxq.apply`` to run on compressed params; it defaults to identity.
    Returns int32 ids ``[B, max_new_tokens]`` (``[max_new_tokens]`` for a 1-D prompt).
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    eos = tuple(int(i) for i in (config.eos_ids if eos_ids is None else eos_ids))
    eos = tuple(dict.fromkeys(eos)) if stop_at_eos else ()
    greedy = greedy or temperature <= 0
    if cache_dtype is None:
        cache_dtype = jnp.float32
    out = _generate(
        params,
        prompt,
        jax.random.key(0) if key is None else key,
        jnp.float32(temperature),
        config=config,
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
        eos_ids=eos,
        pad_id=eos[0] if eos else 0,
        apply=_identity if apply is None else apply,
        cache_dtype=jnp.dtype(cache_dtype),
    )
    return out[0] if squeeze else out


def end_ids(config: LlamaConfig, tokenizer: Any = None) -> tuple[int, ...]:
    """The ids generation stops at: the config's EOS ids and the tokenizer's own EOS (a
    tokenizer_config.json may name an end token the model config does not)."""
    extra = getattr(tokenizer, "eos_id", None)
    return tuple(dict.fromkeys([*config.eos_ids, *(() if extra is None else (int(extra),))]))


def trim_at_end(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first of any of ``stops``."""
    stops = set(stops)
    for i, t in enumerate(ids):
        if t in stops:
            return list(ids[:i])
    return list(ids)


# ----------------------------------------------------------------------------------------------
# Params helpers


def init_params(
    key: jax.Array, config: LlamaConfig, *, dtype: Any = jnp.float32, scale: float = 0.02
) -> Params:
    """Random params (normal, std ``scale``; norms around 1) in the documented pytree layout."""
    cfg = config
    keys = (jax.random.fold_in(key, i) for i in itertools.count())

    def dense(out_f: int, in_f: int, bias: bool) -> Params:
        p = {"weight": (scale * jax.random.normal(next(keys), (out_f, in_f))).astype(dtype)}
        if bias:
            p["bias"] = (scale * jax.random.normal(next(keys), (out_f,))).astype(dtype)
        return p

    def norm() -> Params:
        return {"weight": (1.0 + 0.1 * jax.random.normal(next(keys), (cfg.hidden_size,)))
                .astype(dtype)}

    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    layers = []
    for _ in range(cfg.num_layers):
        ab, mb = cfg.attention_bias, cfg.mlp_bias
        layers.append({
            "self_attn": {
                "q_proj": dense(cfg.num_heads * hd, d, ab),
                "k_proj": dense(cfg.num_kv_heads * hd, d, ab),
                "v_proj": dense(cfg.num_kv_heads * hd, d, ab),
                "o_proj": dense(d, cfg.num_heads * hd, ab),
            },
            "mlp": {
                "gate_proj": dense(f, d, mb),
                "up_proj": dense(f, d, mb),
                "down_proj": dense(d, f, mb),
            },
            "input_layernorm": norm(),
            "post_attention_layernorm": norm(),
        })
    params: Params = {
        "model": {
            "embed_tokens": {"weight": jax.random.normal(next(keys), (cfg.vocab_size, d))
                             .astype(dtype)},
            "layers": layers,
            "norm": norm(),
        }
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = dense(cfg.vocab_size, d, False)
    return params


def rope_row_permutation(rows: int, n_heads: int, to_interleaved: bool) -> np.ndarray:
    """Row index map of a Q/K weight (or bias) between the half-split (HF) and interleaved
    (llama.cpp) RoPE layouts: new row ``i`` is old row ``perm[i]``.

    llama.cpp's converter maps HF row ``(head, half, i)`` to ``(head, i, half)``; this is that
    permutation (``to_interleaved=True``) or its inverse. The exporters use it too, on the rows
    of compressed leaves.
    """
    d = rows // n_heads
    idx = np.arange(rows)
    if to_interleaved:
        return idx.reshape(n_heads, 2, d // 2).swapaxes(1, 2).reshape(rows)
    return idx.reshape(n_heads, d // 2, 2).swapaxes(1, 2).reshape(rows)


def convert_rope_layout(
    params: Params, config: LlamaConfig, interleaved: bool
) -> tuple[Params, LlamaConfig]:
    """Permute Q/K rows so the model runs with ``rope_interleaved=interleaved``; same logits.

    Use ``interleaved=False`` to turn GGUF (llama.cpp) weights into the HF/MLX layout and
    ``interleaved=True`` for the reverse (what a GGUF exporter must write).
    """
    if config.rope_interleaved == interleaved:
        return params, config
    layers = []
    for layer in params["model"]["layers"]:
        attn = dict(layer["self_attn"])
        for name, n in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
            attn[name] = {k: jnp.asarray(v)[rope_row_permutation(v.shape[0], n, interleaved)]
                          for k, v in attn[name].items()}
        layers.append({**layer, "self_attn": attn})
    new = {**params, "model": {**params["model"], "layers": layers}}
    return new, dataclasses.replace(config, rope_interleaved=interleaved)


def param_count(params: Params) -> int:
    """Number of scalar parameters in the pytree (a tied embedding is counted once)."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def param_shapes(config: LlamaConfig) -> Params:
    """The params pytree of ``config`` as ``jax.ShapeDtypeStruct`` leaves (no allocation)."""
    return jax.eval_shape(functools.partial(init_params, config=config), jax.random.key(0))


def check_params(params: Params, config: LlamaConfig) -> list[str]:
    """Differences between ``params`` and the tree ``config`` implies (empty when they agree)."""
    want = {
        jax.tree_util.keystr(k, simple=True, separator="/"): v.shape
        for k, v in jax.tree_util.tree_leaves_with_path(param_shapes(config))
    }
    have = {
        jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
        for k, v in jax.tree_util.tree_leaves_with_path(params)
    }
    problems = [f"missing {k}" for k in want if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [
        f"{k} has shape {have[k]}, expected {want[k]}"
        for k in want
        if k in have and have[k] != want[k]
    ]
    return problems


def _present(path: str, paths: set[str]) -> str | None:
    return path if path in paths else None


def llama_scale_groups(params: Any, *, head_dim: int | None = None) -> list[ScaleGroup]:
    """AWQ/SmoothQuant scale groups of this module's layout, by parameter name: an explicit
    override (``AWQ(groups=llama_scale_groups)``); the default, the groups found from the
    trace by :func:`jaxq.calibrate`, is the same for this model (a test checks it).

    ``q/k/v_proj`` <- ``input_layernorm``; ``gate/up_proj`` <- ``post_attention_layernorm``;
    ``down_proj`` <- rows of ``up_proj``; ``o_proj`` <- rows of ``v_proj`` (with grouped-query
    attention the scale is tied across the heads sharing a kv head, which needs ``head_dim``;
    without it, ``o_proj`` keeps its scale as an input scale).
    """
    flat = flatten_with_paths(params)[0]
    paths = {p for p, _ in flat}
    shapes = {p: np.shape(leaf) for p, leaf in flat}
    prefixes = sorted({m.group(1) for p in paths
                       if (m := re.match(r"(.*/)self_attn/q_proj/weight$", p))})
    groups = []
    for pre in prefixes:
        def p(s: str, pre: str = pre) -> str:
            return pre + s

        attn = [p(f"self_attn/{n}_proj/weight") for n in "qkv"]
        mlp = [p(f"mlp/{n}_proj/weight") for n in ("gate", "up")]
        if all(a in paths for a in attn) and p("input_layernorm/weight") in paths:
            groups.append(ScaleGroup(sites=tuple(attn), prev=p("input_layernorm/weight"),
                                     prev_kind="norm", prev_bias=None))
        if all(a in paths for a in mlp) and p("post_attention_layernorm/weight") in paths:
            groups.append(ScaleGroup(sites=tuple(mlp), prev=p("post_attention_layernorm/weight"),
                                     prev_kind="norm", prev_bias=None))
        if p("mlp/down_proj/weight") in paths and p("mlp/up_proj/weight") in paths:
            groups.append(ScaleGroup(sites=(p("mlp/down_proj/weight"),),
                                     prev=p("mlp/up_proj/weight"), prev_kind="linear_rows",
                                     prev_bias=_present(p("mlp/up_proj/bias"), paths)))
        o, v = p("self_attn/o_proj/weight"), p("self_attn/v_proj/weight")
        if o in paths and v in paths:
            k_o, n_v = shapes[o][-1], shapes[v][0]
            v_bias = _present(p("self_attn/v_proj/bias"), paths)
            if k_o == n_v:
                groups.append(ScaleGroup(sites=(o,), prev=v, prev_kind="linear_rows",
                                         prev_bias=v_bias))
            elif head_dim is not None and k_o % n_v == 0:
                groups.append(ScaleGroup(sites=(o,), prev=v, prev_kind="linear_rows",
                                         prev_bias=v_bias, tie=(k_o // n_v, head_dim)))
            else:
                groups.append(ScaleGroup(sites=(o,)))
    return groups

