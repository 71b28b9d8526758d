"""jaxq.recipes.stream: compressing one block at a time gives the in-memory result leaf for leaf
(RTN and true-sequential GPTQ), loads with the normal loader, and holds about one block in
memory whatever the model's size."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from _tinyllama import tiny_llama

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "export"))
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(ROOT / "scripts"))

from _exportkit import tiny_tokenizer  # noqa: E402
from _probe import tiny_gguf  # noqa: E402
from _streamkit import write_hf  # noqa: E402

from jaxq.core import serialize  # noqa: E402
from jaxq.core.leaf import is_leaf  # noqa: E402
from jaxq.core.tree import flatten_with_paths  # noqa: E402
from jaxq.models import load_model  # noqa: E402
from jaxq.recipes import run  # noqa: E402
from jaxq.recipes.stream import compress  # noqa: E402

#: A small calibration set: the tiny models' GPTQ needs statistics, not quality.
CAL = {"windows": 6, "length": 32, "batch": 4}


def assert_same_leaves(got, want) -> int:
    """Same paths, leaf classes and every array bit for bit; returns the compressed count."""
    a, b = flatten_with_paths(got)[0], flatten_with_paths(want)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert type(x) is type(y), path
        xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
        assert len(xs) == len(ys), path
        for u, v in zip(xs, ys):
            assert u.dtype == v.dtype and u.shape == v.shape, path
            assert np.array_equal(np.asarray(u), np.asarray(v)), path
    return sum(is_leaf(x) for _, x in a)


def test_rtn_streamed_equals_in_memory_bit_for_bit(tmp_path):
    src = tiny_gguf(tmp_path / "tiny.gguf")
    res = compress(src, "w4-g64", tmp_path / "out", progress=False)
    params, meta = serialize.load(tmp_path / "out")
    ref = run(load_model(src), "w4-g64", progress=False)
    # 2 blocks x 7 linears and the tied embedding (8-bit)
    assert assert_same_leaves(params, ref.params) == 15
    manifest = serialize.read_manifest(tmp_path / "out")
    assert len(manifest["shards"]) == 2 + 2  # a shard per block, the final norm, the head
    assert meta["figures"]["streamed"] and meta["recipe"]["name"] == "w4-g64"
    assert meta["source"] == str(src.resolve()) == res.source
    from jaxq.eval.size import size_report

    r = size_report(ref.params)  # the figures summed piece by piece equal the whole tree's
    assert res.figures["size_mb"] == pytest.approx(r.mb)
    assert res.figures["bits_per_weight"] == pytest.approx(r.bits_per_weight)
    assert res.figures["linear_bits_per_weight"] == pytest.approx(r.linear_bits_per_weight)


@pytest.mark.parametrize("tied", [False, True])
def test_gptq_streamed_equals_in_memory(tmp_path, tied):
    """True-sequential GPTQ: each block calibrated on the outputs of the compressed blocks
    before it, and the output head on the final hidden states, exactly as the whole-model pass
    does; bf16 storage and three shards on the way in."""
    import ml_dtypes

    cfg, params = tiny_llama(1, scale=0.08, vocab_size=tiny_tokenizer().vocab_size,
                             hidden_size=64, intermediate_size=128, num_layers=3,
                             tie_word_embeddings=tied, attention_bias=not tied)
    src = write_hf(tmp_path / "src", params, cfg, dtype=ml_dtypes.bfloat16, shards=3)
    compress(src, "gptq-w4-g64", tmp_path / "out", calibration=CAL, progress=False)
    got, _ = serialize.load(tmp_path / "out")
    ref = run(load_model(src), "gptq-w4-g64", calibration=CAL, progress=False)
    n = assert_same_leaves(got, ref.params)
    assert n == 3 * 7 + 1 + (0 if tied else 1)  # linears, embedding, GPTQ'd untied head


def test_cli_stream_then_eval(tmp_path, capsys, monkeypatch):
    """``jaxq compress --stream`` writes a directory ``jaxq eval`` and ``jaxq info`` read."""
    from jaxq.cli import main

    monkeypatch.setenv("JAXQ_CACHE_DIR", str(tmp_path / "cache"))
    src = tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    assert main(["compress", str(src), "--stream", "--recipe", "w4-g64", "--out", str(out),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["streamed"] and result["out"] == str(out) and "perplexity" not in result
    assert main(["eval", str(out), "--windows", "1", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert np.isfinite(ev["perplexity"]) and ev["bits_per_weight"] == pytest.approx(
        result["bits_per_weight"])
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == "w4-g64"


_CHILD = textwrap.dedent("""
    import json, resource, shutil, sys
    import jax.numpy as jnp
    from jaxq.recipes.stream import compress

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    jnp.ones(3).block_until_ready()
    base = peak()
    compress(sys.argv[1], "w4-g64", sys.argv[3], progress=False)  # one block: warm-up
    shutil.rmtree(sys.argv[3])
    one = peak()
    res = compress(sys.argv[2], "w4-g64", sys.argv[3], progress=False)
    print(json.dumps({"base": base, "one": one, "peak": peak(), "model": res.model_bytes}))
""")


@pytest.mark.slow
def test_peak_rss_stays_flat_as_the_model_grows(tmp_path):
    """Streaming a 22-block model (386 MB float32) in a child process: its resident set grows
    by less than a third of the model over the post-import baseline, and by less than one
    block over streaming a 1-block model of the same widths.

    Why RSS and not a hard cap: RLIMIT_AS counts address space, and JAX/XLA reserve about 1.5
    GB of it before any work (thread stacks, allocator arenas), so a cap several times smaller
    than the model would need a model of many GB; no writable memory cgroup here either. The
    kernel's peak RSS (``ru_maxrss``) misses nothing between samples.
    """
    from bench_memory import write_synthetic_llama

    widths = dict(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_heads=8,
                  num_kv_heads=2, head_dim=64)
    write_synthetic_llama(tmp_path / "one", **widths, num_layers=1)
    write_synthetic_llama(tmp_path / "big", **widths, num_layers=22)
    layer = 4 * (2.5 * 512 * 512 + 3 * 512 * 2048 + 2 * 512)  # float32 q, k, v, o, MLP, norms
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "one"),
                           str(tmp_path / "big"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["model"] > 300e6, m
    assert m["peak"] - m["base"] < m["model"] / 3, m
    assert m["peak"] - m["one"] < layer, m
    got, _ = serialize.load(tmp_path / "out")
    assert len(got["model"]["layers"]) == 22
