"""jaxq.core.finite: the NaN/Inf check every boundary calls."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.core import finite
from jaxq.core.finite import NonFiniteError, NonFiniteWarning, check_finite


def _tree():
    return {"a": {"w": jnp.ones((4, 8)), "b": jnp.zeros((8,))},
            "q": jaxq.quantize(jnp.linspace(-1, 1, 256).reshape(4, 64), bits=4, group_size=32),
            "ids": jnp.arange(5)}


def test_clean_tree_passes():
    assert check_finite(_tree()) is None
    assert finite.first_nonfinite(_tree()) is None


def test_names_the_first_bad_leaf_with_counts_and_position():
    t = _tree()
    t["a"]["w"] = t["a"]["w"].at[2, 3].set(jnp.nan).at[3, 0].set(jnp.inf)
    t["a"]["b"] = t["a"]["b"].at[0].set(jnp.nan)
    with pytest.raises(NonFiniteError) as e:
        check_finite(t, "weight")
    assert e.value.path == "a/b"  # flatten order: a/b before a/w
    assert str(e.value).startswith("weight a/b: 1 NaN of 8 values (first at [0])")
    del t["a"]["b"]
    with pytest.raises(NonFiniteError, match=r"weight a/w: 1 NaN, 1 Inf of 32 values "
                                              r"\(first at \[2, 3\]\)"):
        check_finite(t, "weight")


def test_numpy_and_16_bit_leaves():
    bad = np.ones((3, 3), np.float16)
    bad[1, 1] = np.inf
    with pytest.raises(NonFiniteError, match="x: 1 Inf .*float16 holds no value beyond 65504"):
        check_finite({"x": bad})
    bf = jnp.ones((4,), jnp.bfloat16).at[1].set(jnp.nan)
    assert finite.first_nonfinite({"y": bf}) == "y"


def test_compressed_leaf_scales_named_with_the_float16_hint():
    t = _tree()
    q = t["q"]
    t["q"] = q.__class__(**{**q.__dict__, "scales": q.scales.at[1, 0].set(jnp.inf)})
    with pytest.raises(NonFiniteError) as e:
        check_finite(t, "compressed weight")
    assert e.value.path == "q/scales"
    assert "scale_dtype float32" in str(e.value)


def test_fp8_codes_that_decode_to_nan_are_found():
    from jaxq.quant.float_formats import fp8_quantize

    q = fp8_quantize(jnp.linspace(-1, 1, 128).reshape(2, 64))
    assert check_finite({"w": q}) is None
    packed = np.asarray(q.packed).copy()
    packed[1, 3] = (packed[1, 3] & ~np.uint32(0xFF)) | np.uint32(0x7F)  # e4m3fn's NaN pattern
    bad = q.__class__(**{**q.__dict__, "packed": jnp.asarray(packed)})
    with pytest.raises(NonFiniteError, match=r"w: 1 NaN of 128 values \(first at \[1, 12\]\)"):
        check_finite({"w": bad})


def test_allow_warns_and_returns_the_path():
    t = {"w": jnp.array([1.0, jnp.nan])}
    with pytest.warns(NonFiniteWarning, match="w: 1 NaN"):
        assert check_finite(t, allow=True) == "w"
    with finite.allowing(True), pytest.warns(NonFiniteWarning):
        assert check_finite(t) == "w"
    with finite.allowing(True), pytest.raises(NonFiniteError):
        check_finite(t, allow=False)  # an explicit answer beats the block's
    with pytest.raises(NonFiniteError):
        check_finite(t)  # the block is over


def test_echo_gets_each_message_once():
    seen = []
    with finite.allowing(True, echo=seen.append), warnings.catch_warnings():
        warnings.simplefilter("error")
        check_finite({"w": jnp.array([jnp.inf])})
        check_finite({"w": jnp.array([jnp.inf])})
    assert len(seen) == 1 and "w: 1 Inf" in seen[0]


def test_traced_trees_are_left_to_finite_flags():
    @jax.jit
    def f(x):
        assert check_finite({"x": x}) is None  # nothing concrete to look at under a trace
        return finite.finite_flags({"x": x, "y": jnp.ones(2)})[1]

    assert np.asarray(f(jnp.array([1.0, jnp.nan]))).tolist() == [False, True]
    assert np.asarray(f(jnp.array([1.0, 2.0]))).tolist() == [True, True]


def test_json_safe_writes_valid_json():
    doc = {"ppl": float("inf"), "nll": float("nan"), "d": -float("inf"), "ok": 1.5,
           "arr": np.array([1.0, np.nan]), "s": np.float32(np.inf), "n": [None, "x"]}
    text = json.dumps(finite.json_safe(doc), allow_nan=False)
    back = json.loads(text)
    assert back == {"ppl": "inf", "nll": "nan", "d": "-inf", "ok": 1.5, "arr": [1.0, "nan"],
                    "s": "inf", "n": [None, "x"]}
    assert float(back["ppl"]) == float("inf")


def test_default_scale_dtype_keeps_biases_in_range():
    """A symmetric 1-bit grid stores scale = 2 x absmax: float16 overflows past 32752."""
    w = jnp.full((2, 64), 40000.0).at[:, ::2].set(-40000.0)
    q = jaxq.quantize(w, bits=1, group_size=64, symmetric=True)
    assert q.scales.dtype == jnp.float32
    assert check_finite({"q": q}) is None and float(q.biases[0, 0]) == -80000.0
    forced = jaxq.quantize(w, bits=1, group_size=64, symmetric=True, scale_dtype=jnp.float16)
    assert finite.first_nonfinite({"q": forced}) == "q/scales"  # what the old rule stored
    assert jaxq.quantize(w / 4, bits=4, group_size=64).scales.dtype == jnp.float16


def test_fp8_tiny_rows_with_float16_scales_stay_finite():
    """absmax / 448 of a 1e-7 row underflows float16 to zero: the row stores zeros, not NaN."""
    from jaxq.quant.float_formats import fp8_quantize

    w = jnp.asarray(np.random.RandomState(0).randn(3, 64).astype(np.float32))
    w = w.at[1].multiply(1e-7)
    q = fp8_quantize(w, scale_dtype=jnp.float16)
    assert float(q.scales[1, 0]) == 0.0
    v = np.asarray(q.materialize())
    assert np.isfinite(v).all() and np.abs(v[1]).max() == 0.0
    assert np.abs(v[0] - np.asarray(w[0])).max() < 0.1 * np.abs(np.asarray(w[0])).max()


def test_default_float16_scales_never_underflow_to_zero():
    """Affine scales are floored at 1e-7, a float16 subnormal: a 1e-12 row keeps finite,
    nonzero scales (and dequantizes to within a step of its values)."""
    w = jnp.asarray(np.random.RandomState(1).randn(2, 64).astype(np.float32)) * 1e-12
    for symmetric in (False, True):
        q = jaxq.quantize(w, bits=4, group_size=32, symmetric=symmetric)
        assert q.scales.dtype == jnp.float16
        assert check_finite({"q": q}) is None
        assert (np.abs(np.asarray(q.scales, np.float32)) > 0).all()
        assert np.abs(np.asarray(q.materialize()) - np.asarray(w)).max() < 2e-7
