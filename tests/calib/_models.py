"""Small models in four styles for the calibration tests, each with a hand-written reference
that captures every site's input, so the interpreter is checked against an independent path.

A case holds ``apply_fn``, ``params``, calibration ``batches``, the ``sites`` expected
(``path -> (axis, stacked)``) and ``capture(params, *inputs) -> {path: rows}`` where rows are
``[rows, K]`` (for a stacked leaf: a list, one entry per layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

import jaxq


@dataclasses.dataclass
class Case:
    name: str
    apply_fn: Callable
    params: Any
    batches: list
    sites: dict[str, tuple[int, bool]]
    capture: Callable[..., dict]
    transform: Any = dataclasses.field(
        default_factory=lambda: jaxq.RTN(bits=3, group_size=8))


def dequantized(params: Any) -> Any:
    return jax.tree.map(lambda x: x.dequantize() if isinstance(x, jaxq.QArray) else x, params,
                        is_leaf=lambda x: isinstance(x, jaxq.QArray))


def rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


# --- (a) hand-written function MLP ---------------------------------------------------------

def mlp_apply(p, x):
    h = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"])
    h = jnp.tanh(h @ p["l2"]["w"])
    return jnp.einsum("btk,nk->btn", h, p["head"]["w"])


def mlp_capture(p, x):
    h1 = jax.nn.relu(x @ p["l1"]["w"] + p["l1"]["b"])
    h2 = jnp.tanh(h1 @ p["l2"]["w"])
    return {"l1/w": rows(x), "l2/w": rows(h1), "head/w": rows(h2)}


def mlp_case() -> Case:
    k = jax.random.split(jax.random.key(0), 6)
    params = {"l1": {"w": jax.random.normal(k[0], (16, 32)) / 4,
                     "b": jax.random.normal(k[1], (32,)) / 4},
              "l2": {"w": jax.random.normal(k[2], (32, 24)) / 5},
              "head": {"w": jax.random.normal(k[3], (8, 24)) / 5}}
    batches = [jax.random.normal(k[4 + i], (2, 4, 16)) for i in range(2)]
    sites = {"l1/w": (-2, False), "l2/w": (-2, False), "head/w": (-1, False)}
    return Case("mlp", mlp_apply, params, batches, sites, mlp_capture)


# --- (b) flax.nnx Transformer block --------------------------------------------------------

class NNXBlock(nnx.Module):
    def __init__(self, d: int, heads: int, f: int, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, qkv_features=d,
                                           decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, f, rngs=rngs)
        self.down = nnx.Linear(f, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


def _ln(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def nnx_capture(s, x):
    s = nnx.to_pure_dict(s) if hasattr(nnx, "to_pure_dict") else s
    a = s["attn"]
    h = _ln(x, s["ln1"])
    q, k, v = (jnp.einsum("bsd,dhk->bshk", h, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(q.shape[-1]), k)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
    x = x + jnp.einsum("bqhd,hdo->bqo", o, a["out"]["kernel"]) + a["out"]["bias"]
    h2 = _ln(x, s["ln2"])
    u = jax.nn.gelu(h2 @ s["up"]["kernel"] + s["up"]["bias"])
    return {"attn/query/kernel": rows(h), "attn/key/kernel": rows(h),
            "attn/value/kernel": rows(h), "attn/out/kernel": o.reshape(-1, 16),
            "up/kernel": rows(h2), "down/kernel": rows(u)}


def nnx_case() -> Case:
    model = NNXBlock(16, 2, 32, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    ks = jax.random.split(jax.random.key(1), 2)
    batches = [jax.random.normal(k, (2, 4, 16)) for k in ks]
    sites = {f"attn/{n}/kernel": (-3, False) for n in ("query", "key", "value")}
    sites |= {"attn/out/kernel": (-2, False), "up/kernel": (-2, False),
              "down/kernel": (-2, False)}
    return Case("nnx", lambda s, x: nnx.merge(graphdef, s)(x), state, batches, sites,
                nnx_capture)


# --- (c) flax.linen CNN --------------------------------------------------------------------

class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="conv")(x))
        x = x.mean(axis=(1, 2))
        x = nn.relu(nn.Dense(32, name="fc1")(x))
        return nn.Dense(8, name="fc2")(x)


def linen_capture(v, x):
    p = v["params"]
    c = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    pooled = jax.nn.relu(c + p["conv"]["bias"]).mean(axis=(1, 2))
    h = jax.nn.relu(pooled @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return {"params/conv/kernel": rows(x), "params/fc1/kernel": pooled, "params/fc2/kernel": h}


def linen_case() -> Case:
    model = LinenCNN()
    ks = jax.random.split(jax.random.key(2), 3)
    batches = [jax.random.normal(k, (2, 5, 5, 8)) for k in ks[:2]]
    variables = model.init(ks[2], batches[0])
    sites = {"params/conv/kernel": (-2, False), "params/fc1/kernel": (-2, False),
             "params/fc2/kernel": (-2, False)}
    return Case("linen", model.apply, variables, batches, sites, linen_capture)


# --- (d) stacked layers under scan, checkpoint, jit, custom_jvp and cond ----------------------

@jax.jit
def _inner(h, w):
    return jax.nn.relu(h @ w)  # pjit around a custom_jvp activation


def _block(h, lp):
    u = _inner(h * lp["norm"], lp["w_in"])
    return h + jax.nn.gelu(u) @ lp["w_out"].T


def scan_apply(p, tokens):
    h = p["embed"][tokens]
    h, _ = jax.lax.scan(lambda h, lp: (jax.checkpoint(_block)(h, lp), None), h, p["layers"])
    return jax.lax.cond(jnp.sum(h) > 0, lambda h: h @ p["head"], lambda h: -(h @ p["head"]), h)


def scan_capture(p, tokens):
    h = p["embed"][tokens]
    lay = p["layers"]
    x_in, x_out = [], []
    for i in range(lay["w_in"].shape[0]):
        hs = h * lay["norm"][i]
        u = jax.nn.gelu(jax.nn.relu(hs @ lay["w_in"][i]))
        x_in.append(rows(hs))
        x_out.append(rows(u))
        h = h + u @ lay["w_out"][i].T
    return {"layers/w_in": x_in, "layers/w_out": x_out, "head": rows(h)}


def scan_case(n_layers: int = 3) -> Case:
    k = jax.random.split(jax.random.key(3), 8)
    d, f = 16, 24
    params = {"embed": jax.random.normal(k[0], (32, d)),
              "layers": {"w_in": jax.random.normal(k[1], (n_layers, d, f)) / 4,
                         "w_out": jax.random.normal(k[2], (n_layers, d, f)) / 5,
                         "norm": 1 + jax.random.normal(k[3], (n_layers, d)) / 10},
              "head": jax.random.normal(k[4], (d, 8)) / 4}
    batches = [jax.random.randint(k[5 + i], (2, 4), 0, 32) for i in range(2)]
    sites = {"layers/w_in": (-2, True), "layers/w_out": (-1, True), "head": (-2, False)}
    return Case("scan", scan_apply, params, batches, sites, scan_capture)


CASES: dict[str, Callable[[], Case]] = {
    "mlp": mlp_case, "nnx": nnx_case, "linen": linen_case, "scan": scan_case}
