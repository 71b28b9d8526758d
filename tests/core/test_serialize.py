"""save/load: QArrays and plain arrays round-trip; writes are atomic."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.core import serialize


def sample_params():
    r = np.random.default_rng(0)
    w = jnp.asarray(r.standard_normal((16, 64)), jnp.float32)
    return {"model": {"layers": [{"w": jaxq.quantize(w, bits=3, group_size=32)},
                                 {"w": jaxq.quantize(w.T, bits=8, group_size="channel", axis=0,
                                                     scale_dtype=jnp.bfloat16)}],
                      "norm": jnp.ones((64,), jnp.bfloat16)},
            "head": (w, None)}


def test_round_trip(tmp_path):
    params = sample_params()
    serialize.save(tmp_path / "out", params, {"recipe": "w4", "ppl": 1.5})
    loaded, meta = serialize.load(tmp_path / "out")
    assert meta == {"recipe": "w4", "ppl": 1.5}
    a, b = params["model"]["layers"][1]["w"], loaded["model"]["layers"][1]["w"]
    assert isinstance(b, jaxq.QArray) and (b.bits, b.axis, b.group_size) == (8, -2, 64)
    assert b.scales.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    assert loaded["model"]["norm"].dtype == jnp.bfloat16
    assert isinstance(loaded["head"], tuple) and loaded["head"][1] is None


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path):
    serialize.save(tmp_path / "out", {"a": jnp.ones(3)})
    with pytest.raises(TypeError, match="cannot save"):
        serialize.save(tmp_path / "out", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded, _ = serialize.load(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(loaded["a"]), np.ones(3))


def test_load_rejects_non_jaxq_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jaxq compressed directory"):
        serialize.load(tmp_path)
