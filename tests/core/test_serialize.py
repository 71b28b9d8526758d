"""save/load: QArrays and plain arrays round-trip; writes are atomic."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.core import serialize


def sample_params():
    r = np.random.default_rng(0)
    w = jnp.asarray(r.standard_normal((16, 64)), jnp.float32)
    return {"model": {"layers": [{"w": jaxq.quantize(w, bits=3, group_size=32)},
                                 {"w": jaxq.quantize(w.T, bits=8, group_size="channel", axis=0,
                                                     scale_dtype=jnp.bfloat16)}],
                      "norm": jnp.ones((64,), jnp.bfloat16)},
            "head": (w, None)}


def test_round_trip(tmp_path):
    params = sample_params()
    serialize.save(tmp_path / "out", params, {"recipe": "w4", "ppl": 1.5})
    loaded, meta = serialize.load(tmp_path / "out")
    assert meta == {"recipe": "w4", "ppl": 1.5}
    a, b = params["model"]["layers"][1]["w"], loaded["model"]["layers"][1]["w"]
    assert isinstance(b, jaxq.QArray) and (b.bits, b.axis, b.group_size) == (8, -2, 64)
    assert b.scales.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    assert loaded["model"]["norm"].dtype == jnp.bfloat16
    assert isinstance(loaded["head"], tuple) and loaded["head"][1] is None


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_round_trip_keeps_its_activation_quantization(tmp_path, act):
    """A W8A8 leaf comes back a W8A8 (act mode and static scale), not a weight-only QArray:
    the saved figures were measured with int8 activations, and so must be a reload's."""
    from jaxq.quant.smoothquant import W8A8, w8a8_quantize

    w = jnp.asarray(np.random.default_rng(1).standard_normal((16, 64)), jnp.float32)
    absmax = jnp.full((64,), 3.0) if act == "static" else None
    q = w8a8_quantize(w, act=act, act_absmax=absmax)
    serialize.save(tmp_path / "out", {"w": q})
    back = serialize.load(tmp_path / "out")[0]["w"]
    assert type(back) is W8A8 and back.act == act
    if act == "static":
        assert float(back.act_scale) == float(q.act_scale) == np.float32(3.0 / 127)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 64)), jnp.float32)
    y = jaxq.apply(lambda p, x: x @ p["w"].T)
    np.testing.assert_array_equal(np.asarray(y({"w": back}, x)), np.asarray(y({"w": q}, x)))


def test_unregistered_qarray_subclass_is_refused(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True, eq=False)
    class Mine(jaxq.QArray):
        pass

    w = jaxq.quantize(jnp.ones((8, 32)), bits=4, group_size=32)
    mine = Mine(**{f.name: getattr(w, f.name) for f in dataclasses.fields(w)})
    with pytest.raises(TypeError, match="cannot save a Mine"):
        serialize.save(tmp_path / "out", {"w": mine})
    assert not (tmp_path / "out").exists()


def test_failed_save_leaves_nothing_and_keeps_old(tmp_path):
    serialize.save(tmp_path / "out", {"a": jnp.ones(3)})
    with pytest.raises(TypeError, match="cannot save"):
        serialize.save(tmp_path / "out", {"a": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded, _ = serialize.load(tmp_path / "out")
    np.testing.assert_array_equal(np.asarray(loaded["a"]), np.ones(3))


def test_load_rejects_non_jaxq_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jaxq compressed directory"):
        serialize.load(tmp_path)


def test_manifest_lists_files_and_load_checks_them(tmp_path):
    """The manifest records every file's size; a truncated one is a ModelLoadError naming it,
    while a directory saved before the list (no "files") still loads."""
    import json

    from jaxq.models import ModelLoadError

    out = serialize.save(tmp_path / "out", sample_params(), extra_files={"note.txt": "hi"})
    manifest = json.loads((out / serialize.MANIFEST).read_text())
    assert manifest["files"]["note.txt"] == 2
    assert any(k.startswith("arrays/") for k in manifest["files"])
    (out / "note.txt").write_text("h")
    with pytest.raises(ModelLoadError, match="note.txt: 1 bytes, the manifest says 2"):
        serialize.load(out)
    del manifest["files"]
    (out / serialize.MANIFEST).write_text(json.dumps(manifest))
    assert serialize.load(out)[0]["model"]["layers"][0]["w"].bits == 3


def test_load_rejects_a_leaf_inconsistent_with_its_arrays(tmp_path):
    """A leaf whose static fields no longer fit its arrays (bits 3 -> 4 in the manifest) is a
    ModelLoadError naming the leaf, not a model that dequantizes to garbage."""
    from jaxq.models import ModelLoadError

    out = serialize.save(tmp_path / "out", sample_params())
    text = (out / serialize.MANIFEST).read_text()
    assert text.count('"bits": 3') == 1
    (out / serialize.MANIFEST).write_text(text.replace('"bits": 3', '"bits": 4'))
    with pytest.raises(ModelLoadError, match="leaf model/layers/0/w is inconsistent"):
        serialize.load(out)
