"""jaxq.core.io: a failed write leaves the old target; a finished one replaces it whole, in one
step; only an earlier output of the same kind is replaced; one writer per output; modes follow
the umask; a killed writer's debris goes with the next run."""

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from jaxq.core import io
from jaxq.core.io import (
    OutputError,
    OutputKind,
    atomic_output,
    atomic_write,
    atomic_write_json,
    claim_output,
)

#: A directory output recognised by its ``version`` file.
KIND = OutputKind(name="a test output", is_dir=True, test=lambda p: (p / "version").is_file())
FILES = ("a", "b", "version")


def write_version(d: Path, text: str) -> None:
    for name in FILES:
        (d / name).write_text(text)


def version_of(d: Path) -> str:
    """The version a complete output holds (asserts it is complete and not mixed)."""
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES), sorted(d.iterdir())
    texts = {(d / name).read_text() for name in FILES}
    assert len(texts) == 1, texts
    return texts.pop()


def entries(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# io.py loaded by file (stdlib only): a subprocess that writes without importing jax.
SUBPROCESS_PRELUDE = f"""
import importlib.util, os, signal, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("jaxq_io", {str(Path(io.__file__))!r})
io = importlib.util.module_from_spec(spec)
sys.modules["jaxq_io"] = io
spec.loader.exec_module(io)
KIND = io.OutputKind(name="test output", is_dir=True, test=lambda p: (p / "version").is_file())
def die():
    os.kill(os.getpid(), signal.SIGKILL)
"""


def run_py(script: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SUBPROCESS_PRELUDE + script, *args],
                          capture_output=True, text=True, timeout=60, **kw)


def popen_py(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SUBPROCESS_PRELUDE + script, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_file_replaced_only_on_success(tmp_path):
    target = tmp_path / "sub" / "cache.json"
    atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{"a": 1}'
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == '{"a": 1}'
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert entries(target.parent) == ["cache.json"]  # no temporaries, no lock


def test_directory_and_overwrite(tmp_path):
    out = tmp_path / "model"
    with atomic_output(out, KIND) as tmp:
        write_version(tmp, "1")
    with pytest.raises(ValueError), atomic_output(out, KIND) as tmp:
        write_version(tmp, "2")
        raise ValueError
    assert version_of(out) == "1"
    with atomic_output(out, KIND) as tmp:
        write_version(tmp, "3")
    assert version_of(out) == "3"
    with pytest.raises(OutputError, match="model already exists"):
        with atomic_output(out, KIND, overwrite=False):
            pass
    assert entries(tmp_path) == ["model"]


def test_only_an_earlier_output_of_the_same_kind_is_replaced(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=r"foreign is a directory that is not a test output"):
        with atomic_output(foreign, KIND) as tmp:
            write_version(tmp, "new")
    assert entries(foreign) == ["thesis.tex"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(OutputError, match="notes.txt is a file that is not a test output"):
        with atomic_output(a_file, KIND):
            pass
    gguf = OutputKind(name="a GGUF file", is_dir=False, test=io.has_magic(b"GGUF"))
    with pytest.raises(OutputError, match="notes.txt is a file that is not a GGUF file"):
        with atomic_output(a_file, gguf):
            pass
    with pytest.raises(OutputError, match="foreign is a directory that is not a file"):
        atomic_write(foreign, "x")
    assert a_file.read_text() == "keep"
    assert entries(tmp_path) == ["foreign", "notes.txt"]
    (tmp_path / "old.gguf").write_bytes(b"GGUF old")
    with atomic_output(tmp_path / "old.gguf", gguf) as tmp:
        tmp.write_bytes(b"GGUF new")
    assert (tmp_path / "old.gguf").read_bytes() == b"GGUF new"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_output(tmp_path / "d", KIND) as tmp:
            write_version(tmp, "1")
            (tmp / "sub").mkdir()
        atomic_write(tmp_path / "f.json", "{}")
        with atomic_output(tmp_path / "g.bin") as tmp:  # a writer that reopens the file
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "d" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "d" / "a", tmp_path / "f.json", tmp_path / "g.bin"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_one_writer_per_output(tmp_path):
    out = tmp_path / "out"
    holder = popen_py("""
with io.claim_output(sys.argv[1], KIND):
    print("held", flush=True)
    sys.stdin.read()
""", str(out))
    try:
        assert holder.stdout.readline().strip() == "held"
        assert entries(tmp_path) == [".out.lock"]
        with pytest.raises(OutputError) as info:
            with claim_output(out, KIND):
                pass
        assert str(info.value) == (f"{out} is being written by another jaxq process "
                                   f"(pid {holder.pid})")
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert entries(tmp_path) == []  # the lock file went with its holder
    with claim_output(out, KIND), claim_output(out, KIND):  # re-entrant within a process
        assert entries(tmp_path) == [".out.lock"]
    assert entries(tmp_path) == []


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path):
    out = tmp_path / "out"
    r = run_py("""
with io.claim_output(sys.argv[1], KIND):
    die()
""", str(out))
    assert r.returncode == -signal.SIGKILL
    assert entries(tmp_path) == [".out.lock"]
    with atomic_output(out, KIND) as tmp:
        write_version(tmp, "1")
    assert entries(tmp_path) == ["out"]


# Kill points of replacing a directory: the name must hold the old or the new complete output.
KILL_AT = {
    "mid-write": ("old", """
with io.atomic_output(sys.argv[1], KIND) as tmp:
    (tmp / "a").write_text("new")
    die()
"""),
    "before-exchange": ("old", """
exchange = io._exchange
def die_before_exchange(a, b):
    if Path(b) != Path(sys.argv[1]):  # the filesystem probe
        return exchange(a, b)
    die()
io._exchange = die_before_exchange
with io.atomic_output(sys.argv[1], KIND) as tmp:
    for name in ("a", "b", "version"):
        (tmp / name).write_text("new")
"""),
    "after-exchange": ("new", """
exchange = io._exchange
def exchange_and_die(a, b):
    exchange(a, b)
    if Path(b) == Path(sys.argv[1]):
        die()
io._exchange = exchange_and_die
with io.atomic_output(sys.argv[1], KIND) as tmp:
    for name in ("a", "b", "version"):
        (tmp / name).write_text("new")
"""),
    "mid-remove-of-old": ("new", """
remove = io._remove
def remove_some_and_die(p):
    if (p / "version").is_file():  # the old output, now at the temporary name
        (p / "b").unlink()
        die()
    remove(p)
io._remove = remove_some_and_die
with io.atomic_output(sys.argv[1], KIND) as tmp:
    for name in ("a", "b", "version"):
        (tmp / name).write_text("new")
"""),
}


@pytest.mark.parametrize("point", KILL_AT)
def test_replacing_a_directory_never_leaves_the_name_missing(tmp_path, point):
    out = tmp_path / "out"
    with atomic_output(out, KIND) as tmp:
        write_version(tmp, "old")
    expected, script = KILL_AT[point]
    r = run_py(script, str(out))
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert version_of(out) == expected
    debris = [n for n in entries(tmp_path) if n.startswith(".out.tmp-")]
    assert debris, entries(tmp_path)
    with atomic_output(out, KIND) as tmp:  # the next run cleans the dead writer's debris
        write_version(tmp, "next")
    assert version_of(out) == "next"
    assert entries(tmp_path) == ["out"]


def test_without_an_atomic_exchange_an_existing_directory_is_refused_up_front(
        tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_output(out, KIND) as tmp:
        write_version(tmp, "old")

    def unsupported(a, b):
        raise OSError(errno.EINVAL, "Invalid argument", str(b))

    monkeypatch.setattr(io, "_exchange", unsupported)
    work = []
    with pytest.raises(OutputError, match="cannot replace .*out safely"):
        with claim_output(out, KIND):
            work.append("done")  # never reached: refused before the work
    assert work == []
    assert version_of(out) == "old"
    assert entries(tmp_path) == ["out"]
    with atomic_output(tmp_path / "new", KIND) as tmp:  # a new name needs no exchange
        write_version(tmp, "1")
    assert version_of(tmp_path / "new") == "1"


def test_debris_of_dead_writers_only_is_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    live = str(os.getppid())  # another process, alive
    names = {
        f".out.tmp-{dead}-0123abcd": False,  # False: cleaned
        f".out.old-{dead}": False,  # jaxq before this: the old output moved aside
        ".out.tmp-k3j_9x2a": False,  # jaxq before this: a temporary without a pid
        f".out.tmp-{live}-0123abcd": True,  # True: kept (its writer is alive)
        f".other.tmp-{dead}-0123abcd": True,  # another output's
        f".out.tmp-5.tmp-{dead}-0123abcd": True,  # output "out.tmp-5"'s, not "out"'s
        "out.tmp-1-0123abcd": True,  # not hidden: a user's
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights").write_bytes(b"x" * 1000)
    with claim_output(tmp_path / "out", KIND):
        pass
    assert entries(tmp_path) == sorted(n for n, kept in names.items() if kept)


def test_sigterm_unwinds_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    writer = popen_py("""
with io.atomic_output(sys.argv[1], KIND) as tmp:
    (tmp / "a").write_text("half")
    print("writing", flush=True)
    time.sleep(60)
""", str(out))
    assert writer.stdout.readline().strip() == "writing"
    assert len(entries(tmp_path)) == 2  # the lock and the temporary
    writer.send_signal(signal.SIGTERM)
    assert writer.wait(30) == 128 + signal.SIGTERM
    assert entries(tmp_path) == []


def test_preflight_space_and_parents(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(OutputError, match=r"not enough space for .*out: .* MB free on its "
                                          r"filesystem, about 1,000,000,000.0 MB needed"):
        with claim_output(out, KIND, need_bytes=10**15):
            pass
    assert entries(tmp_path) == []  # the parents it made are gone again
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match=r"cannot write .*file/out: Not a directory"):
        with claim_output(blocker / "out", KIND):
            pass
    assert entries(tmp_path) == ["file"]


def test_write_failures_are_one_line(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(OutputError) as info, atomic_output(out) as tmp:
        tmp.write_bytes(b"x" * 123_456)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == (f"cannot write {out}: no space left on its filesystem (0.1 MB "
                               "of it written)")
    tensorstore = ('RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed to '
                   "write 5 bytes to file 5: No space left on device [os_error_code='28']")
    with pytest.raises(OutputError, match="no space left"), atomic_output(out):
        raise ValueError(tensorstore)
    with pytest.raises(OutputError, match="cannot write .*out.bin: Permission denied"):
        with atomic_output(out):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(KeyError), atomic_output(out):  # not a write failure: unchanged
        raise KeyError("q_proj")
    assert entries(tmp_path) == []


def test_quiet_writer_threads(capsys):
    def noisy():
        print("thread noise", file=sys.stderr)
        logging.getLogger("jaxq.test.writer").error("thread log")

    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    for fail in (True, False):
        try:
            with io.quiet_writer_threads(settle_s=0.0):
                t = threading.Thread(target=noisy)
                t.start()
                t.join()
                print("main says", file=sys.stderr)
                if fail:
                    raise OutputError("cannot write x: no space left")
        except OutputError:
            pass
        err = capsys.readouterr().err
        assert "main says" in err
        assert ("thread noise" in err) == (not fail), err
        assert ("thread log" in err) == (not fail), err
    logging.getLogger().removeHandler(handler)
