"""Output that loses nothing: the one way every jaxq writer (save, the exporters, the caches, the
benchmarks) puts a file or directory in place.

- **One writer per output.** Before any work, :func:`claim_output` takes an exclusive
  ``flock`` on the sibling ``.NAME.lock`` (it holds the writer's pid); a second jaxq process on
  the same output stops at once with one line naming that pid. The lock file is removed when
  the claim ends; after a ``kill -9`` it stays until the next run on the output, the one file
  that may (it holds no data and locks nothing once its process is gone).
- **Only a previous output of the same kind is replaced** (a jaxq directory has its manifest, a
  GGUF file its magic, ...: :class:`OutputKind`); anything else at the path is refused with one
  line, never deleted.
- **The name always holds a complete output.** Everything is written to a temporary sibling
  ``.NAME.tmp-PID-XXXXXXXX`` first. A file is put in place with one ``os.replace``; a directory
  by *exchanging* the two names in one step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
  ``renamex_np(RENAME_SWAP)``), then the old output, now at the temporary name, is removed.
  Where the filesystem cannot exchange, replacing an existing directory is refused up front
  (two renames would leave a moment with no output at all). A symlinked output (the data in a
  versioned sibling, the name a link swapped by one ``os.replace``) would also never leave the
  name missing, but the output would then be a link, which ``mv``, ``cp -r``, ``tar`` and
  ``rsync`` move or copy instead of the model, and the real directories every earlier jaxq wrote
  cannot be turned into links atomically anyway.
- **Debris is cleaned.** A temporary whose pid is dead (``kill -9``, a power cut) is removed by
  the next writer of the same output (one whose pid a live process has since taken waits until
  that process ends); SIGTERM while an output is claimed unwinds like Ctrl-C, so
  the temporaries go with the process.
- **Modes follow the umask** (files ``0666 & ~umask``, directories ``0777 & ~umask``), as for
  anything else the user creates.
- **Preflight and one-line failures.** The claim checks the parent is writable and the disk has
  about the room needed; a full disk mid-write is one :class:`OutputError` line, and what writer
  threads print meanwhile (orbax: a traceback per thread) is held back
  (:func:`quiet_writer_threads`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])


class OutputError(OSError, ValueError):
    """An output that cannot or must not be written, in one line naming the path.

    An :class:`OSError` (the cause is the disk, the permissions or another process) and a
    :class:`ValueError`, which the CLI prints as one ``jaxq: error:`` line with exit status 2.
    """


@dataclasses.dataclass(frozen=True, kw_only=True)
class OutputKind:
    """What a writer produces, and how to recognise an earlier output of it that may be replaced.

    ``test(path)`` says whether an existing ``path`` is such an output; ``None`` accepts any
    existing file (or directory) of the right type, which only caches and reports should use.
    """

    name: str  # with its article: "a GGUF file"
    is_dir: bool
    test: Callable[[Path], bool] | None = None

    def matches(self, path: Path) -> bool:
        if path.is_dir() != self.is_dir:
            return False
        return self.test is None or bool(self.test(path))


#: Any regular file (caches, reports).
FILE = OutputKind(name="a file", is_dir=False)


def has_magic(magic: bytes) -> Callable[[Path], bool]:
    """A ``test`` for :class:`OutputKind`: the file starts with ``magic``."""

    def test(path: Path) -> bool:
        try:
            with open(path, "rb") as fh:
                return fh.read(len(magic)) == magic
        except OSError:
            return False

    return test


# --- the claim: lock, preflight, debris ----------------------------------------------------

@dataclasses.dataclass
class _Claim:
    fd: int
    lock: Path
    count: int = 1


_registry_lock = threading.Lock()
_claims: dict[Path, _Claim] = {}
_active: set[Path] = set()  # this process's temporaries in flight
_TMP = re.compile(r"(?P<pid>\d+)-[0-9a-f]{8}")  # .NAME.tmp-PID-XXXXXXXX
_LEGACY_TMP = re.compile(r"[a-z0-9_]{8}")  # tempfile's suffix, written by jaxq before the pid


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, kind: OutputKind = FILE, *, overwrite: bool = True,
                 need_bytes: int = 0) -> Iterator[Path]:
    """Hold ``path`` for this process and check, before any work, that it can be written.

    Raises :class:`OutputError` (one line naming ``path``) when ``path`` exists and is not a
    ``kind`` output (or ``overwrite`` is False), when its directory cannot be written, when
    another process holds it, when an existing directory could not be replaced atomically here,
    or when the filesystem has fewer than ``need_bytes`` free. Missing parent directories are
    created (and removed again if nothing was written). Dead writers' temporaries of ``path``
    are removed. Re-entrant within a process: the CLI claims ``--out``, then ``save`` does.
    Yields the absolute path.
    """
    path = _absolute(path)
    with _registry_lock:
        held = _claims.get(path)
        if held is not None:
            held.count += 1
    if held is not None:
        try:
            yield path
        finally:
            _release(path)
        return
    _check_replaceable(path, kind, overwrite)
    created = _make_parents(path.parent, path)
    try:
        claim = _lock(path)
    except BaseException:
        _remove_created(created)
        raise
    with _registry_lock:
        _claims[path] = claim
    try:
        with _sigterm_unwinds():
            _clean_debris(path)
            if kind.is_dir and path.is_dir() and not _can_exchange(path):
                raise OutputError(f"cannot replace {path} safely: its filesystem cannot exchange "
                                  "two directories in one step; remove it or write elsewhere")
            _check_space(path, need_bytes)
            yield path
    finally:
        _release(path)
        if not _exists(path):
            _remove_created(created)


def holds_output(claim: Callable[[Any], contextlib.AbstractContextManager]) -> Callable[[_F], _F]:
    """Decorate a command ``fn(args)`` to run inside ``claim(args)`` (a :func:`claim_output`
    call): its output is locked and checked before the command does any work."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def run(args: Any) -> Any:
            with claim(args):
                return fn(args)

        return run  # type: ignore[return-value]

    return decorate


def _check_replaceable(path: Path, kind: OutputKind, overwrite: bool) -> None:
    if not _exists(path):
        return
    if not overwrite:
        raise OutputError(f"{path} already exists; pass --force (overwrite=True) to replace it")
    if not kind.matches(path):
        what = "directory" if path.is_dir() else "file"
        raise OutputError(f"{path} is a {what} that is not {kind.name}; refusing to replace it")


def _make_parents(parent: Path, path: Path) -> list[Path]:
    missing = []
    p = parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except OSError as e:
        _remove_created(created)
        raise OutputError(f"cannot write {path}: {e.strerror} ({e.filename})") from e
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def _lock(path: Path) -> _Claim:
    """An exclusive flock on ``.NAME.lock`` holding our pid, or OutputError naming the holder."""
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror} ({lock.parent})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{path} is being written by another jaxq process "
                              f"(pid {holder})") from None
        try:  # the holder before us may have removed the file we opened: lock the new one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return _Claim(fd, lock)


def _release(path: Path) -> None:
    with _registry_lock:
        claim = _claims[path]
        claim.count -= 1
        if claim.count:
            return
        del _claims[path]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(claim.lock)  # while still locked: the next writer locks a fresh file
    os.close(claim.fd)


def _owner_alive(pid: int | None, entry: Path) -> bool:
    if pid is None:  # written by jaxq before temporaries carried a pid: no writer is left
        return False
    if pid == os.getpid():
        return entry in _active
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _debris(path: Path) -> Iterator[tuple[Path, int | None]]:
    """``.NAME.tmp-PID-XXXXXXXX`` (and the pid-less or ``.old-PID`` names of older jaxq)."""
    tmp, old = f".{path.name}.tmp-", f".{path.name}.old-"
    try:
        entries = os.listdir(path.parent)
    except OSError:
        return
    for name in entries:
        if name.startswith(tmp):
            rest = name[len(tmp):]
            m = _TMP.fullmatch(rest)
            if m:
                yield path.with_name(name), int(m["pid"])
            elif _LEGACY_TMP.fullmatch(rest):
                yield path.with_name(name), None
        elif name.startswith(old) and name[len(old):].isdigit():
            yield path.with_name(name), int(name[len(old):])


def _clean_debris(path: Path) -> None:
    for entry, pid in _debris(path):
        if not _owner_alive(pid, entry):
            _remove(entry)


def _check_space(path: Path, need_bytes: int) -> None:
    if need_bytes <= 0:
        return
    free = shutil.disk_usage(path.parent).free
    if free < need_bytes:
        raise OutputError(f"not enough space for {path}: {_mb(free)} free on its filesystem, "
                          f"about {_mb(need_bytes)} needed")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def path_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or of every file under a directory; 0 when missing (an estimate's
    input, e.g. how much room an output of a source model may need)."""
    p = Path(path)
    try:
        if not p.is_dir():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


class _Terminated(SystemExit):
    pass


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """While an output is claimed, SIGTERM raises (exit status 143) instead of killing the
    process outright, so temporaries and the lock go with it. Only where SIGTERM still has its
    default action, in the main thread."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def unwind(signum: int, frame: Any) -> None:
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- swapping directories -------------------------------------------------------------------

_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap the directory entries ``a`` and ``b`` in one step (an OSError where unsupported)."""
    libc = _libc()
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
    else:
        raise OSError(errno.ENOSYS, "no atomic exchange of two paths on this system", str(b))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(b))


def _can_exchange(path: Path) -> bool:
    """Whether the filesystem holding ``path`` exchanges two directories (two empty probes)."""
    probes = []
    try:
        probes += [_new_temp(path, is_dir=True), _new_temp(path, is_dir=True)]
        _exchange(*probes)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    finally:
        for p in probes:
            _remove(p)
            _active.discard(p)
    return True


# --- atomic output ----------------------------------------------------------------------------

def _new_temp(path: Path, *, is_dir: bool) -> Path:
    """An empty ``.NAME.tmp-PID-XXXXXXXX`` beside ``path``, created with the umask's modes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    _active.add(tmp)
    try:
        if is_dir:
            os.mkdir(tmp, 0o777)
        else:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        _active.discard(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror} ({path.parent})") from e
    return tmp


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, kind: OutputKind = FILE, *, overwrite: bool = True,
                  lock: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` (an empty directory for a directory ``kind``, else
    an empty file) and put it in place when the block succeeds; on any error remove it instead.

    ``path`` is claimed (:func:`claim_output`: only an earlier ``kind`` output is replaced, and
    only with ``overwrite``); ``lock=False`` skips the lock for small files that concurrent
    processes may each rewrite whole (caches: the last one wins). A failed write (a full disk)
    is an :class:`OutputError` naming ``path``.
    """
    path = _absolute(path)
    claim = (claim_output(path, kind, overwrite=overwrite) if lock
             else _unlocked(path, kind, overwrite))
    with claim:
        tmp = _new_temp(path, is_dir=kind.is_dir)
        try:
            yield tmp
            _put_in_place(tmp, path, kind)
        except BaseException as err:
            failure = write_failure(path, err, written=path_bytes(tmp))
            _remove(tmp)
            if failure is None:
                raise
            raise failure from err
        finally:
            _active.discard(tmp)


@contextlib.contextmanager
def _unlocked(path: Path, kind: OutputKind, overwrite: bool) -> Iterator[None]:
    _check_replaceable(path, kind, overwrite)
    created = _make_parents(path.parent, path)
    _clean_debris(path)
    try:
        yield
    finally:
        if not _exists(path):
            _remove_created(created)


def _put_in_place(tmp: Path, path: Path, kind: OutputKind) -> None:
    if not kind.is_dir:
        os.replace(tmp, path)
        return
    if not _exists(path):
        os.rename(tmp, path)
        return
    _check_replaceable(path, kind, True)  # the claim checked it; nothing may have changed it
    _exchange(tmp, path)  # the name now holds the new output, ``tmp`` the old one
    _remove(tmp)


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside the output ``path`` (same filesystem, cleaned like the
    output's other temporaries if the process dies), removed at the end."""
    path = _absolute(path)
    tmp = _new_temp(path, is_dir=True)
    try:
        yield tmp
    finally:
        _remove(tmp)
        _active.discard(tmp)


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='28'|"
                            r"code: 28\b|StorageFull")


def write_failure(path: str | os.PathLike, err: BaseException, *, written: int = 0
                  ) -> OutputError | None:
    """``err`` raised while writing ``path`` (``written`` bytes of it so far) as one line, or
    None when it is not a write failure (a full disk reported by any writer, orbax's tensorstore
    and safetensors included, or an OSError)."""
    if isinstance(err, OutputError):
        return None
    if (isinstance(err, OSError) and err.errno in _NO_SPACE) or _NO_SPACE_TEXT.search(str(err)):
        return OutputError(f"cannot write {path}: no space left on its filesystem "
                           f"({_mb(written)} of it written)")
    if isinstance(err, OSError):
        return OutputError(f"cannot write {path}: {err.strerror or err}"
                           + (f" ({err.filename})" if err.filename else ""))
    return None


def atomic_write(path: str | os.PathLike, content: str | bytes, *, lock: bool = False) -> Path:
    """Write ``content`` (text or bytes) to the file ``path`` atomically (unlocked: see
    :func:`atomic_output`)."""
    with atomic_output(path, lock=lock) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, **dump_kwargs: Any) -> Path:
    """``json.dump`` ``data`` to ``path`` atomically (``dump_kwargs``: indent, sort_keys, ...)."""
    return atomic_write(path, json.dumps(data, **dump_kwargs))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --- quiet writer threads -------------------------------------------------------------------

def _held_thread() -> bool:
    """Whether output from the current thread is held: not the main thread, not rich's live
    display."""
    t = threading.current_thread()
    return t is not threading.main_thread() and not type(t).__module__.startswith("rich")


class _Held:
    """What writer threads print on ``sys.stderr`` or log, held until :meth:`end` lets it through
    or drops it. The main thread's output passes at once."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.text: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.holding = True
        self.lock = threading.Lock()

    def write(self, text: str) -> int:  # the sys.stderr proxy
        if self.holding and _held_thread():
            with self.lock:
                self.text.append(text)
            return len(text)
        return self.real.write(text)

    def filter(self, record: logging.LogRecord) -> bool:  # a filter on the root's handlers
        if self.holding and _held_thread():
            with self.lock:
                if record not in self.records:
                    self.records.append(record)
            return False
        return True

    def end(self, keep: bool) -> None:
        with self.lock:
            self.holding = False
            text, records = self.text, self.records
        if keep:
            self.real.write("".join(text))
            for record in records:
                logging.getLogger(record.name).handle(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.contextmanager
def quiet_writer_threads(settle_s: float = 1.0) -> Iterator[None]:
    """Hold back what other threads print on stderr or log during a write: let it through if the
    block succeeds, drop it if it fails. orbax logs and prints a traceback from each of its
    writer threads when the disk fills (hundreds of lines for a tiny model, thousands for a real
    one); the failure itself is then one :class:`OutputError` line. On failure the threads get
    up to ``settle_s`` seconds to finish their noise before it stops being held."""
    real = sys.stderr
    held = _Held(real)
    handlers = list(logging.getLogger().handlers)
    sys.stderr = held
    for h in handlers:
        h.addFilter(held)
    ok = False
    try:
        yield
        ok = True
    finally:
        if not ok:
            time.sleep(settle_s)
        if sys.stderr is held:
            sys.stderr = real
        for h in handlers:
            h.removeFilter(held)
        held.end(keep=ok)
