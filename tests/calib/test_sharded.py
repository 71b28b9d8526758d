"""Sharded calibration (``jaxq.calibrate(..., mesh=, data_axis=, model_axis=)``) gives the
statistics and the GPTQ result of the plain one-device pass: on a one-device mesh exactly, on 8
forced host devices and across two ``jax.distributed`` processes within float tolerance.

Tolerances. Sums of float32 products (Gram, Σx², Σ|x|) taken in a different order (per data
shard, then an all-reduce; model-split matmuls upstream) differ by a few ulps of their largest
entry: measured <= 4.8e-7 of it; asserted 1e-5 (80 float32 eps), while a lost or doubled
shard moves a statistic by 1/8 or more. Counts are exact. GPTQ codes: a code changes only when
a weight sits within ~1e-6 of a rounding boundary (measured: none of them differ); asserted at
most 0.5% of the codes (4-bit codes compared nibble by nibble), and scales/biases within 1e-4
of their largest magnitude (measured <= 1.6e-6: they come from the updated weights).

The subprocess runs are slow (a device count or a process group is fixed when JAX starts, so
each needs a fresh interpreter).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from _sharded_run import case, flat, launch, run, wait

STAT_RTOL = 1e-5
CODE_FRACTION = 0.005
SCALE_RTOL = 1e-4


@functools.cache
def reference(model: str) -> dict:
    """The plain pass (no mesh) on this process's one device, over all the batches."""
    c = case(model)
    return flat(*run(c, c.batches, c.masks))


def differing_codes(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of 4-bit codes that differ between two packed uint32 arrays."""
    x = np.bitwise_xor(a, b).view(np.uint8)
    return float(((x & 0xF) != 0).sum() + ((x >> 4) != 0).sum()) / (x.size * 2)


def compare(ref: dict, got: dict, prefix: str = "") -> dict:
    """Assert ``got`` (keys under ``prefix``) matches ``ref``; returns the worst differences."""
    worst = {"stats": 0.0, "codes": 0.0, "scales": 0.0}
    for key, a in ref.items():
        b = got[prefix + key]
        assert a.shape == b.shape and a.dtype == b.dtype, key
        if key.endswith("/count"):
            assert np.array_equal(a, b), key
        elif key.startswith("stats/"):
            err = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
            assert err <= STAT_RTOL, (key, err)
            worst["stats"] = max(worst["stats"], err)
        elif key.endswith(".packed"):
            frac = differing_codes(a, b)
            assert frac <= CODE_FRACTION, (key, frac)
            worst["codes"] = max(worst["codes"], frac)
        else:
            err = float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(a)))
            assert err <= SCALE_RTOL, (key, err)
            worst["scales"] = max(worst["scales"], err)
    return worst


def test_one_device_mesh_is_the_plain_pass_exactly():
    c = case("mlp")
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    got = flat(*run(c, c.batches, c.masks, mesh=mesh, model_axis="model"))
    ref = reference("mlp")
    assert got.keys() == ref.keys()
    assert any(k.endswith(".packed") for k in ref) and any(k.endswith("/gram") for k in ref)
    for k in ref:
        assert np.array_equal(ref[k], got[k]), k


def test_weights_split_along_an_output_axis_only():
    from jax.sharding import AbstractMesh, AxisType
    from jax.sharding import PartitionSpec as P

    from jaxq.calib.sharded import MeshLayout

    mesh = AbstractMesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    lay = MeshLayout(mesh=mesh, model_axis="model")
    assert lay.weight_spec((64, 32), keep=(-2,)) == P(None, "model")  # x @ w: input axis 0
    assert lay.weight_spec((64, 32), keep=(-1,)) == P("model", None)  # [out, in]
    assert lay.weight_spec((2, 64, 64), keep=(-2, 0)) == P(None, None, "model")  # stacked
    assert lay.weight_spec((5, 64), keep=(-1,)) == P()  # the only free axis does not divide
    assert lay.weight_spec((64,)) == P()  # vectors (norms, biases) stay whole
    assert MeshLayout(mesh=mesh).weight_spec((64, 32)) == P()  # no model axis: replicated


@pytest.mark.slow
@pytest.mark.parametrize("model,meshes", [("mlp", "4x2,8x1"), ("llama", "4x2")])
def test_eight_host_devices_match_one(model, meshes, tmp_path):
    out = tmp_path / "run.npz"
    procs = launch(["devices", str(out), model, "8", meshes], tmp_path)
    try:
        ref = reference(model)  # while the subprocess runs
    finally:
        wait(procs)
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["devices"] == 8
    got = dict(np.load(out))
    for shape in meshes.split(","):
        worst = compare(ref, got, f"{shape}/")
        print(f"{model} {shape}: {worst}, {info[shape]['seconds']:.1f} s")
        specs = info[shape]
        d = int(shape.split("x")[0])  # each device holds its 1/d of a batch's rows
        rows = specs["rows"]
        assert specs["batch"] == "P('data',)" and specs["batch_rows"] == [rows // d] * 8, specs
        assert all(s == "P()" for d in specs["stats"].values() for s in d.values())
        split = [p for p, s in specs["leaves"].items() if "'model'" in s]
        if shape.endswith("x2"):  # every quantized weight is split over the model axis
            assert set(split) >= {p for p in specs["stats"]}, specs["leaves"]
        else:
            assert not split


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "llama"])
def test_two_processes_match_one(model, tmp_path):
    out = tmp_path / "run.npz"
    procs = launch(["process", str(out), model], tmp_path, processes=2)
    try:
        ref = reference(model)  # while the two processes run
    finally:
        wait(procs)
    info = json.loads(Path(f"{out}.json").read_text())
    assert info["processes"] == 2 and info["devices"] == 2
    assert all(s == "P()" for d in info["stats"].values() for s in d.values())
    worst = compare(ref, dict(np.load(out)))
    print(f"{model} 2 processes: {worst}, {info['seconds']:.1f} s")
