"""The train step: accumulation equals the whole batch, compute dtype, the params transform's
state trains, compressed leaves keep their integer codes; the data source is deterministic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq
from jaxq.train import TokenWindows, init_state, make_train_step, state_params


def _model():
    k = jax.random.key(0)
    params = {"w1": jax.random.normal(k, (8, 16)) * 0.3,
              "w2": jax.random.normal(jax.random.fold_in(k, 1), (16, 4)) * 0.3}
    x = jax.random.normal(jax.random.fold_in(k, 2), (8, 8))
    y = jax.random.normal(jax.random.fold_in(k, 3), (8, 4))
    return params, {"x": x, "y": y}


def _loss(p, batch):
    h = jnp.tanh(batch["x"] @ p["w1"].astype(batch["x"].dtype))
    return jnp.mean((h @ p["w2"].astype(h.dtype) - batch["y"]) ** 2)


def test_accumulation_equals_whole_batch():
    params, batch = _model()
    opt = optax.sgd(0.1)
    outs = []
    for accum in (1, 2, 4):
        state = init_state(params, opt)
        state, m = jax.jit(make_train_step(_loss, opt, accum_steps=accum))(state, batch)
        outs.append((state_params(state)[0], m["loss"]))
    for p, loss in outs[1:]:
        np.testing.assert_allclose(loss, outs[0][1], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="accum_steps=3"):
        make_train_step(_loss, opt, accum_steps=3)(init_state(params, opt), batch)


def test_compute_dtype_bf16_keeps_float32_master():
    params, batch = _model()
    opt = optax.sgd(0.1)
    seen = []

    def loss(p, b):
        seen.append(p["w1"].dtype)
        return _loss(p, {"x": b["x"].astype(p["w1"].dtype), "y": b["y"]})

    state = init_state(params, opt)
    s16, m16 = make_train_step(loss, opt, compute_dtype=jnp.bfloat16)(state, batch)
    s32, m32 = make_train_step(loss, opt)(state, batch)
    assert seen == [jnp.bfloat16, jnp.float32]
    assert m16["loss"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.trainable))
    np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=3e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # it really ran in bf16


def test_transform_state_trains_and_compressed_codes_stay_frozen():
    params, batch = _model()
    # float32 scales to train (Adam's epsilon underflows in float16)
    params = {"w1": jaxq.quantize(params["w1"], bits=4, group_size=8, axis=0,
                                  scale_dtype=jnp.float32),
              "w2": params["w2"]}
    extra = {"gain": jnp.ones((4,))}

    def transform(p, s):
        return {"w1": p["w1"].dequantize(), "w2": p["w2"] * s["gain"]}

    opt = optax.adam(1e-2)
    state = init_state(params, opt, extra=extra)
    step = jax.jit(make_train_step(_loss, opt, transform=transform))
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    p, e = state_params(state)
    assert losses[-1] < losses[0]
    assert float(jnp.abs(e["gain"] - 1).max()) > 0           # the transform's state trained
    assert isinstance(p["w1"], jaxq.QArray)
    np.testing.assert_array_equal(p["w1"].packed, params["w1"].packed)  # codes frozen
    assert float(jnp.abs(p["w1"].scales - params["w1"].scales).max()) > 0  # scales trained
    assert state.trainable["params"]["w1"].packed is None
    # trainable=None: only the compressed leaf's floats train, the plain array is frozen
    state = init_state(params, opt, trainable=None)
    assert state.trainable["params"]["w2"] is None


def test_token_windows_deterministic_epochs():
    rows = np.arange(10 * 4).reshape(10, 4)
    data = TokenWindows(rows, 4, seed=3)
    first = [data(s)["index"] for s in range(5)]  # 20 windows: two epochs of 10
    again = TokenWindows(rows, 4, seed=3)
    for s in (3, 0, 4):
        np.testing.assert_array_equal(again(s)["index"], first[s])
    flat = np.concatenate(first)
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:])  # each epoch reshuffled
    np.testing.assert_array_equal(data(1)["tokens"], rows[first[1]])
    assert data.position(3) == 12 and data.tokens_per_batch == 16
    with pytest.raises(ValueError, match="integer token ids"):
        TokenWindows(rows.astype(float), 2)
