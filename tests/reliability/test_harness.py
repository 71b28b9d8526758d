"""The harness itself: a tiny GGUF source loads through the CLI, and the probe catches what it
must (a wrong exit status, an unnamed culprit, debris on disk)."""

from __future__ import annotations

import json

import pytest
from _probe import expect_clear_error, tiny_gguf


def test_tiny_source_runs_info(tmp_path, capsys):
    from jaxq.cli import main

    src = tiny_gguf(tmp_path / "tiny.gguf")
    assert main(["info", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["num_layers"] == 2, info


@pytest.mark.bad_input
def test_missing_model_file(tmp_path, capsys):
    """A model path that does not exist -> one line naming the path."""
    expect_clear_error(["info", str(tmp_path / "nope.gguf")], "nope.gguf", capsys=capsys,
                       watch=[tmp_path])


def test_probe_fails_on_debris(tmp_path):
    def leaves_debris():
        (tmp_path / ".x.tmp-1").write_text("half")
        raise ValueError("bad x")

    with pytest.raises(AssertionError, match="disk changed"):
        expect_clear_error(leaves_debris, "x", watch=[tmp_path])


def test_probe_fails_on_an_unnamed_culprit():
    def vague():
        raise ValueError("something went wrong")

    with pytest.raises(AssertionError, match="not named"):
        expect_clear_error(vague, "layers.3.q_proj")
