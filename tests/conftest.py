"""Shared session fixtures: the bundled SmolLM2 model and its PTB windows, loaded once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm():
    """``(params, config, tokenizer)`` of the packaged SmolLM2-135M-Instruct (float32)."""
    from jaxq.models import ModelLoadError, load_default

    try:
        return load_default()
    except ModelLoadError as e:  # pragma: no cover - the env script installs it
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm_eval_windows(smollm):
    """The protocol's 32 x 512 PTB-test windows, tokenized with SmolLM2's tokenizer."""
    from jaxq.eval.data import eval_windows

    return eval_windows(smollm[2])
