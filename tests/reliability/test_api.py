"""Bad input to the Python API: a bool is no number, and a transform checks its fields as it is
made (not when it meets a layer)."""

from __future__ import annotations

import pytest
from _probe import expect_clear_error


@pytest.mark.bad_input
@pytest.mark.parametrize("cls,field", [("RTN", "bits"), ("GPTQ", "group_size"), ("AWQ", "bits"),
                                       ("QAT", "bits"), ("SparseGPT", "bits")])
def test_python_transform_refuses_bool(cls, field):
    """`RTN(bits=True)` and alike (made a 1-bit model) -> a ValueError naming the field."""
    import jaxq
    from jaxq.prune import SparseGPT

    make = SparseGPT if cls == "SparseGPT" else getattr(jaxq, cls)
    expect_clear_error(lambda: make(**{field: True}), cls, field)


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs", [{"bits": True}, {"group_size": True}])
def test_quantize_refuses_bool(kwargs):
    """`jaxq.quantize(w, bits=True)` or `group_size=True` -> a ValueError naming the argument."""
    import jax.numpy as jnp

    import jaxq

    w = jnp.ones((4, 64))
    expect_clear_error(lambda: jaxq.quantize(w, **kwargs, name="w"), "w",
                       "bit width" if "bits" in kwargs else "group_size")


@pytest.mark.bad_input
@pytest.mark.parametrize("kwargs,field", [({"damp": -0.1}, "damp"),
                                          ({"clip_min_ratio": -0.5}, "clip_min_ratio"),
                                          ({"clip_grid": 0}, "clip_grid")])
def test_python_transform_refuses_out_of_range(kwargs, field):
    """`GPTQ(damp=-0.1)` and other out-of-range fields (were accepted) -> names the field."""
    from jaxq import GPTQ

    expect_clear_error(lambda: GPTQ(**kwargs), "GPTQ", field)
