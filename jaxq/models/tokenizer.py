"""A small tokenizer wrapper over HF ``tokenizers``, built from GGUF metadata or tokenizer.json.

GGUF files carry the vocabulary, merges and token types but not the pre-tokenizer itself, only
its llama.cpp name (``tokenizer.ggml.pre``); :data:`PRE_TOKENIZER_REGEXES` maps those names to
the split regexes llama.cpp applies, so the ids match the model's original tokenizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from jaxq.core.checks import ModelLoadError, one_line, read_json

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: llama.cpp pre-tokenizer name -> regexes applied one after another (as llama-vocab.cpp does).
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion"), (_GPT2,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        (r"\p{N}", _GPT2),
    ),
    **dict.fromkeys(("llama3", "llama-bpe", "smaug-bpe", "dbrx"), (_LLAMA3,)),
    **dict.fromkeys(("qwen2", "stablelm2", "hunyuan"), (_QWEN2,)),
}

# GGUF token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
# 6 byte.
_CONTROL, _USER_DEFINED = 3, 4


class TokenizerError(ValueError):
    """The tokenizer description is missing or of a kind this module cannot build."""


class Tokenizer:
    """Encode/decode text with a model's own tokenizer; ids match the original tokenizer."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        unk_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.chat_template = chat_template

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from ``tokenizer.*`` GGUF metadata (values as ``GGUFReader`` field contents)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')"
            )
        tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        types: Sequence[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):
            vocab.setdefault(tok, i)
        backend = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        )
        pre = meta.get("tokenizer.ggml.pre", "default")
        regexes = PRE_TOKENIZER_REGEXES.get(pre)
        if regexes is None:
            warnings.warn(
                f"unknown GGUF pre-tokenizer {pre!r}: using GPT-2's; ids may differ", stacklevel=2
            )
            regexes = (_GPT2,)
        backend.pre_tokenizer = _pre_tokenizer(regexes)
        backend.decoder = decoders.ByteLevel()
        specials = [tokens[i] for i, t in enumerate(types) if t == _CONTROL]
        user = [tokens[i] for i, t in enumerate(types) if t == _USER_DEFINED]
        backend.add_special_tokens(
            [tokenizers.AddedToken(t, special=True, normalized=False) for t in specials]
        )
        if user:
            backend.add_tokens(
                [tokenizers.AddedToken(t, special=False, normalized=False) for t in user]
            )

        def tid(name: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{name}_token_id")
            return None if v is None else int(v)

        bos, eos = tid("bos"), tid("eos")
        post = _post_processor(
            tokens,
            bos if meta.get("tokenizer.ggml.add_bos_token", False) else None,
            eos if meta.get("tokenizer.ggml.add_eos_token", False) else None,
        )
        if post is not None:
            backend.post_processor = post
        return cls(
            backend,
            bos_id=bos,
            eos_id=eos,
            pad_id=tid("padding"),
            unk_id=tid("unknown"),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_file(
        cls, path: str | Path, *, config: Mapping[str, Any] | None = None
    ) -> Tokenizer:
        """Load a tokenizer.json; ids and chat template from ``tokenizer_config.json`` beside it.

        ``config`` (a model config.json dict) supplies bos/eos ids when the tokenizer config
        does not name them.
        """
        path = Path(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust library raises bare Exceptions on a corrupt file
            raise ModelLoadError(f"{path}: not a readable tokenizer ({one_line(e)})") from None
        tcfg: dict[str, Any] = {}
        tcfg_path = path.with_name("tokenizer_config.json")
        if tcfg_path.is_file():
            tcfg = read_json(tcfg_path)
        config = config or {}

        def tid(name: str) -> int | None:
            tok = tcfg.get(f"{name}_token")
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str) and backend.token_to_id(tok) is not None:
                return backend.token_to_id(tok)
            v = config.get(f"{name}_token_id")
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ModelLoadError(f"{path}: {name}_token_id {v!r:.40} is not a token id")
            return v

        return cls(
            backend,
            bos_id=tid("bos"),
            eos_id=tid("eos"),
            pad_id=tid("pad"),
            unk_id=tid("unk"),
            chat_template=tcfg.get("chat_template"),
        )

    def special_config(self) -> dict[str, Any]:
        """The special tokens and chat template as ``tokenizer_config.json`` names them: what
        :meth:`from_file` reads back beside a ``tokenizer.json``."""
        out: dict[str, Any] = {}
        for name in ("bos", "eos", "pad", "unk"):
            tid = getattr(self, f"{name}_id")
            if tid is not None:
                out[f"{name}_token"] = self.id_to_token(tid)
        if self.chat_template:
            out["chat_template"] = self.chat_template
        return out

    # -- use --------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens (e.g. BOS) only when asked."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        """:meth:`encode` over many texts (parallel in the Rust backend)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens kept by default, so decode inverts encode)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def to_json_str(self, pretty: bool = False) -> str:
        """The tokenizer.json text (what exporters write next to the weights)."""
        return self.backend.to_str(pretty=pretty)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id})"
        )


def _pre_tokenizer(regexes: Sequence[str]) -> pre_tokenizers.PreTokenizer:
    """Split by each regex in turn (isolating matches), then map bytes to GPT-2's alphabet.

    A final GPT-2 regex is left to ``ByteLevel(use_regex=True)``, as HF's own files do.
    """
    *first, last = regexes
    gpt2_last = last == _GPT2
    if not gpt2_last:
        first.append(last)
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated", invert=False)
        for r in first
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_last))
    return steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)


def _post_processor(
    tokens: Sequence[str], bos: int | None, eos: int | None
) -> processors.PostProcessor | None:
    if bos is None and eos is None:
        return None
    head = [f"{tokens[bos]}:0"] if bos is not None else []
    tail = [f"{tokens[eos]}:0"] if eos is not None else []
    pair_tail = [f"{tokens[eos]}:1"] if eos is not None else []
    special = [(tokens[i], i) for i in (bos, eos) if i is not None]
    return processors.TemplateProcessing(
        single=[*head, "$A:0", *tail],
        pair=[*head, "$A:0", *tail, *[h.replace(":0", ":1") for h in head], "$B:1", *pair_tail],
        special_tokens=list(dict.fromkeys(special)),
    )
