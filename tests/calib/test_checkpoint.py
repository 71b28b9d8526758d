"""Resumable sequential calibration: a run interrupted after layer k and resumed from its
LayerCheckpoint ends bit-identical to an uninterrupted run, without recomputing the layers it
read back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tinyllama import tiny_llama

import jaxq
from jaxq.calib import LayerCheckpoint
from jaxq.calib.checkpoint import layer_of
from jaxq.models.llama import make_apply_fn


class Interrupted(Exception):
    pass


class StopsAfter(LayerCheckpoint):
    """Raises once ``layers`` layers are on disk: a kill right after a checkpoint."""

    def __init__(self, directory, layers: int) -> None:
        super().__init__(directory)
        self.layers = layers

    def flush(self) -> None:
        super().flush()
        if len(self.entries()) >= self.layers:
            raise Interrupted


class CountsCalls:
    """A GPTQ wrapper that records the paths it compresses (to see what a resume skips)."""

    def __init__(self, inner) -> None:
        self.inner, self.paths = inner, []

    def required_stats(self, path, leaf):
        return self.inner.required_stats(path, leaf)

    def check_patterns(self, params):
        self.inner.check_patterns(params)

    def apply_leaf(self, path, leaf, **kw):
        self.paths.append(path)
        return self.inner.apply_leaf(path, leaf, **kw)


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_bit_identical(a, b) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), f"{k} differs"


@pytest.fixture(scope="module")
def setup():
    cfg, params = tiny_llama(3, num_layers=4, scale=0.08)
    apply_fn = make_apply_fn(cfg)
    tokens = jax.random.randint(jax.random.key(1), (6, 24), 0, cfg.vocab_size)
    batches = [(tokens[i:i + 2],) for i in range(0, 6, 2)]
    gptq = jaxq.GPTQ(bits=3, group_size=32)
    ref, _ = jaxq.calibrate(apply_fn, params, batches, gptq, progress=False)
    return apply_fn, params, batches, gptq, ref


@pytest.mark.parametrize("k", [1, 3])
def test_interrupted_after_layer_k_resumes_bit_identical(setup, tmp_path, k):
    apply_fn, params, batches, gptq, ref = setup
    work = tmp_path / "work"
    with pytest.raises(Interrupted):
        jaxq.calibrate(apply_fn, params, batches, gptq, progress=False,
                       checkpoint=StopsAfter(work, k))
    store = LayerCheckpoint(work)
    assert len(store.entries()) == k and len(store) == 7 * k  # q k v o gate up down
    counted = CountsCalls(gptq)
    out, stats = jaxq.calibrate(apply_fn, params, batches, counted, progress=False,
                                checkpoint=store)
    store.flush()
    _assert_bit_identical(out, ref)
    # The layers on disk were read back, not recomputed; the rest were.
    done = {f"model/layers/{i}" for i in range(k)}
    redone = {layer_of(p) for p in counted.paths if p.endswith("_proj/weight")}
    assert not redone & done, redone
    assert {f"model/layers/{i}" for i in range(k, 4)} <= redone
    assert not any(p.startswith(tuple(d + "/" for d in done)) for p in stats)
    # The resumed run checkpointed the rest: a third run reads every layer back.
    again = CountsCalls(gptq)
    out3, _ = jaxq.calibrate(apply_fn, params, batches, again, progress=False,
                             checkpoint=LayerCheckpoint(work))
    assert not [p for p in again.paths if p.endswith("_proj/weight")]
    _assert_bit_identical(out3, ref)


def test_a_kill_mid_write_leaves_nothing_read(setup, tmp_path):
    """A half-written entry (the temporary sibling a kill during a write leaves) is ignored."""
    apply_fn, params, batches, gptq, ref = setup
    work = tmp_path / "work"
    with pytest.raises(Interrupted):
        jaxq.calibrate(apply_fn, params, batches, gptq, progress=False,
                       checkpoint=StopsAfter(work, 1))
    debris = work / ".00001.tmp-xyz"
    debris.mkdir()
    (debris / "manifest.json").write_text("{half")
    store = LayerCheckpoint(work)
    assert len(store) == 7
    out, _ = jaxq.calibrate(apply_fn, params, batches, gptq, progress=False, checkpoint=store)
    _assert_bit_identical(out, ref)


def test_stacked_slices_checkpoint_per_layer(tmp_path):
    """A scanned model's stacked weight is checkpointed slice by slice (``path@i``)."""
    w = jax.random.normal(jax.random.key(0), (3, 64, 64)) * 0.1

    def apply_fn(p, x):
        def body(h, wi):
            return jnp.tanh(h @ wi.T), None
        return jax.lax.scan(body, x, p["w"])[0]

    xs = [jax.random.normal(jax.random.key(i), (8, 64)) for i in range(2)]
    rtn = jaxq.GPTQ(bits=4, group_size=32, where="w")
    ref, _ = jaxq.calibrate(apply_fn, {"w": w}, xs, rtn, progress=False)
    with pytest.raises(Interrupted):
        jaxq.calibrate(apply_fn, {"w": w}, xs, rtn, progress=False,
                       checkpoint=StopsAfter(tmp_path, 2))
    store = LayerCheckpoint(tmp_path)
    assert store.load("w@0") is not None and store.load("w@1") is not None
    assert store.load("w@2") is None
    out, _ = jaxq.calibrate(apply_fn, {"w": w}, xs, rtn, progress=False, checkpoint=store)
    _assert_bit_identical(out, ref)


@pytest.mark.slow
def test_collect_mode_resumes_its_statistics(setup, tmp_path):
    """AWQ+GPTQ (collect mode): the statistics pass checkpoints each layer's statistics; a
    resumed run collects only the missing ones and ends bit-identical, statistics included."""
    apply_fn, params, batches, _, _ = setup
    awq = jaxq.AWQ(bits=4, group_size=32, then=jaxq.GPTQ(bits=4, group_size=32))
    ref, ref_stats = jaxq.calibrate(apply_fn, params, batches, awq, progress=False)
    work = tmp_path / "work"
    with pytest.raises(Interrupted):
        jaxq.calibrate(apply_fn, params, batches, awq, progress=False,
                       checkpoint=StopsAfter(work, 2))
    store = LayerCheckpoint(work)
    held = store.load("model/layers/1/mlp/down_proj/weight")
    assert set(held) >= {"gram"} and store.load("model/layers/2/mlp/down_proj/weight") is None
    out, stats = jaxq.calibrate(apply_fn, params, batches, awq, progress=False,
                                checkpoint=store)
    _assert_bit_identical(out, ref)
    _assert_bit_identical(stats, ref_stats)
