"""Validation of model files before their tensors are trusted: GGUF layout and metadata, and
the sanity of a model config read from any source.

A flipped byte in a header moves, retypes or reshapes tensors: without these checks a model
would load silently into garbage (or NaN), or fail deep inside with a message that names the
wrong thing (a damaged head count read as "partial RoPE"). Each check raises
:class:`~jaxq.models.ModelLoadError` naming the file and the key or tensor at fault.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from jaxq.core.checks import require
from jaxq.models import ModelLoadError
from jaxq.models.llama import LlamaConfig

_INT_KEYS = ("embedding_length", "attention.head_count", "attention.head_count_kv",
             "attention.key_length", "attention.value_length", "feed_forward_length",
             "block_count", "context_length", "vocab_size", "rope.dimension_count")
_FLOAT_KEYS = ("rope.freq_base", "attention.layer_norm_rms_epsilon")
_TOKEN_IDS = ("bos", "eos", "padding", "unknown")
_BLOCK = re.compile(r"blk\.(\d+)\.")


def check_gguf(reader: Any, path: Path) -> dict[str, Any]:
    """Validate a ``gguf.GGUFReader``'s file and return its metadata as plain values.

    Checks: every metadata value decodes; tensors lie inside the file, aligned, tiling the
    data region (again, for a reader not made by :func:`gguf_reader`);
    the llama hyperparameters have the right types and agree with the tensor shapes; the
    tokenizer arrays agree with each other.
    """
    meta = _metadata(reader, path)
    spans = [(int(t.data_offset) - int(reader.data_offset), int(t.n_bytes), t.name,
              t.tensor_type.name) for t in reader.tensors]
    _check_spans(spans, int(reader.data.shape[0]) - int(reader.data_offset),
                 int(reader.alignment), path)
    arch = meta.get("general.architecture")
    if isinstance(arch, str):
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
                  for t in reader.tensors}
        _check_hyperparameters(meta, arch, shapes, path)
    _check_tokenizer_metadata(meta, path)
    return meta


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{path}: metadata {key!r} is not valid UTF-8 at byte "
                                 f"{e.start} (corrupt?)") from None
        except Exception:  # exotic value types the loader does not read  # noqa: S112
            continue
    return meta


def gguf_reader(path: Path) -> Any:
    """A ``gguf.GGUFReader`` of ``path`` that checks the tensor infos before it maps any data,
    so a bad type, shape or offset names its tensor instead of failing inside numpy."""
    import gguf

    class _CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            spans = _spans_from_fields(fields, path)
            if spans is not None:
                _check_spans(spans, int(self.data.shape[0]) - start_offs, int(self.alignment),
                             path)
            super()._build_tensors(start_offs, fields)

    return _CheckedReader(str(path))


def _spans_from_fields(fields: list, path: Path) -> list[tuple] | None:
    """(offset, nbytes, name, type name) of each tensor info, checked one by one; None when
    the gguf package's field layout is not the one known here (the reader then checks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    spans = []
    for field in fields:
        if len(field.parts) != 6:
            return None
        _, name_data, _, dims, raw_type, offset = field.parts
        name = bytes(name_data).decode("utf-8", errors="replace")
        dims = [int(d) for d in dims.tolist()]
        if not 1 <= len(dims) <= 4 or min(dims) < 1:
            raise ModelLoadError(f"{path}: tensor {name}: bad shape {tuple(reversed(dims))}")
        try:
            kind = GGMLQuantizationType(int(raw_type[0]))
            block, type_size = GGML_QUANT_SIZES[kind]
        except (ValueError, KeyError):
            raise ModelLoadError(f"{path}: tensor {name}: unknown tensor type "
                                 f"{int(raw_type[0])} (corrupt?)") from None
        if dims[0] % block:
            raise ModelLoadError(f"{path}: tensor {name}: {kind.name} {tuple(reversed(dims))} "
                                 f"is not whole blocks of {block}")
        spans.append((int(offset[0]), math.prod(dims) // block * type_size, name, kind.name))
    return spans


def _check_spans(spans: list[tuple], data_size: int, align: int, path: Path) -> None:
    """Tensors lie inside the data region, aligned, tiling it without overlaps or gaps (a
    damaged type, shape or offset breaks the tiling)."""
    for begin, nbytes, name, kind in spans:
        if begin % align:
            raise ModelLoadError(f"{path}: tensor {name}: data offset {begin} is not a multiple "
                                 f"of the alignment {align} (offset damaged?)")
        if begin + nbytes > data_size:
            raise ModelLoadError(f"{path}: tensor {name}: its data ({kind}, {nbytes} bytes at "
                                 f"{begin}) runs past the end of the file (truncated, or its "
                                 "offset, type or shape damaged?)")
    spans = sorted((b, b + n, name, kind) for b, n, name, kind in spans)
    for (_, e0, n0, _), (b1, _, n1, _) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise ModelLoadError(f"{path}: tensors {n0} and {n1} overlap (a data offset, type "
                                 "or shape is damaged)")
    pos, prev = 0, None
    for begin, end, name, kind in spans:
        if begin != pos:
            culprit = f"after tensor {prev[0]} ({prev[1]})" if prev else "before the first"
            raise ModelLoadError(f"{path}: {begin - pos} unused bytes {culprit}: tensor "
                                 f"{name} does not follow it (a data offset, type or shape "
                                 "is damaged)")
        pos, prev = -(-end // align) * align, (name, kind)
    if spans and not spans[-1][1] <= data_size <= pos:
        raise ModelLoadError(f"{path}: {data_size - pos} bytes after the last tensor "
                             f"{prev[0]} ({prev[1]}): its type or shape is damaged")


def _check_hyperparameters(meta: dict[str, Any], arch: str, shapes: dict[str, tuple],
                           path: Path) -> None:
    for key in (*_INT_KEYS, *_FLOAT_KEYS):
        v = meta.get(f"{arch}.{key}")
        ok = (v is None or isinstance(v, int) and not isinstance(v, bool)
              or key in _FLOAT_KEYS and isinstance(v, float))
        if not ok:
            raise ModelLoadError(f"{path}: metadata {arch}.{key} is {v!r:.40} (wrong type)")
    for name in _TOKEN_IDS:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise ModelLoadError(f"{path}: metadata tokenizer.ggml.{name}_token_id is "
                                 f"{v!r:.40} (wrong type)")
    hidden = meta.get(f"{arch}.embedding_length")
    heads = meta.get(f"{arch}.attention.head_count")
    if not isinstance(hidden, int) or not isinstance(heads, int):
        return  # missing: config_from_metadata names it
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    key = f"{arch}.attention.head_count"
    for k, v in ((f"{arch}.embedding_length", hidden), (key, heads), (f"{key}_kv", kv)):
        if v < 1:
            raise ModelLoadError(f"{path}: metadata {k} = {v} (must be positive)")
    if heads % kv:
        raise ModelLoadError(f"{path}: metadata {key} = {heads} is not a multiple of "
                             f"{key}_kv = {kv}")
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None:
        if hidden % heads:
            raise ModelLoadError(f"{path}: metadata {key} = {heads} does not divide "
                                 f"{arch}.embedding_length = {hidden}")
        head_dim = hidden // heads
    elif head_dim < 1:
        raise ModelLoadError(f"{path}: metadata {arch}.attention.key_length = {head_dim} "
                             "(must be positive)")
    heads_say = (f"metadata {key} = {heads}, {key}_kv = {kv} (head_dim {head_dim}) imply")
    for tensor, rows in (("blk.0.attn_q.weight", heads * head_dim),
                         ("blk.0.attn_k.weight", kv * head_dim)):
        if tensor in shapes and shapes[tensor][0] != rows:
            raise ModelLoadError(f"{path}: {heads_say} {rows} rows in tensor {tensor}, which "
                                 f"has {shapes[tensor][0]}")
    ffn = meta.get(f"{arch}.feed_forward_length")
    gate = shapes.get("blk.0.ffn_gate.weight")
    if gate is not None and isinstance(ffn, int) and gate[0] != ffn:
        raise ModelLoadError(f"{path}: metadata {arch}.feed_forward_length = {ffn} does not "
                             f"match tensor blk.0.ffn_gate.weight {gate}")
    embd = shapes.get("token_embd.weight")
    if embd is not None and embd[-1] != hidden:
        raise ModelLoadError(f"{path}: metadata {arch}.embedding_length = {hidden} does not "
                             f"match tensor token_embd.weight {embd}")
    blocks = {int(m[1]) for n in shapes if (m := _BLOCK.match(n))}
    count = meta.get(f"{arch}.block_count")
    if blocks and isinstance(count, int) and count != max(blocks) + 1:
        raise ModelLoadError(f"{path}: metadata {arch}.block_count = {count}, but the tensors "
                             f"hold {max(blocks) + 1} blocks")


def _check_tokenizer_metadata(meta: dict[str, Any], path: Path) -> None:
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ModelLoadError(f"{path}: metadata tokenizer.ggml.tokens is not a list of strings")
    for key in ("token_type", "scores"):
        v = meta.get(f"tokenizer.ggml.{key}")
        if v is not None and (not isinstance(v, list) or len(v) != len(tokens)):
            raise ModelLoadError(f"{path}: metadata tokenizer.ggml.{key} does not have one "
                                 f"entry per token ({len(tokens)})")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list)
                               or not all(isinstance(m, str) and " " in m for m in merges)):
        raise ModelLoadError(f"{path}: metadata tokenizer.ggml.merges is not a list of "
                             "'a b' pairs")
    for name in _TOKEN_IDS:
        v = meta.get(f"tokenizer.ggml.{name}_token_id")
        if isinstance(v, int) and not 0 <= v < len(tokens):
            raise ModelLoadError(f"{path}: metadata tokenizer.ggml.{name}_token_id = {v} is "
                                 f"outside the vocabulary ({len(tokens)} tokens)")


#: LlamaConfig field -> the key it is read from, per source (for error messages).
GGUF_KEYS = {
    "vocab_size": "llama.vocab_size", "hidden_size": "llama.embedding_length",
    "intermediate_size": "llama.feed_forward_length", "num_layers": "llama.block_count",
    "num_heads": "llama.attention.head_count", "num_kv_heads": "llama.attention.head_count_kv",
    "head_dim": "llama.attention.key_length", "rope_theta": "llama.rope.freq_base",
    "rms_norm_eps": "llama.attention.layer_norm_rms_epsilon",
    "max_position_embeddings": "llama.context_length",
    "bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
}
HF_KEYS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "rope_theta": "rope_theta", "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings", "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
}
_POSITIVE = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
             "num_kv_heads", "head_dim", "max_position_embeddings")


def check_config(cfg: LlamaConfig, path: Path | str, keys: dict[str, str] | None = None
                 ) -> LlamaConfig:
    """``cfg`` if its values are sane (sizes positive, heads grouping evenly, finite positive
    RoPE base, a small norm epsilon, special ids inside the vocabulary); ``keys`` maps fields
    to the source's key names for the message (the field names by default)."""
    keys = keys or {}

    def bad(field: str, why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: {keys.get(field, field)} = {getattr(cfg, field)!r} "
                              f"{why}")

    for f in _POSITIVE:
        v = getattr(cfg, f)
        if not isinstance(v, int) or v < 1:
            raise bad(f, "(must be a positive integer)")
    if cfg.num_heads % cfg.num_kv_heads:
        raise bad("num_heads", f"is not a multiple of {keys.get('num_kv_heads', 'num_kv_heads')}"
                               f" = {cfg.num_kv_heads}")
    if not (math.isfinite(cfg.rope_theta) and cfg.rope_theta > 0):
        raise bad("rope_theta", "(must be finite and positive)")
    if not (math.isfinite(cfg.rms_norm_eps) and 0 <= cfg.rms_norm_eps < 1):
        raise bad("rms_norm_eps", "(must be in [0, 1))")
    for f in ("bos_token_id", "eos_token_id"):
        v = getattr(cfg, f)
        ids = v if isinstance(v, tuple) else () if v is None else (v,)  # eos: one or several
        if not all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in ids):
            raise bad(f, f"is outside the vocabulary ({cfg.vocab_size} tokens)")
    return cfg


_HF_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
_HF_OPTIONAL = {"num_key_value_heads": int, "head_dim": int, "max_position_embeddings": int,
                "rope_theta": (int, float), "rms_norm_eps": (int, float),
                "tie_word_embeddings": bool, "rope_traditional": bool, "attention_bias": bool,
                "mlp_bias": bool, "rope_scaling": dict}


def check_hf_config(hf: Any, path: Path | str) -> dict[str, Any]:
    """``hf`` (a parsed config.json) if it is an object whose llama keys have the right types
    and positive head counts; the error names the key."""
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(hf).__name__}")
    for key in _HF_INTS:
        require(hf, str(path), key, int)
    for key, kind in _HF_OPTIONAL.items():
        if hf.get(key) is not None:
            require(hf, str(path), key, kind)
    for key in ("bos_token_id", "eos_token_id"):
        v = hf.get(key)
        ids = v if isinstance(v, list) else [] if v is None else [v]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ModelLoadError(f"{path}: key {key!r} is {v!r:.40}, expected a token id")
    for key in ("num_attention_heads", "num_key_value_heads", "hidden_size"):
        if hf.get(key) is not None and hf[key] < 1:
            raise ModelLoadError(f"{path}: key {key!r} is {hf[key]} (must be positive)")
    return hf


def check_layer_count(names: Any, num_layers: int, where: str, key: str,
                      prefix: str = "model.layers.") -> None:
    """The tensors ``names`` must hold exactly ``num_layers`` blocks (``key`` says so), checked
    before anything is sized by that count."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m[1]) for n in names if (m := pat.match(n))}
    if found and max(found) + 1 != num_layers:
        raise ModelLoadError(f"{where}: {key} = {num_layers}, but the tensors hold "
                             f"{max(found) + 1} layers")
