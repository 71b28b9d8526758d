"""Teachers: frozen (no gradient reaches them), and top-k cached on disk once then streamed,
giving the live teacher's loss; the cache is written atomically."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import distill
from jaxq.models.llama import make_apply_fn

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from _tiny import CFG, setup  # noqa: E402

K = 8


def test_frozen_teacher_passes_no_gradient():
    _, teacher, data = setup()
    tokens = jnp.asarray(data(0)["tokens"])
    g = jax.jit(jax.grad(lambda t: jnp.sum(t(tokens) ** 2)))(teacher)
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g))
    assert len(jax.tree.leaves(teacher)) == len(jax.tree.leaves(teacher.params))  # a pytree


def _live_loss(params, batch, teacher):
    logits = make_apply_fn(CFG)(params, batch["tokens"])
    return distill.topk_kd(logits, teacher.topk(batch["tokens"], K))


def _cached_loss(params, batch):
    logits = make_apply_fn(CFG)(params, batch["tokens"])
    return distill.topk_kd(logits, batch["teacher"])


def test_cached_topk_streams_the_live_teachers_loss(tmp_path):
    student, teacher, data = setup()
    student = jax.tree.map(lambda x: x * 0.9, student)
    cache = distill.cache_topk(teacher, data.windows, tmp_path / "topk", k=K, chunk=24)
    assert len(cache) == len(data.windows) and cache.k == K
    # the stored rows are the live teacher's, window by window (chunk 24 pads the last one)
    live = teacher.topk(jnp.asarray(data.windows[60:64]), K)
    got = cache.lookup(np.arange(60, 64))
    np.testing.assert_array_equal(got.indices, live.indices)
    np.testing.assert_allclose(got.logprobs, live.logprobs, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(got.log_tail, live.log_tail, rtol=1e-5)

    # streamed batches give the live teacher's loss, batch by batch (different windows each)
    streamed = cache.attach(data)
    live_fn, cached_fn = jax.jit(_live_loss), jax.jit(_cached_loss)
    for step in range(4):
        batch = streamed(step)
        np.testing.assert_array_equal(batch["tokens"], data(step)["tokens"])
        np.testing.assert_allclose(cached_fn(student, batch),
                                   live_fn(student, data(step), teacher), rtol=1e-5)


def test_cache_is_atomic(tmp_path):
    calls = []

    def failing(tokens):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("teacher died")
        return jnp.zeros((*tokens.shape, 16))

    windows = np.zeros((8, 4), np.int32)
    with pytest.raises(Exception, match="teacher died"):  # a runtime error, mid-way
        distill.cache_topk(lambda t: jax.pure_callback(
            failing, jax.ShapeDtypeStruct((*t.shape, 16), jnp.float32), t),
            windows, tmp_path / "c", k=2, chunk=2)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary
    with pytest.raises(FileNotFoundError, match="not a complete"):
        distill.TopKCache(tmp_path / "c")
    distill.cache_topk(lambda t: jnp.zeros((*t.shape, 16)), windows, tmp_path / "c", k=2)
    with pytest.raises(FileExistsError):
        distill.cache_topk(lambda t: jnp.zeros((*t.shape, 16)), windows, tmp_path / "c", k=2)
