"""jaxq.core.io: a failed write leaves the old target; a finished one replaces it whole."""

import pytest

from jaxq.core.io import atomic_output, atomic_write, atomic_write_json


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
    assert sorted(p.name for p in target.parent.iterdir()) == ["cache.json"]  # no temporaries


def test_directory_and_overwrite(tmp_path):
    out = tmp_path / "model"
    with atomic_output(out, is_dir=True) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError), atomic_output(out, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
        raise ValueError
    assert [p.name for p in out.iterdir()] == ["a"]
    with atomic_output(out, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    with pytest.raises(FileExistsError, match="model"):
        with atomic_output(out, is_dir=True, overwrite=False):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
