"""The whole path on a CPU-sized model: a tiny Llama teacher, a fake-quantized student (a
stand-in straight-through rounding with learned scales), KD through ``fit``: the loss falls,
resume after a crash (an exception, or ``kill -9`` of a subprocess) is exact, and 8 forced host
devices (data parallel and FSDP) give the single device's loss curve."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import fq_apply, fq_init, kd_loss, optimizer, setup  # noqa: E402

from jaxq.train import fit  # noqa: E402

RUNNER = Path(__file__).parent / "_run.py"
ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


class Crash(Exception):
    pass


def _fit(ckpt=None, crash_at=None, steps=STEPS, **kw):
    student, teacher, data = setup()
    seen = []

    def cb(step, metrics):
        if step == crash_at:
            raise Crash
        seen.append((step, metrics["loss"]))

    r = fit(kd_loss, student, data, optimizer=optimizer(), steps=steps, args=(teacher,),
            extra=fq_init(student), transform=fq_apply, checkpoint_dir=ckpt,
            checkpoint_every=3, callback=cb, progress=False, **kw)
    assert not any(x.is_deleted() for x in jax.tree.leaves(student))  # not donated away
    return r, seen


@pytest.fixture(scope="module")
def uninterrupted():
    return _fit(eval_fn=lambda p, e: {"n": len(jax.tree.leaves(e))}, eval_every=5)


def test_kd_qat_loss_falls_and_state_trains(uninterrupted):
    r, seen = uninterrupted
    losses = np.array(r.losses)
    assert [s for s, _ in seen] == list(range(STEPS)) and r.start_step == 0
    assert losses[-3:].mean() < 0.9 * losses[:3].mean(), losses
    student, _, _ = setup()
    # the fake-quant scales (the transform's state) trained, and so did the weights
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         r.extra, fq_init(student))
    assert min(jax.tree.leaves(moved)) > 0
    assert [s for s, _ in r.evals] == [5, 10]


def test_resume_after_crash_is_exact(uninterrupted, tmp_path):
    with pytest.raises(Crash):
        _fit(tmp_path, crash_at=7)  # checkpoints at steps 3 and 6, dies during step 7
    r, seen = _fit(tmp_path)
    assert r.start_step == 6 and [s for s, _ in seen] == list(range(6, STEPS))
    np.testing.assert_allclose(r.losses, uninterrupted[0].losses[6:], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(r.params), jax.tree.leaves(uninterrupted[0].params),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _env(**extra):
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def _read(path: Path) -> list[float]:
    return [float(line.split()[1]) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_reproduces_the_curve(uninterrupted, tmp_path):
    out, ckpt = tmp_path / "killed.txt", tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(out), str(STEPS), "--ckpt",
                             str(ckpt), "--every", "2", "--sleep", "0.5"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while (not out.exists() or len(out.read_text().splitlines()) < 5) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(out.read_text().splitlines())
    assert 5 <= done < STEPS, "the run was not killed mid-way"
    np.testing.assert_allclose(_read(out), uninterrupted[0].losses[:done], rtol=1e-6)
    r, seen = _fit(ckpt)
    assert 2 <= r.start_step <= done and r.start_step % 2 == 0
    np.testing.assert_allclose(r.losses, uninterrupted[0].losses[r.start_step:], rtol=1e-6)


@pytest.mark.slow
def test_eight_devices_dp_and_fsdp_match_one_device(uninterrupted, tmp_path):
    out = tmp_path / "losses"
    res = subprocess.run([sys.executable, str(RUNNER), str(out), str(STEPS), "--devices", "8",
                          "--mode", "dp,fsdp"], env=_env(), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    ref = uninterrupted[0].losses
    for mode in ("dp", "fsdp"):
        np.testing.assert_allclose(_read(Path(f"{out}.{mode}")), ref, rtol=2e-4, err_msg=mode)
    # FSDP really splits the params: the [64, 32] embedding is stored as 8 shards of [8, 32]
    lines = dict(line.split(" embed sharding ") for line in res.stdout.splitlines()
                 if " embed sharding " in line)
    assert lines["fsdp"].endswith("shard shape (8, 32)") and "data" in lines["fsdp"], res.stdout
    assert lines["dp"] == "P() shard shape (64, 32)", res.stdout
