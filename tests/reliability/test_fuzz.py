"""A bounded byte-flip / truncation fuzzer over every model file jaxq reads.

Each example damages one copy of a real file (the tiny GGUF, the HF and mlx-lm directories
exported from it, the jaxq directory compressed from it, a tokenizer.json) by flipping one bit
or truncating it, then loads it through jaxq's loader. The contract: the load either raises
:class:`ModelLoadError` (one line, naming the file or its directory) or returns a model whose
tree of arrays (paths, shapes, dtypes) is the original's; after a flip in a header (GGUF
header/metadata/tensor infos, safetensors header, jaxq manifest) the loaded model is also
finite. A flip inside tensor data may load into NaN (finite checks are another layer's job):
there only the exception type is checked. Hypothesis runs derandomized (a fixed seed) with a
few examples per region; the ``slow`` test runs many more.
"""

from __future__ import annotations

import collections
import json
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from _sources import copy, sources
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxq.models import ModelLoadError

#: outcomes per region, for the report the slow run prints
OUTCOMES: collections.Counter = collections.Counter()


def _settings(n: int) -> settings:
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# --- loaders and what a good load looks like -------------------------------------------------

def _load_gguf(p: Path):
    from jaxq.models import load_gguf

    return load_gguf(p)[::2]


def _load_hf(p: Path):
    from jaxq.models import load_hf_dir

    return load_hf_dir(p)[::2]


def _load_mlx(p: Path):
    from mlx_backend.load import load_mlx_dir

    return load_mlx_dir(p)[::2]


def _load_jaxq(p: Path):
    from jaxq.models.default import load_compressed

    params, _, tok, _ = load_compressed(p)
    return params, tok


LOADERS: dict[str, Callable[[Path], tuple[Any, Any]]] = {
    "gguf": _load_gguf, "hf": _load_hf, "mlx": _load_mlx, "jaxq": _load_jaxq}


def structure(params: Any) -> list[tuple[str, tuple, str]]:
    """Every array of ``params`` (compressed leaves' children included): path, shape, dtype."""
    return [(jax.tree_util.keystr(k), tuple(np.shape(v)), str(v.dtype))
            for k, v in jax.tree_util.tree_leaves_with_path(params)]


def finite(params: Any) -> bool:
    from jaxq.core.leaf import materialize

    return all(bool(np.isfinite(np.asarray(x, np.float32)).all())
               for x in jax.tree_util.tree_leaves(materialize(params)))


@pytest.fixture(scope="module")
def work() -> dict[str, Any]:
    """Working copies of the sources (restored after each example), their good loads'
    structures and their params and tokenizers."""
    src = sources()
    root = Path(tempfile.mkdtemp(prefix="jaxq-fuzz-"))
    out: dict[str, Any] = {"root": root}
    for kind, path in src.items():
        out[kind] = copy(path, root)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[f"{kind}/loaded"] = params, _ = LOADERS[kind](out[kind])
        out[f"{kind}/structure"] = structure(params)
    yield out
    shutil.rmtree(root, ignore_errors=True)


def check_mutant(work: dict, kind: str, target: Path, mutate: Callable[[bytes], bytes],
                 region: str, header: bool) -> str:
    """Damage ``target`` (a file of source ``kind``), load it, check the contract, restore
    it; the outcome ("error" or "loaded")."""
    original = target.read_bytes()
    target.write_bytes(mutate(original))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                params, tok = LOADERS[kind](work[kind])
            except ModelLoadError as e:
                msg = str(e)
                assert "\n" not in msg.strip(), f"a multi-line error: {msg!r}"
                assert str(work[kind]) in msg or target.name in msg, f"file not named: {msg}"
                outcome = "error"
            else:
                assert structure(params) == work[f"{kind}/structure"], "structure changed"
                if header:
                    assert finite(params), f"a {region} flip loaded into NaN/Inf"
                if tok is not None:
                    tok.decode(tok.encode("Hello, world"))
                outcome = "loaded"
    finally:
        target.write_bytes(original)
    OUTCOMES[region, outcome] += 1
    return outcome


def flip(pos: int, bit: int) -> Callable[[bytes], bytes]:
    def mutate(raw: bytes) -> bytes:
        b = bytearray(raw)
        b[pos] ^= 1 << bit
        return bytes(b)
    return mutate


def truncate(pos: int) -> Callable[[bytes], bytes]:
    return lambda raw: raw[:pos]


def gguf_data_offset(path: Path) -> int:
    import gguf

    return int(gguf.GGUFReader(str(path)).data_offset)


def safetensors_header_end(path: Path) -> int:
    with open(path, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


# --- the fuzzers ---------------------------------------------------------------------------

def fuzz_gguf_header(work: dict, data: st.DataObject) -> None:
    f = work["gguf"]
    pos = data.draw(st.integers(0, gguf_data_offset(f) - 1), label="pos")
    check_mutant(work, "gguf", f, flip(pos, data.draw(st.integers(0, 7), label="bit")),
                 "gguf header", header=True)


def fuzz_gguf_data(work: dict, data: st.DataObject) -> None:
    f = work["gguf"]
    pos = data.draw(st.integers(gguf_data_offset(f), f.stat().st_size - 1), label="pos")
    check_mutant(work, "gguf", f, flip(pos, data.draw(st.integers(0, 7), label="bit")),
                 "gguf data", header=False)


def fuzz_truncation(work: dict, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["gguf", "hf", "mlx"]), label="kind")
    f = work[kind] if kind == "gguf" else work[kind] / "model.safetensors"
    pos = data.draw(st.integers(0, f.stat().st_size - 1), label="pos")
    assert check_mutant(work, kind, f, truncate(pos), f"{kind} truncated",
                        header=True) == "error"


def fuzz_safetensors_header(work: dict, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["hf", "mlx"]), label="kind")
    f = work[kind] / "model.safetensors"
    pos = data.draw(st.integers(0, safetensors_header_end(f) - 1), label="pos")
    check_mutant(work, kind, f, flip(pos, data.draw(st.integers(0, 7), label="bit")),
                 "safetensors header", header=True)


def fuzz_manifest(work: dict, data: st.DataObject) -> None:
    f = work["jaxq"] / "manifest.json"
    pos = data.draw(st.integers(0, f.stat().st_size - 1), label="pos")
    check_mutant(work, "jaxq", f, flip(pos, data.draw(st.integers(0, 7), label="bit")),
                 "jaxq manifest", header=True)


def fuzz_orbax(work: dict, data: st.DataObject) -> None:
    files = sorted(p for p in (work["jaxq"] / "arrays").rglob("*") if p.is_file())
    f = data.draw(st.sampled_from(files), label="file")
    pos = data.draw(st.integers(0, f.stat().st_size - 1), label="pos")
    if data.draw(st.booleans(), label="truncate"):
        assert check_mutant(work, "jaxq", f, truncate(pos), "orbax truncated",
                            header=False) == "error"
    else:
        check_mutant(work, "jaxq", f, flip(pos, data.draw(st.integers(0, 7), label="bit")),
                     "orbax", header=False)


def fuzz_tokenizer(work: dict, data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["hf", "jaxq"]), label="kind")
    f = work[kind] / "tokenizer.json"
    pos = data.draw(st.integers(0, f.stat().st_size - 1), label="pos")
    check_mutant(work, kind, f, flip(pos, data.draw(st.integers(0, 7), label="bit")),
                 "tokenizer.json", header=True)


#: region -> (fuzzer, examples in the CI run); the slow run takes SLOW_FACTOR times as many
FUZZERS = {"gguf_header": (fuzz_gguf_header, 30), "gguf_data": (fuzz_gguf_data, 8),
           "truncation": (fuzz_truncation, 12), "safetensors_header": (fuzz_safetensors_header, 30),
           "manifest": (fuzz_manifest, 20), "orbax": (fuzz_orbax, 15),
           "tokenizer": (fuzz_tokenizer, 15)}
SLOW_FACTOR = 6


@pytest.mark.parametrize("region", list(FUZZERS))
def test_fuzz(work, region):
    """A few derandomized mutations per region (130 in all; about 20 s)."""
    fn, n = FUZZERS[region]
    _settings(n)(given(data=st.data())(lambda data: fn(work, data)))()


@pytest.mark.slow
@pytest.mark.parametrize("region", list(FUZZERS))
def test_fuzz_long(work, region):
    """SLOW_FACTOR times the mutations per region (780 in all); prints the outcomes."""
    fn, n = FUZZERS[region]
    before = collections.Counter(OUTCOMES)
    _settings(SLOW_FACTOR * n)(given(data=st.data())(lambda data: fn(work, data)))()
    print(json.dumps({" / ".join(k): v - before[k] for k, v in OUTCOMES.items()
                      if v - before[k]}))


def test_sources_load(work):
    """The undamaged sources load finite, with a tokenizer (the checks reject damage, not the
    formats jaxq writes), and the jaxq manifest lists every file beside it with its size."""
    for kind in LOADERS:
        params, tok = work[f"{kind}/loaded"]
        assert finite(params) and tok is not None, kind
    listed = json.loads((work["jaxq"] / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(work["jaxq"]).as_posix(): p.stat().st_size
               for p in work["jaxq"].rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert listed == on_disk and "tokenizer.json" in listed
