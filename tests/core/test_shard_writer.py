"""serialize.ShardWriter: a tree saved piece by piece into safetensors shards loads back with
``serialize.load`` exactly as a whole-tree save does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxq import quantize
from jaxq.core import serialize


def test_pieces_load_back_like_a_whole_save(tmp_path):
    rng = np.random.default_rng(0)
    w = [jnp.asarray(rng.standard_normal((8, 64)), jnp.float32) for _ in range(3)]
    tree = {"layers": [{"w": quantize(x, bits=4, group_size=32), "n": x[0].astype(jnp.bfloat16)}
                       for x in w],
            "head": (jnp.arange(5), None), "scalar": 3}
    whole = serialize.save(tmp_path / "whole", tree, {"k": 1})
    writer = serialize.ShardWriter((tmp_path / "parts").mkdir() or tmp_path / "parts")
    stand_ins = [writer.put(layer) for layer in tree["layers"]]
    writer.finish({"layers": stand_ins, "head": tree["head"], "scalar": 3}, {"k": 1},
                  extra_files={"note.txt": "hi"})
    got, meta = serialize.load(tmp_path / "parts")
    want, want_meta = serialize.load(whole)
    assert meta == want_meta == {"k": 1}
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    shards = serialize.read_manifest(tmp_path / "parts")["shards"]
    assert len(shards) == 4  # one per put, and the arrays the final tree held itself
    names = [n for f in shards for n in safe_open(str(tmp_path / "parts" / f), "numpy").keys()]
    assert len(names) == len(set(names)) == len(jax.tree.leaves(tree))
    assert (tmp_path / "parts" / "note.txt").read_text() == "hi"
