"""End-of-sequence ids: every id a model names ends generation, and `jaxq generate` prints text,
not special tokens, whether or not the model ever emits one of them."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax.numpy as jnp
from _tinyllama import tiny_config, tiny_params

from jaxq.models import llama
from jaxq.models.gguf_loader import config_from_metadata
from jaxq.models.hf_loader import config_from_hf

sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from _exportkit import export_llama, tiny_tokenizer  # noqa: E402

HF = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


def test_hf_config_keeps_every_eos_id():
    cfg = config_from_hf({**HF, "eos_token_id": [7, 3, 7]})
    assert cfg.eos_ids == (7, 3)
    assert config_from_hf({**HF, "eos_token_id": 5}).eos_ids == (5,)
    assert config_from_hf({**HF, "eos_token_id": [5]}).eos_token_id == 5  # one id stays an int
    assert config_from_hf(HF).eos_ids == ()


def test_gguf_config_ends_on_eos_and_eot():
    meta = {"general.architecture": "llama", "llama.embedding_length": 32,
            "llama.attention.head_count": 2, "llama.feed_forward_length": 64,
            "llama.block_count": 1, "llama.vocab_size": 64,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 9}
    assert config_from_metadata(meta, {"output.weight"}).eos_ids == (2, 9)


def test_config_with_eos_ids_survives_json_metadata():
    """A compressed model's manifest stores the config as JSON: the tuple comes back a list,
    and the config is rebuilt hashable (it is a jit static argument)."""
    cfg = tiny_config(eos_token_id=(2, 0))
    back = llama.LlamaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and back.eos_ids == (2, 0) and hash(back) == hash(cfg)


def test_generate_stops_on_any_eos_id():
    cfg = tiny_config(vocab_size=64)
    params = tiny_params(cfg, 7, scale=0.3)
    prompt = [3, 14, 15, 9, 26]
    free = llama.generate(params, cfg, prompt, 6).tolist()
    unused = next(i for i in range(64) if i not in free)
    eos = free[2]
    first = free.index(eos)
    stop = llama.generate(params, dataclasses.replace(cfg, eos_token_id=(unused, eos)), prompt,
                          6).tolist()
    assert stop[: first + 1] == free[: first + 1]
    assert stop[first + 1:] == [unused] * (5 - first)  # later slots hold the first id
    assert llama.trim_at_end(stop, (unused, eos)) == free[:first]
    assert llama.trim_at_end([4, 5], (9,)) == [4, 5]


def _silent_model(tmp_path: Path, eos: int | tuple[int, ...]) -> Path:
    """The tiny export llama with its final norm zeroed: every logit is 0, so greedy decoding
    emits token 0, "<|endoftext|>", forever; its tokenizer's EOS is 2, "<|im_end|>"."""
    from jaxq.core import serialize

    cfg, params = export_llama(0)
    cfg = dataclasses.replace(cfg, eos_token_id=eos)
    params["model"]["norm"]["weight"] = jnp.zeros_like(params["model"]["norm"]["weight"])
    tok = tiny_tokenizer()
    assert tok.id_to_token(0) == "<|endoftext|>" and tok.eos_id == 2
    out = tmp_path / "silent"
    serialize.save(out, params, {"config": dataclasses.asdict(cfg)},
                   extra_files={"tokenizer.json": tok.to_json_str(),
                                "tokenizer_config.json": json.dumps(tok.special_config())})
    return out


def _generate(capsys, model: Path, n: int) -> dict:
    from jaxq.cli import main

    capsys.readouterr()
    assert main(["generate", str(model), "--prompt", "hello", "--max-tokens", str(n),
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_generate_never_prints_special_tokens(tmp_path, capsys):
    """A model that never emits its EOS ran to --max-tokens and printed "<|endoftext|>" five
    times; it still stops at --max-tokens, and the completion holds no special token."""
    res = _generate(capsys, _silent_model(tmp_path, 2), 5)
    assert res["tokens"] == [0] * 5
    assert res["completion"] == ""


def test_cli_generate_trims_at_the_first_of_any_eos(tmp_path, capsys):
    """EOS ids (2, 0): the model's first token, 0, is the second of them, so nothing is
    generated after it and the completion is empty."""
    res = _generate(capsys, _silent_model(tmp_path, (2, 0)), 5)
    assert res["tokens"] == [] and res["completion"] == ""
