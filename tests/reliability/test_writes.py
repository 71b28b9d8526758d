"""Writes that lose nothing (issue 18, deliverable 2): the hostile-user audit of ``--out``.

Each case runs the CLI on a tiny GGUF source. The io unit tests (every kill point of a directory
swap, the lock, debris rules) are in tests/core/test_io.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _probe import expect_clear_error, tiny_gguf

import jaxq
from jaxq.cli import main
from jaxq.core import io

ROOT = Path(jaxq.__file__).parents[1]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "jaxq-cache"))


@pytest.fixture
def src(tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("src") / "tiny.gguf")


def compress(src: Path, out: Path, *extra: str) -> int:
    return main(["compress", str(src), "--out", str(out), "--no-eval", "--json", *extra])


def no_load(monkeypatch):
    """Make loading the model fail loudly: the case must be refused before any work."""
    def load(model):
        raise AssertionError(f"loaded {model}: the output was not checked before the work")

    monkeypatch.setattr("jaxq.cli.load_any", load)


def foreign_dir(d: Path) -> Path:
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "data.bin").write_bytes(os.urandom(1000))
    return d


# --- 1. --force deletes a foreign directory -------------------------------------------------

@pytest.mark.bad_input
def test_export_force_onto_a_foreign_directory(tmp_path, src, capsys, monkeypatch):
    """export --to gguf --force onto a directory of other files -> refused naming it, kept"""
    out = foreign_dir(tmp_path / "papers")
    no_load(monkeypatch)
    expect_clear_error(["export", str(src), "--to", "gguf", "--out", str(out), "--force"],
                       str(out), "not a GGUF file", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_export_force_onto_a_file_that_is_not_gguf(tmp_path, src, capsys, monkeypatch):
    """export --to gguf --force onto a file without GGUF magic -> refused naming the file"""
    out = tmp_path / "notes.gguf"
    out.write_text("not a model")
    no_load(monkeypatch)
    expect_clear_error(["export", str(src), "--to", "gguf", "--out", str(out), "--force"],
                       str(out), "is a file that is not a GGUF file", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_export_mlx_force_onto_an_hf_checkpoint(tmp_path, src, capsys, monkeypatch):
    """export --to mlx --force onto an HF checkpoint dir -> refused naming it (not an mlx export)"""
    from safetensors.numpy import save_file

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.ones(4, np.float32)}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    no_load(monkeypatch)
    expect_clear_error(["export", str(src), "--to", "mlx", "--out", str(out), "--force"],
                       str(out), "not an mlx-lm export", capsys=capsys, watch=[tmp_path])


@pytest.mark.bad_input
def test_compress_onto_a_foreign_directory(tmp_path, src, capsys, monkeypatch):
    """compress --out onto a directory without a jaxq manifest -> refused naming it, kept"""
    out = foreign_dir(tmp_path / "papers")
    no_load(monkeypatch)
    expect_clear_error(["compress", str(src), "--out", str(out)], str(out),
                       "not a jaxq compressed directory", capsys=capsys, watch=[tmp_path])


def test_export_force_replaces_an_earlier_export_of_the_same_kind(tmp_path, src, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(src), "--to", "gguf", "--out", str(out), "--json"]) == 0
    f16 = out.stat().st_size
    assert main(["export", str(src), "--to", "gguf", "--out", str(out), "--force",
                 "--float-type", "f32", "--json"]) == 0
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_size > f16
    mlx = tmp_path / "mlx"
    for _ in range(2):
        assert main(["export", str(src), "--to", "mlx", "--out", str(mlx), "--force",
                     "--json"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "mlx"]


# --- 4. owner-only modes ----------------------------------------------------------------------

@pytest.mark.bad_input
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["022", "027"])
def test_output_modes_follow_the_umask(tmp_path, src, capsys, umask):
    """umask 022 or 027 -> output modes 0666/0777 & ~umask, not owner-only 0600/0700"""
    old = os.umask(umask)
    try:
        assert compress(src, tmp_path / "w4") == 0
        assert main(["export", str(tmp_path / "w4"), "--to", "gguf", "--out",
                     str(tmp_path / "w4.gguf"), "--json"]) == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "w4", *(tmp_path / "w4").rglob("*"), tmp_path / "w4.gguf"]
    assert len(paths) > 5
    for p in paths:
        want = 0o777 & ~umask if p.is_dir() else 0o666 & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


# --- 5. kill -9 / SIGTERM debris --------------------------------------------------------------

SLOW_SAVE = textwrap.dedent("""
    import sys, numpy as np
    from jaxq.core import serialize
    # 48 x 2 MB arrays: long enough to be killed mid-save
    params = {f"w{i}": np.full((512, 1024), i, np.float32) for i in range(48)}
    print("saving", flush=True)
    serialize.save(sys.argv[1], params)
""")


def save_and_signal(out: Path, sig: int) -> int:
    """Run a large save in a subprocess and send it ``sig`` once its temporary appears."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving", proc.stderr.read()
    deadline = time.monotonic() + 60
    prefix = f".{out.name}.tmp-{proc.pid}-"
    while not any(p.name.startswith(prefix) and any(p.iterdir())  # orbax has begun
                  for p in out.parent.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc.wait(60)


@pytest.mark.bad_input
def test_kill_9_mid_save_debris_is_cleaned_by_the_next_run(tmp_path, src, capsys):
    """kill -9 mid-save (.out.tmp-PID-*, .out.lock left) -> removed by the next run on --out"""
    out = tmp_path / "out"
    assert save_and_signal(out, signal.SIGKILL) == -signal.SIGKILL
    debris = sorted(p.name for p in tmp_path.iterdir())
    assert any(n.startswith(".out.tmp-") for n in debris) and ".out.lock" in debris, debris
    assert compress(src, out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "manifest.json").is_file()


@pytest.mark.slow  # a subprocess importing jax; tests/core/test_io.py has the fast one
@pytest.mark.bad_input
def test_sigterm_mid_save_leaves_nothing(tmp_path):
    """SIGTERM mid-save -> exit status 143; temporary and lock removed on the way out"""
    assert save_and_signal(tmp_path / "out", signal.SIGTERM) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


# --- 6. replacing an output; two writers ------------------------------------------------------

@pytest.mark.bad_input
def test_replacing_an_output_never_leaves_the_name_missing(tmp_path, src, capsys, monkeypatch):
    """compress onto an earlier output -> names exchanged: --out is always a complete output"""
    out = tmp_path / "out"
    assert compress(src, out, "--recipe", "w4-g64") == 0
    seen = []

    def complete() -> str:
        return json.loads((out / "manifest.json").read_text())["metadata"]["recipe"]["name"]

    exchange, remove = io._exchange, io._remove

    def watched_exchange(a, b):
        if Path(b) == out:
            seen.append(("before exchange", complete()))
        exchange(a, b)
        if Path(b) == out:
            seen.append(("after exchange", complete()))

    def watched_remove(p):
        if (p / "manifest.json").is_file():  # the old output, now at the temporary name
            seen.append(("removing the old", complete()))
        remove(p)

    monkeypatch.setattr(io, "_exchange", watched_exchange)
    monkeypatch.setattr(io, "_remove", watched_remove)
    assert compress(src, out, "--recipe", "w8-channel") == 0
    assert seen[0] == ("before exchange", "w4-g64")
    assert ("after exchange", "w8-channel") in seen
    assert seen[-1] == ("removing the old", "w8-channel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


HOLD = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("jaxq_io", sys.argv[2])
    io = importlib.util.module_from_spec(spec)
    sys.modules["jaxq_io"] = io
    spec.loader.exec_module(io)
    with io.claim_output(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
""")


@pytest.mark.bad_input
def test_second_writer_on_the_same_out(tmp_path, src, capsys, monkeypatch):
    """--out held by another jaxq -> 'OUT is being written by another jaxq process (pid N)'"""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), io.__file__],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        no_load(monkeypatch)
        expect_clear_error(["compress", str(src), "--out", str(out)], str(out),
                           f"is being written by another jaxq process (pid {holder.pid})",
                           capsys=capsys, watch=[tmp_path])
    finally:
        holder.stdin.close()
        holder.wait(30)


# --- 8. --out checked before the work ---------------------------------------------------------

@pytest.mark.bad_input
def test_out_below_a_file(tmp_path, src, capsys, monkeypatch):
    """--out below a file -> one line naming the path, before the model is loaded"""
    (tmp_path / "file").write_text("x")
    no_load(monkeypatch)
    expect_clear_error(["compress", str(src), "--out", str(tmp_path / "file" / "out")],
                       str(tmp_path / "file" / "out"), "Not a directory", capsys=capsys,
                       watch=[tmp_path])


@pytest.mark.bad_input
def test_not_enough_free_space(tmp_path, src, capsys, monkeypatch):
    """less free space than the source model -> 'not enough space for OUT', before any work"""
    free = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: free)
    no_load(monkeypatch)
    out = tmp_path / "new" / "out"
    expect_clear_error(["compress", str(src), "--out", str(out)], f"not enough space for {out}",
                       "0.0 MB free", capsys=capsys, watch=[tmp_path])
    expect_clear_error(["export", str(src), "--to", "gguf", "--out", str(out)],
                       f"not enough space for {out}", capsys=capsys, watch=[tmp_path])


# Real filesystems: a read-only one and a small one, in a user namespace (root not needed).
NAMESPACE = textwrap.dedent("""
    set -e
    base=$1
    mkdir -p "$base/ro" "$base/small"
    mount -t tmpfs -o ro,size=64k tmpfs "$base/ro"
    mount -t tmpfs -o size=$2 tmpfs "$base/small"
    shift 2
    "$@" && echo rc=0 || echo rc=$?
    ls -A "$base/ro" "$base/small"
""")


def in_namespace(base: Path, size: str, *argv: str) -> tuple[int, list[str], list[str]]:
    """Run ``python -m jaxq.cli ARGV`` with ``base/ro`` a read-only filesystem and
    ``base/small`` one of ``size``: (exit status, stderr lines, what is left on both)."""
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) for a real small filesystem")
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(["unshare", "-rm", "sh", "-c", NAMESPACE, "ns", str(base), size,
                        sys.executable, "-m", "jaxq.cli", *argv], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=300)
    out = r.stdout.splitlines()
    rc = next(int(ln[3:]) for ln in out if ln.startswith("rc="))
    return rc, r.stderr.splitlines(), out[out.index(f"rc={rc}") + 1:]


@pytest.mark.slow  # a subprocess importing jax; test_out_below_a_file is the fast one
@pytest.mark.bad_input
def test_out_on_a_read_only_filesystem(tmp_path, src):
    """--out on a read-only filesystem -> 'cannot write OUT: Read-only file system', up front"""
    t0 = time.perf_counter()
    rc, err, left = in_namespace(tmp_path / "ns", "1m", "compress", str(src), "--out",
                                 str(tmp_path / "ns" / "ro" / "out"), "--no-eval")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"jaxq: error: cannot write {tmp_path}/ns/ro/out: Read-only"), err
    assert [ln for ln in left if ln and not ln.endswith(":")] == []
    assert time.perf_counter() - t0 < 60


@pytest.fixture(scope="module")
def q4_source(tmp_path_factory):
    """A 4-bit GGUF: a magnitude-pruned compression of it (dense float) is twice its size, so
    it passes the free-space estimate and fills a small disk mid-save."""
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
    from _exportkit import export_llama, tiny_tokenizer

    from jaxq.export.gguf import export_gguf

    cfg, params = export_llama(0)
    path = tmp_path_factory.mktemp("q4") / "q4.gguf"
    export_gguf(jaxq.RTN(bits=4, group_size=32, scale_dtype=jnp.float16)(params), cfg,
                tiny_tokenizer(), path)
    return path


@pytest.mark.slow
@pytest.mark.bad_input
def test_disk_full_mid_save(tmp_path, q4_source):
    """disk full mid-save -> one line 'cannot write OUT: no space left on its filesystem'"""
    size = io.path_bytes(q4_source)
    rc, err, left = in_namespace(tmp_path / "ns", f"{size * 3 // 2 // 1024}k", "compress",
                                 str(q4_source), "--recipe", "magnitude-50", "--out",
                                 str(tmp_path / "ns" / "small" / "out"), "--no-eval")
    assert rc == 2, err
    assert len(err) == 1, err[:20]
    assert err[0].startswith(f"jaxq: error: cannot write {tmp_path}/ns/small/out: no space "
                             "left on its filesystem ("), err
    assert err[0].endswith(" MB of it written)"), err
    assert [ln for ln in left if ln and not ln.endswith(":")] == []
