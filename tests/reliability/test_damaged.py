"""Damaged model files: every loader names the file and the tensor or key at fault, in one
line (exit 2), and never loads a damaged header into a model of garbage.

The sources are real files written by jaxq itself: the tiny GGUF of ``_probe.tiny_gguf``, an
HF directory and an mlx-lm directory exported from it, and a jaxq directory from
``jaxq compress --no-eval``. Each test copies one, damages it and runs ``jaxq info`` on it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from _probe import expect_clear_error
from _sources import copy as copy_to
from _sources import sources as tiny_sources

pytestmark = pytest.mark.bad_input


# --- sources ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources() -> dict[str, Path]:
    """The tiny GGUF and the HF, mlx (4-bit) and jaxq directories made from it."""
    return tiny_sources()


def copy(sources: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    return copy_to(sources[kind], tmp_path)


def info_fails(path: Path, *names: str, capsys, tmp_path: Path) -> str:
    """``jaxq info path`` exits 2 with one line naming ``path``'s file and ``names``."""
    return expect_clear_error(["info", str(path)], *names, capsys=capsys, watch=[tmp_path])


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)  # mutates data in place
    path.write_text(json.dumps(data))


# --- GGUF byte surgery -------------------------------------------------------------------------

def gguf_part(path: Path, name: str, part: int = -1) -> tuple[int, int]:
    """(byte offset, byte length) of one part of a metadata field or a tensor's info (tensor
    info parts: name length, name, n_dims, dims, type, offset)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    field = r.fields.get(name) or next(t.field for t in r.tensors if t.name == name)
    arr = field.parts[part]
    base = r.data.__array_interface__["data"][0]
    return arr.__array_interface__["data"][0] - base, arr.nbytes


def poke(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def set_gguf_u32(path: Path, key: str, value: int) -> None:
    off, n = gguf_part(path, key)
    assert n == 4
    poke(path, off, struct.pack("<I", value))


# --- GGUF ------------------------------------------------------------------------------------

def test_gguf_head_count_not_dividing_width(sources, tmp_path, capsys):
    """GGUF head_count 4 -> 12 (not dividing 128) -> names llama.attention.head_count, not RoPE."""
    f = copy(sources, "gguf", tmp_path)
    set_gguf_u32(f, "llama.attention.head_count", 12)
    line = info_fails(f, "tiny.gguf", "llama.attention.head_count", "does not divide",
                      capsys=capsys, tmp_path=tmp_path)
    assert "RoPE" not in line


def test_gguf_head_count_against_tensor_shapes(sources, tmp_path, capsys):
    """GGUF head_count 4 -> 8 (divides the width) -> names head_count and blk.0.attn_k.weight."""
    f = copy(sources, "gguf", tmp_path)
    set_gguf_u32(f, "llama.attention.head_count", 8)
    info_fails(f, "tiny.gguf", "llama.attention.head_count", "blk.0.attn_k.weight",
               capsys=capsys, tmp_path=tmp_path)


def test_gguf_zero_kv_heads(sources, tmp_path, capsys):
    """GGUF head_count_kv = 0 -> names llama.attention.head_count_kv (no ZeroDivisionError)."""
    f = copy(sources, "gguf", tmp_path)
    set_gguf_u32(f, "llama.attention.head_count_kv", 0)
    info_fails(f, "tiny.gguf", "llama.attention.head_count_kv", capsys=capsys,
               tmp_path=tmp_path)


def test_gguf_block_count(sources, tmp_path, capsys):
    """GGUF block_count 2 -> 1<<30 -> names llama.block_count (no billion-layer allocation)."""
    f = copy(sources, "gguf", tmp_path)
    set_gguf_u32(f, "llama.block_count", 1 << 30)
    info_fails(f, "tiny.gguf", "llama.block_count", capsys=capsys, tmp_path=tmp_path)


def test_gguf_tensor_type_flipped(sources, tmp_path, capsys):
    """GGUF tensor type F32 -> F16 (loads to NaN unchecked) -> names the tensor and its new type."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "blk.0.ffn_down.weight", 4)
    poke(f, off, struct.pack("<I", 1))  # GGML type 1 = F16
    info_fails(f, "tiny.gguf", "blk.0.ffn_down.weight", "F16", capsys=capsys,
               tmp_path=tmp_path)


def test_gguf_tensor_type_unknown(sources, tmp_path, capsys):
    """GGUF tensor type 0 -> 99 (no such type) -> one line naming the file."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "blk.0.ffn_down.weight", 4)
    poke(f, off, struct.pack("<I", 99))
    info_fails(f, "tiny.gguf", "99", capsys=capsys, tmp_path=tmp_path)


def test_gguf_tensor_offset_moved(sources, tmp_path, capsys):
    """GGUF tensor data offset + 4096 (aligned, inside the file) -> names the overlapping tensor."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "blk.0.ffn_gate.weight", 5)
    (value,) = struct.unpack("<Q", f.read_bytes()[off:off + 8])
    poke(f, off, struct.pack("<Q", value + 4096))
    info_fails(f, "tiny.gguf", "blk.0.ffn_gate.weight", "overlap", capsys=capsys,
               tmp_path=tmp_path)


def test_gguf_tensor_offset_misaligned(sources, tmp_path, capsys):
    """GGUF tensor data offset + 4 (off the 32-byte alignment) -> names the tensor, alignment."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "blk.0.ffn_gate.weight", 5)
    (value,) = struct.unpack("<Q", f.read_bytes()[off:off + 8])
    poke(f, off, struct.pack("<Q", value + 4))
    info_fails(f, "tiny.gguf", "blk.0.ffn_gate.weight", "alignment", capsys=capsys,
               tmp_path=tmp_path)


def test_gguf_tensor_offset_past_the_end(sources, tmp_path, capsys):
    """GGUF tensor data offset past the end of the file -> names the tensor."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "output_norm.weight", 5)
    poke(f, off, struct.pack("<Q", 1 << 40))
    info_fails(f, "tiny.gguf", "output_norm.weight", capsys=capsys, tmp_path=tmp_path)


def test_gguf_tensor_shape_flipped(sources, tmp_path, capsys):
    """GGUF tensor dim 256 -> 128 (half the data unclaimed) -> names the tensor."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "blk.0.ffn_down.weight", 3)
    poke(f, off, struct.pack("<Q", 128))
    info_fails(f, "tiny.gguf", "blk.0.ffn_down.weight", capsys=capsys, tmp_path=tmp_path)


def test_gguf_rope_base_nan(sources, tmp_path, capsys):
    """GGUF rope.freq_base = NaN -> names llama.rope.freq_base."""
    f = copy(sources, "gguf", tmp_path)
    off, _ = gguf_part(f, "llama.rope.freq_base")
    poke(f, off, struct.pack("<f", math.nan))
    info_fails(f, "tiny.gguf", "llama.rope.freq_base", capsys=capsys, tmp_path=tmp_path)


def test_gguf_bos_id_outside_vocab(sources, tmp_path, capsys):
    """GGUF bos_token_id beyond the vocabulary -> names tokenizer.ggml.bos_token_id."""
    f = copy(sources, "gguf", tmp_path)
    set_gguf_u32(f, "tokenizer.ggml.bos_token_id", 70000)
    info_fails(f, "tiny.gguf", "tokenizer.ggml.bos_token_id", capsys=capsys, tmp_path=tmp_path)


def test_gguf_token_not_utf8(sources, tmp_path, capsys):
    """GGUF vocabulary string with an invalid UTF-8 byte -> names tokenizer.ggml.tokens."""
    import gguf

    f = copy(sources, "gguf", tmp_path)
    r = gguf.GGUFReader(str(f))
    field = r.fields["tokenizer.ggml.tokens"]
    arr = field.parts[field.data[100]]
    off = arr.__array_interface__["data"][0] - r.data.__array_interface__["data"][0]
    del r
    poke(f, off, b"\xff")
    info_fails(f, "tiny.gguf", "tokenizer.ggml.tokens", capsys=capsys, tmp_path=tmp_path)


def test_gguf_merges_damaged(sources, tmp_path, capsys):
    """GGUF merge 'a b' -> 'a\\x01b' (no space) -> names tokenizer.ggml.merges."""
    import gguf

    f = copy(sources, "gguf", tmp_path)
    r = gguf.GGUFReader(str(f))
    field = r.fields["tokenizer.ggml.merges"]
    arr = field.parts[field.data[0]]
    text = bytes(arr)
    off = arr.__array_interface__["data"][0] - r.data.__array_interface__["data"][0]
    del r
    poke(f, off + text.index(b" "), b"\x01")
    info_fails(f, "tiny.gguf", "tokenizer.ggml.merges", capsys=capsys, tmp_path=tmp_path)


# --- HF directories ----------------------------------------------------------------------------

def test_hf_config_not_an_object(sources, tmp_path, capsys):
    """HF config.json valid JSON but a list -> names config.json, 'expected a JSON object'."""
    d = copy(sources, "hf", tmp_path)
    (d / "config.json").write_text("[1, 2]")
    info_fails(d, "config.json", "object", capsys=capsys, tmp_path=tmp_path)


def test_hf_config_key_missing(sources, tmp_path, capsys):
    """HF config.json without num_attention_heads -> names config.json and the key."""
    d = copy(sources, "hf", tmp_path)
    edit_json(d / "config.json", lambda c: c.pop("num_attention_heads"))
    info_fails(d, "config.json", "num_attention_heads", capsys=capsys, tmp_path=tmp_path)


def test_hf_config_wrong_type(sources, tmp_path, capsys):
    """HF config.json hidden_size "128" (a string) -> names config.json and hidden_size."""
    d = copy(sources, "hf", tmp_path)
    edit_json(d / "config.json", lambda c: c.update(hidden_size="128"))
    info_fails(d, "config.json", "hidden_size", capsys=capsys, tmp_path=tmp_path)


def test_hf_config_absurd_layer_count(sources, tmp_path, capsys):
    """HF config.json num_hidden_layers = 1<<30 -> names num_hidden_layers (allocates nothing)."""
    d = copy(sources, "hf", tmp_path)
    edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=1 << 30))
    info_fails(d, "config.json", "num_hidden_layers", capsys=capsys, tmp_path=tmp_path)


def test_hf_config_eps_out_of_range(sources, tmp_path, capsys):
    """HF config.json rms_norm_eps = 1e5 -> names config.json and rms_norm_eps."""
    d = copy(sources, "hf", tmp_path)
    edit_json(d / "config.json", lambda c: c.update(rms_norm_eps=1e5))
    info_fails(d, "config.json", "rms_norm_eps", capsys=capsys, tmp_path=tmp_path)


def test_hf_rope_scaling_not_an_object(sources, tmp_path, capsys):
    """HF config.json rope_scaling "linear" (a string) -> names rope_scaling."""
    d = copy(sources, "hf", tmp_path)
    edit_json(d / "config.json", lambda c: c.update(rope_scaling="linear"))
    info_fails(d, "config.json", "rope_scaling", capsys=capsys, tmp_path=tmp_path)


def test_hf_tokenizer_corrupt(sources, tmp_path, capsys):
    """HF tokenizer.json that does not parse -> names tokenizer.json (jaxq info no longer dies)."""
    d = copy(sources, "hf", tmp_path)
    text = (d / "tokenizer.json").read_text()
    (d / "tokenizer.json").write_text(text[: len(text) // 2])
    info_fails(d, "tokenizer.json", capsys=capsys, tmp_path=tmp_path)


def test_hf_tokenizer_config_corrupt(sources, tmp_path, capsys):
    """HF tokenizer_config.json that does not parse -> names tokenizer_config.json."""
    d = copy(sources, "hf", tmp_path)
    (d / "tokenizer_config.json").write_text('{"bos_token": ')
    info_fails(d, "tokenizer_config.json", capsys=capsys, tmp_path=tmp_path)


def rewrite_safetensors_header(f: Path, edit) -> None:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


_NORM = "model.layers.0.input_layernorm.weight"


def test_safetensors_offsets_past_the_end(sources, tmp_path, capsys):
    """safetensors data_offsets beyond the file -> names the file and the tensor."""
    d = copy(sources, "hf", tmp_path)
    rewrite_safetensors_header(d / "model.safetensors",
                               lambda h: h[_NORM].update(data_offsets=[0, 1 << 40]))
    info_fails(d, "model.safetensors", _NORM, capsys=capsys, tmp_path=tmp_path)


def test_safetensors_unknown_dtype(sources, tmp_path, capsys):
    """safetensors dtype "F31" -> names the file, the tensor and the dtype."""
    d = copy(sources, "hf", tmp_path)
    rewrite_safetensors_header(d / "model.safetensors", lambda h: h[_NORM].update(dtype="F31"))
    info_fails(d, "model.safetensors", _NORM, "F31", capsys=capsys, tmp_path=tmp_path)


def test_safetensors_shape_times_dtype(sources, tmp_path, capsys):
    """safetensors shape x dtype != byte length (F32 relabelled F16) -> names the tensor."""
    d = copy(sources, "hf", tmp_path)
    rewrite_safetensors_header(d / "model.safetensors", lambda h: h[_NORM].update(dtype="F16"))
    info_fails(d, "model.safetensors", _NORM, "bytes", capsys=capsys, tmp_path=tmp_path)


def test_safetensors_header_length_damaged(sources, tmp_path, capsys):
    """safetensors header length larger than the file -> names the file."""
    d = copy(sources, "hf", tmp_path)
    poke(d / "model.safetensors", 0, struct.pack("<Q", 1 << 50))
    info_fails(d, "model.safetensors", "header", capsys=capsys, tmp_path=tmp_path)


# --- mlx-lm directories ------------------------------------------------------------------------

_Q = "model.layers.0.self_attn.q_proj"


def drop_tensor(f: Path, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(f))
    del t[name]
    save_file(t, str(f))


def test_mlx_quantization_not_an_object(sources, tmp_path, capsys):
    """mlx-lm config.json quantization "4bit" (not an object) -> names config.json, quantization."""
    d = copy(sources, "mlx", tmp_path)
    edit_json(d / "config.json", lambda c: c.update(quantization="4bit"))
    info_fails(d, "config.json", "quantization", capsys=capsys, tmp_path=tmp_path)


def test_mlx_quantization_entry_lacks_bits(sources, tmp_path, capsys):
    """mlx-lm per-module quantization entry without bits -> names config.json, module, 'bits'."""
    d = copy(sources, "mlx", tmp_path)
    edit_json(d / "config.json",
              lambda c: c["quantization"]["model.embed_tokens"].pop("bits"))
    info_fails(d, "config.json", "model.embed_tokens", "bits", capsys=capsys,
               tmp_path=tmp_path)


def test_mlx_quantization_entry_disagrees(sources, tmp_path, capsys):
    """mlx-lm quantization entry bits 8 -> 3 (codes are 8-bit) -> names the file and the module."""
    d = copy(sources, "mlx", tmp_path)
    edit_json(d / "config.json",
              lambda c: c["quantization"]["model.embed_tokens"].update(bits=3))
    info_fails(d, "model.safetensors", "model.embed_tokens", capsys=capsys, tmp_path=tmp_path)


def test_mlx_missing_scales(sources, tmp_path, capsys):
    """mlx-lm quantized module without .scales -> names the file and <module>.scales."""
    d = copy(sources, "mlx", tmp_path)
    drop_tensor(d / "model.safetensors", f"{_Q}.scales")
    info_fails(d, "model.safetensors", f"{_Q}.scales", capsys=capsys, tmp_path=tmp_path)


def test_mlx_missing_biases(sources, tmp_path, capsys):
    """mlx-lm affine module without .biases -> names the file and <module>.biases."""
    d = copy(sources, "mlx", tmp_path)
    drop_tensor(d / "model.safetensors", f"{_Q}.biases")
    info_fails(d, "model.safetensors", f"{_Q}.biases", capsys=capsys, tmp_path=tmp_path)


def test_mlx_scales_without_weight(sources, tmp_path, capsys):
    """mlx-lm .scales whose module has no .weight -> names <module>.weight."""
    d = copy(sources, "mlx", tmp_path)
    drop_tensor(d / "model.safetensors", f"{_Q}.weight")
    info_fails(d, f"{_Q}.weight", capsys=capsys, tmp_path=tmp_path)


# --- jaxq directories --------------------------------------------------------------------------

def test_jaxq_manifest_deleted(sources, tmp_path, capsys):
    """jaxq directory without manifest.json -> names manifest.json (not "no config.json")."""
    d = copy(sources, "jaxq", tmp_path)
    (d / "manifest.json").unlink()
    line = info_fails(d, "manifest.json", "missing", capsys=capsys, tmp_path=tmp_path)
    assert "config.json" not in line.replace("manifest.json", "")


def test_jaxq_manifest_truncated(sources, tmp_path, capsys):
    """jaxq manifest.json cut in half -> names manifest.json and the line where JSON broke."""
    d = copy(sources, "jaxq", tmp_path)
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text[: len(text) // 2])
    info_fails(d, "manifest.json", "not valid JSON", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_manifest_not_an_object(sources, tmp_path, capsys):
    """jaxq manifest.json that is a JSON array -> names manifest.json, 'expected a JSON object'."""
    d = copy(sources, "jaxq", tmp_path)
    (d / "manifest.json").write_text("[]")
    info_fails(d, "manifest.json", "object", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_manifest_lacks_tree(sources, tmp_path, capsys):
    """jaxq manifest.json without its tree -> names manifest.json and 'tree'."""
    d = copy(sources, "jaxq", tmp_path)
    edit_json(d / "manifest.json", lambda m: m.pop("tree"))
    info_fails(d, "manifest.json", "'tree'", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_manifest_unknown_entry(sources, tmp_path, capsys):
    """jaxq manifest tree entry "dict" -> "dicu" -> names manifest.json and the entry."""
    d = copy(sources, "jaxq", tmp_path)
    edit_json(d / "manifest.json", lambda m: m.update(tree={"dicu": m["tree"]["dict"]}))
    info_fails(d, "manifest.json", "dicu", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_manifest_names_absent_array(sources, tmp_path, capsys):
    """jaxq manifest naming array a999 that arrays/ lacks -> names a999 and its tree path."""
    d = copy(sources, "jaxq", tmp_path)
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text.replace('"array": "a0"', '"array": "a999"', 1))
    info_fails(d, "a999", "/model/", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_leaf_bits_changed(sources, tmp_path, capsys):
    """jaxq manifest leaf bits 4 -> 3 (codes say 4) -> names the leaf's path as inconsistent."""
    d = copy(sources, "jaxq", tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    leaf = m["tree"]["dict"]["model"]["dict"]["layers"]["list"][1]["dict"]["mlp"]["dict"][
        "down_proj"]["dict"]["weight"]["leaf"]
    assert leaf["static"]["bits"] == 4
    leaf["static"]["bits"] = 3
    (d / "manifest.json").write_text(json.dumps(m))
    info_fails(d, "manifest.json", "model/layers/1/mlp/down_proj/weight", "inconsistent",
               capsys=capsys, tmp_path=tmp_path)


def test_jaxq_saved_config_damaged(sources, tmp_path, capsys):
    """jaxq manifest metadata.config num_heads = 0 -> names manifest.json and num_heads."""
    d = copy(sources, "jaxq", tmp_path)
    edit_json(d / "manifest.json", lambda m: m["metadata"]["config"].update(num_heads=0))
    info_fails(d, "manifest.json", "num_heads", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_saved_config_disagrees_with_arrays(sources, tmp_path, capsys):
    """jaxq manifest metadata.config intermediate_size 256 -> 512 -> names the tensors at odds."""
    d = copy(sources, "jaxq", tmp_path)
    edit_json(d / "manifest.json",
              lambda m: m["metadata"]["config"].update(intermediate_size=512))
    info_fails(d, "saved config", "gate_proj", capsys=capsys, tmp_path=tmp_path)


def _biggest_array_file(d: Path) -> Path:
    return max((p for p in (d / "arrays").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def test_jaxq_orbax_chunk_truncated(sources, tmp_path, capsys):
    """jaxq orbax chunk file cut in half -> names the file and both sizes (manifest's file list)."""
    d = copy(sources, "jaxq", tmp_path)
    f = _biggest_array_file(d)
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    info_fails(d, f.name, str(size), capsys=capsys, tmp_path=tmp_path)


def test_jaxq_orbax_chunk_unreadable(sources, tmp_path, capsys):
    """jaxq orbax chunk zeroed (same size) -> names the directory and the array, no traceback."""
    d = copy(sources, "jaxq", tmp_path)
    f = _biggest_array_file(d)
    f.write_bytes(bytes(f.stat().st_size))
    line = info_fails(d, str(d), "array a", capsys=capsys, tmp_path=tmp_path)
    assert "/model/" in line  # the tree path of the array


def test_jaxq_listed_file_missing(sources, tmp_path, capsys):
    """jaxq directory missing a file its manifest lists (tokenizer.json) -> names the file."""
    d = copy(sources, "jaxq", tmp_path)
    (d / "tokenizer.json").unlink()
    info_fails(d, "tokenizer.json", "missing", capsys=capsys, tmp_path=tmp_path)


def test_jaxq_tokenizer_corrupt(sources, tmp_path, capsys):
    """jaxq tokenizer.json of the same size but broken JSON -> names tokenizer.json."""
    d = copy(sources, "jaxq", tmp_path)
    raw = bytearray((d / "tokenizer.json").read_bytes())
    raw[0:1] = b"["
    (d / "tokenizer.json").write_bytes(bytes(raw))
    info_fails(d, "tokenizer.json", capsys=capsys, tmp_path=tmp_path)

