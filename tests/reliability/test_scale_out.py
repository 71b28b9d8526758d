"""Bad input to sharded calibration (``jaxq.calibrate(..., mesh=)``): mesh axes it does not
have, batches that do not split over the data axis, processes that disagree on their batches.
The last two need several devices or processes, so they run the calibration runner in
subprocesses (tests/calib/_sharded_run.py) and read the error line it wrote."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from _probe import expect_clear_error

import jaxq

sys.path.insert(0, str(Path(__file__).parents[1] / "calib"))
from _sharded_run import launch, wait  # noqa: E402


def _calibrate(**mesh):
    params = {"w": jnp.ones((8, 4))}
    return jaxq.calibrate(lambda p, x: x @ p["w"], params, [jnp.ones((2, 8))],
                          jaxq.GPTQ(bits=4, group_size=8), progress=False, **mesh)


def _mesh():
    return jax.make_mesh((1, 1), ("data", "model"))


@pytest.mark.bad_input
def test_data_axis_not_on_the_mesh():
    """calibrate(mesh=, data_axis=) naming an axis the mesh lacks -> one line naming the axis
    and listing the mesh's axes."""
    expect_clear_error(lambda: _calibrate(mesh=_mesh(), data_axis="batch"),
                       "data_axis='batch'", "['data', 'model']")


@pytest.mark.bad_input
def test_model_axis_without_a_mesh():
    """calibrate(model_axis=) without mesh= -> one line saying model_axis needs mesh=."""
    expect_clear_error(lambda: _calibrate(model_axis="model"), "model_axis='model'", "mesh=")


@pytest.mark.bad_input
def test_data_and_model_axis_the_same():
    """calibrate(mesh=) with data_axis equal to model_axis -> one line naming the shared axis."""
    expect_clear_error(lambda: _calibrate(mesh=_mesh(), data_axis="model", model_axis="model"),
                       "data_axis and model_axis", "'model'")


@pytest.mark.bad_input
def test_batch_does_not_split_over_the_data_axis(tmp_path):
    """A calibration batch whose leading size the mesh's data axis does not divide -> one line
    naming the batch, the axis and the multiple it needs."""
    out = tmp_path / "err"
    wait(launch(["indivisible", str(out), "mlp", "3"], tmp_path))
    line = Path(f"{out}.0").read_text()
    assert "calibration batch 0" in line and "multiple of 3" in line, line


@pytest.mark.slow
@pytest.mark.bad_input
def test_processes_with_unequal_batch_counts(tmp_path):
    """Two jax.distributed processes passing different numbers of calibration batches -> on
    each, one line naming its process and asking for as many batches of the same shapes (no
    hang)."""
    out = tmp_path / "err"
    wait(launch(["uneven", str(out), "mlp"], tmp_path, processes=2))
    for i, n in ((0, 4), (1, 3)):
        line = Path(f"{out}.{i}").read_text()
        assert f"process {i} has {n} calibration batches" in line, line
