"""Tiny models in styles that are not Llama, written as their users write them, each with the
scale groups a correct trace must find (``folded``: site -> producer) and the sites whose
scale cannot be folded (``unfolded``: their input passes through a nonlinearity)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

D, F, H = 32, 64, 2  # width, MLP width, heads


@dataclasses.dataclass
class Zoo:
    name: str
    apply_fn: Callable
    params: Any
    batches: list
    folded: dict[str, str]
    unfolded: tuple[str, ...]
    mask: list | None = None
    where: Any = None  # the leaves to quantize (None: jaxq's default rule)


def _rng(seed):
    r = np.random.default_rng(seed)
    return lambda *s, scale=1.0: jnp.asarray(r.normal(size=s).astype(np.float32) * scale)


def _ln(x, g, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / jnp.sqrt(v + eps) * g + b


def _rms(x, g, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * g


def _outliers(x):
    return x.at[..., jnp.array([3, 17])].multiply(12.0)


# --- GPT-2 block: fused c_attn, Conv1D-style [in, out] weights with biases ---------------------

def gpt2_apply(p, x):
    b, t, _ = x.shape
    h = _ln(x, p["ln_1"]["g"], p["ln_1"]["b"])
    qkv = h @ p["attn"]["c_attn"]["w"] + p["attn"]["c_attn"]["b"]
    q, k, v = (a.reshape(b, t, H, D // H) for a in jnp.split(qkv, 3, axis=-1))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, D)
    x = x + o @ p["attn"]["c_proj"]["w"] + p["attn"]["c_proj"]["b"]
    h = _ln(x, p["ln_2"]["g"], p["ln_2"]["b"])
    u = jax.nn.gelu(h @ p["mlp"]["c_fc"]["w"] + p["mlp"]["c_fc"]["b"])
    return x + u @ p["mlp"]["c_proj"]["w"] + p["mlp"]["c_proj"]["b"]


def gpt2() -> Zoo:
    f = _rng(0)
    params = {"ln_1": {"g": 1 + f(D, scale=0.1), "b": f(D, scale=0.1)},
              "attn": {"c_attn": {"w": f(D, 3 * D, scale=0.2), "b": f(3 * D, scale=0.1)},
                       "c_proj": {"w": f(D, D, scale=0.2), "b": f(D, scale=0.1)}},
              "ln_2": {"g": 1 + f(D, scale=0.1), "b": f(D, scale=0.1)},
              "mlp": {"c_fc": {"w": f(D, F, scale=0.2), "b": f(F, scale=0.1)},
                      "c_proj": {"w": f(F, D, scale=0.1), "b": f(D, scale=0.1)}}}
    batches = [_outliers(f(2, 8, D)) for _ in range(2)]
    folded = {"attn/c_attn/w": "ln_1/g", "attn/c_proj/w": "attn/c_attn/w",
              "mlp/c_fc/w": "ln_2/g"}
    return Zoo("gpt2", gpt2_apply, params, batches, folded, ("mlp/c_proj/w",))


# --- a sliding-window decoder with QK-norm and a GELU MLP, torch-style [out, in] weights -------

WINDOW = 3


def swa_apply(p, tokens):
    b, t = tokens.shape
    x = p["embed"][tokens]
    for lp in p["layers"]:
        h = _rms(x, lp["attn_norm"])
        q, k, v = ((h @ lp[n]["weight"].T).reshape(b, t, H, D // H) for n in ("wq", "wk", "wv"))
        q, k = _rms(q, lp["q_norm"]), _rms(k, lp["k_norm"])
        i = jnp.arange(t)
        allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < WINDOW)
        s = jnp.where(allowed, jnp.einsum("bqhd,bkhd->bhqk", q, k), -jnp.inf)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, D)
        x = x + o @ lp["wo"]["weight"].T
        h = _rms(x, lp["mlp_norm"])
        x = x + jax.nn.gelu(h @ lp["up"]["weight"].T) @ lp["down"]["weight"].T
    return _rms(x, p["norm"]) @ p["embed"].T


def swa() -> Zoo:
    f = _rng(1)
    layer = lambda: {"attn_norm": 1 + f(D, scale=0.1),  # noqa: E731
                     **{n: {"weight": f(D, D, scale=0.2)} for n in ("wq", "wk", "wv", "wo")},
                     "q_norm": 1 + f(D // H, scale=0.1), "k_norm": 1 + f(D // H, scale=0.1),
                     "mlp_norm": 1 + f(D, scale=0.1), "up": {"weight": f(F, D, scale=0.2)},
                     "down": {"weight": f(D, F, scale=0.1)}}
    params = {"embed": _outliers(f(40, D)), "layers": [layer(), layer()],
              "norm": 1 + f(D, scale=0.1)}
    r = np.random.default_rng(2)
    batches = [jnp.asarray(r.integers(0, 40, (2, 8))) for _ in range(2)]
    folded, unfolded = {}, []
    for i in range(2):
        pre = f"layers/{i}/"
        folded |= {pre + f"{n}/weight": pre + "attn_norm" for n in ("wq", "wk", "wv")}
        folded |= {pre + "wo/weight": pre + "wv/weight", pre + "up/weight": pre + "mlp_norm"}
        unfolded.append(pre + "down/weight")
    return Zoo("swa", swa_apply, params, batches, folded, tuple(unfolded))


# --- a BERT-style encoder: embeddings, LayerNorm, biases, a padding mask ---------------------

def bert_apply(p, tokens, mask):
    b, t = tokens.shape
    x = p["word_emb"][tokens] + p["pos_emb"][:t][None] + p["type_emb"][0]
    x = _ln(x, p["emb_ln"]["scale"], p["emb_ln"]["bias"])
    a = p["attn"]
    q, k, v = ((x @ a[n]["kernel"] + a[n]["bias"]).reshape(b, t, H, D // H)
               for n in ("query", "key", "value"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // H)
    s = jnp.where(mask[:, None, None, :] > 0, s, -1e9)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, D)
    x = _ln(x + o @ a["out"]["kernel"] + a["out"]["bias"], p["ln1"]["scale"], p["ln1"]["bias"])
    u = jax.nn.gelu(x @ p["ffn"]["up"]["kernel"] + p["ffn"]["up"]["bias"])
    x = _ln(x + u @ p["ffn"]["down"]["kernel"] + p["ffn"]["down"]["bias"], p["ln2"]["scale"],
            p["ln2"]["bias"])
    return x


def bert() -> Zoo:
    f = _rng(3)
    dense = lambda i, o, s=0.2: {"kernel": f(i, o, scale=s), "bias": f(o, scale=0.1)}  # noqa
    params = {"word_emb": _outliers(f(40, D)), "pos_emb": f(16, D, scale=0.1),
              "type_emb": f(2, D, scale=0.1),
              "emb_ln": {"scale": 1 + f(D, scale=0.1), "bias": f(D, scale=0.1)},
              "attn": {n: dense(D, D) for n in ("query", "key", "value", "out")},
              "ln1": {"scale": 1 + f(D, scale=0.1), "bias": f(D, scale=0.1)},
              "ffn": {"up": dense(D, F), "down": dense(F, D, 0.1)},
              "ln2": {"scale": 1 + f(D, scale=0.1), "bias": f(D, scale=0.1)}}
    r = np.random.default_rng(4)
    batches, masks = [], []
    for t, real in ((8, (8, 5)), (6, (3, 6))):  # ragged lengths, padded rows
        m = (np.arange(t)[None, :] < np.array(real)[:, None]).astype(np.int32)
        tok = r.integers(1, 40, (2, t)) * m
        batches.append((jnp.asarray(tok), jnp.asarray(m)))
        masks.append(jnp.asarray(m))
    # Post-LN: each LayerNorm's output also feeds the residual sum, so no scale can be folded
    # into it; only the value -> out path folds.
    folded = {"attn/out/kernel": "attn/value/kernel"}
    unfolded = (*(f"attn/{n}/kernel" for n in ("query", "key", "value")), "ffn/up/kernel",
                "ffn/down/kernel")
    return Zoo("bert", bert_apply, params, batches, folded, unfolded, masks, where="kernel")


# --- Flax NNX: LayerNorm with biases, Linear layers, a SiLU-gated MLP -------------------------

def nnx_model() -> Zoo:
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln = nnx.LayerNorm(D, rngs=rngs)
            self.gate = nnx.Linear(D, F, rngs=rngs)
            self.up = nnx.Linear(D, F, rngs=rngs)
            self.down = nnx.Linear(F, D, rngs=rngs)
            self.ln_out = nnx.LayerNorm(D, rngs=rngs)
            self.head = nnx.Linear(D, 8, rngs=rngs)

        def __call__(self, x):
            h = self.ln(x)
            x = x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))
            return self.head(jax.nn.relu(self.ln_out(x)))

    graphdef, state = nnx.split(Block(nnx.Rngs(0)))
    state = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape),
                         state)  # non-trivial LayerNorm scales and biases
    f = _rng(6)
    batches = [_outliers(f(2, 8, D)) for _ in range(2)]
    folded = {"gate/kernel": "ln/scale", "up/kernel": "ln/scale", "down/kernel": "up/kernel"}
    return Zoo("nnx", lambda s, x: nnx.merge(graphdef, s)(x), state, batches, folded,
               ("head/kernel",))


# --- Equinox: an MLP with a LayerNorm, vmapped over tokens -----------------------------------

def eqx_model() -> Zoo:
    import equinox as eqx

    class MLP(eqx.Module):
        norm: eqx.nn.LayerNorm
        fc1: eqx.nn.Linear
        fc2: eqx.nn.Linear
        fc3: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.norm = eqx.nn.LayerNorm(D)
            self.fc1 = eqx.nn.Linear(D, F, key=k1)
            self.fc2 = eqx.nn.Linear(F, F, key=k2)
            self.fc3 = eqx.nn.Linear(F, 8, key=k3)

        def __call__(self, x):
            h = self.fc1(self.norm(x))
            return self.fc3(jax.nn.relu(self.fc2(h)))

    model = MLP(jax.random.key(7))
    params, static = eqx.partition(model, eqx.is_array)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(8), a.shape),
                          params)

    def apply(p, x):
        return jax.vmap(jax.vmap(eqx.combine(p, static)))(x)

    f = _rng(9)
    batches = [_outliers(f(2, 8, D)) for _ in range(2)]
    folded = {"fc1/weight": "norm/weight", "fc2/weight": "fc1/weight"}
    return Zoo("equinox", apply, params, batches, folded, ("fc3/weight",))


ZOO: dict[str, Callable[[], Zoo]] = {"gpt2": gpt2, "swa": swa, "bert": bert, "nnx": nnx_model,
                                     "equinox": eqx_model}
