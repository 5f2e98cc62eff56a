"""Import a GGUF file (llama.cpp's format) of the `llama`, `qwen2`, `starcoder2`, `gemma` or
`granite` architecture as a ModelSource: weights under our names, a rebuilt `tokenizers` tokenizer,
token facts.

The header is parsed here (a few hundred thousand vocabulary strings take ~0.3 s this way,
~13 s through gguf.GGUFReader); tensor payloads are dequantized by `gguf.quants.dequantize`.
llama.cpp's converter interleaves the q/k rows of `llama` and `granite` models for its RoPE
kernel; we undo that. The other architectures keep the Hugging Face (half-split) layout and load as
they are. What llama.cpp hard-codes per architecture rather than writing to the file
(StarCoder2's LayerNorm and ungated GELU MLP, Gemma's GeGLU and sqrt(dim) embedding scale)
is ARCH_FIELDS; llama.cpp's converter already stored Gemma's norm weights as 1 + weight.

Precision (one switch, `--precision`, see `gguf_precision`): by default a tensor keeps its
precision class. 4-bit types (Q4_0, Q4_1, Q4_K, IQ4_*, and the 2/3-bit K types, which fit
4 bits) become 4-bit blockwise weights for onnxruntime's MatMulNBits (Q4_0 exactly; the
others requantized per block of 32, see folder.quantize_rows_q4); Q8_0 and Q5_0 become
int8 blockwise (a scale per block of 32: their own codes and scales, exactly); the other
5-, 6- and 8-bit types become int8 per output channel; float tensors stay float. `fp32` widens everything
(exact), `int8` makes every 2-D weight int8 per channel. Conversion goes tensor by tensor
in row chunks, so no whole float32 model is ever held.

The converted model is cached as a model folder keyed by the file's sha256 and the
precision, under $CODECOMPLETE_CACHE (default ~/.cache/codecomplete)/gguf/: it holds what
the runtime runs, and the second start skips the slow dequantization.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from codecomplete.hub import cache_root

from .config import ModelConfig
from .folder import (
    FORMAT,
    Q4_BLOCK,
    SCALE_SUFFIX,
    ModelLoadError,
    Q4Weight,
    dropping_mapped_pages,
    is_model_folder,
    open_model_folder,
    param_shapes,
    quantize_rows_int8,
    quantize_rows_q4,
    write_safetensors,
)
from .hf_import import MAX_SEQ_LEN_CAP, TokenFacts, find_token_facts, pad_tokenizer_to
from .source import ModelSource
from .tokenizer import LLAMA3_SPLIT_PATTERN, QWEN2_SPLIT_PATTERN

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "starcoder2", "gemma", "granite")
PERMUTED_ARCHITECTURES = ("llama", "granite")  # q/k rows interleaved by llama.cpp's converter
# ModelConfig fields that llama.cpp builds into its graph for an architecture
ARCH_FIELDS: dict[str, dict] = {
    "starcoder2": dict(norm_kind="layer", mlp_gated=False, activation="gelu_tanh"),
    "gemma": dict(activation="gelu_tanh"),  # and embedding_scale sqrt(dim), see gguf_model_config
}
# StarCoder2 was trained with a 4096-token window, which llama.cpp's converter does not write
# (nor does llama.cpp apply one): such a file's context is capped there, where windowed and
# full attention agree, unless it names its window (`starcoder2.attention.sliding_window`)
STARCODER2_SLIDING_WINDOW = 4096
REMOVED_CACHE_DTYPE_ENV = "CODECOMPLETE_GGUF_CACHE_DTYPE"  # replaced by --precision: refused when set
# what a GGUF is converted to: the file's precision class, float32 throughout, int8
# throughout, 4-bit throughout (every 2-D weight but the embedding table, which is int8)
GGUF_PRECISIONS = ("native", "fp32", "int8", "int4")
CONVERTER_VERSION = 3  # part of the cache key: bump when conversion changes
CHUNK_FLOAT_BYTES = 8 << 20  # rows dequantized at a time: float32 bytes in flight per tensor
# ggml types converted to 4-bit blocks (by name: older gguf packages lack some)
FOUR_BIT_TYPES = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K", "IQ3_S", "IQ3_XXS",
                  "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# ggml types whose blocks of 32 are int8 codes times one scale: kept as blockwise int8, exactly
BLOCKWISE_INT8_TYPES = ("Q8_0", "Q5_0")

# GGUF metadata value types
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
                 6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9

# token types in tokenizer.ggml.token_type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split regexes by tokenizer.ggml.pre (facts from the models' tokenizer.json)
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_QWEN2_SPLIT = QWEN2_SPLIT_PATTERN
_LLAMA3_SPLIT = LLAMA3_SPLIT_PATTERN
PRE_TOKENIZER_SPLITS: dict[str, list[str]] = {
    "default": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-v3": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "starcoder": [r"\p{N}", _GPT2_SPLIT],  # single digits, then GPT-2's split
    "refact": [r"\p{N}", _GPT2_SPLIT],  # llama.cpp splits Granite's (and Refact's) as StarCoder's
    # DeepSeek-Coder (v1): newlines, letters, punctuation, CJK runs and single digits apart
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+", r"\p{N}"],
}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}  # whole words in the vocabulary skip the merges
_NFC = {"qwen2", "deepseek-r1-qwen"}

_LAYER_PARTS = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_up": "feed_forward.w3",
    "ffn_down": "feed_forward.w2",
}
_TOP_LEVEL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",
    "output.weight": "output.weight",
}


@dataclass
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: (rows, columns); GGUF stores the reverse
    offset: int  # absolute byte offset in the file


class GGUFFile:
    """A GGUF file's metadata and tensor table over a read-only memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: cannot open ({e})") from e
        try:
            self.metadata, self.tensors = _parse_header(self._map)
        except (struct.error, ValueError, UnicodeDecodeError, IndexError) as e:
            self.close()
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({e})") from e

    @property
    def mapped(self) -> mmap.mmap:
        """The file's read-only memory map."""
        return self._map

    def close(self) -> None:
        self._map.close()
        self._file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> np.ndarray:
        """The named tensor as a float32 array, dequantized."""
        raw, qtype = self.raw(name)
        return dequantize_raw(raw, qtype, self.path, name)

    def raw(self, name: str):
        """The named tensor's bytes as a read-only uint8 view (*rows, row_bytes) of the
        mapped file, and its gguf.GGMLQuantizationType."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        info = self.tensors[name]
        try:
            qtype = GGMLQuantizationType(info.ggml_type)
        except ValueError as e:
            raise ModelLoadError(f"{self.path}: tensor {name} has unknown type {info.ggml_type}") from e
        block, type_size = GGML_QUANT_SIZES[qtype]
        *rows, cols = info.shape
        if cols % block:
            raise ModelLoadError(f"{self.path}: tensor {name} row of {cols} is not whole {qtype.name} blocks")
        n_rows = int(np.prod(rows)) if rows else 1
        row_bytes = cols // block * type_size
        if info.offset + n_rows * row_bytes > len(self._map):
            raise ModelLoadError(f"{self.path}: truncated (tensor {name} ends past the file)")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=n_rows * row_bytes, offset=info.offset)
        return raw.reshape(*rows, row_bytes), qtype


def dequantize_raw(raw: np.ndarray, qtype, path, name: str) -> np.ndarray:
    """float32 values of raw GGUF rows (*rows, row_bytes) of type qtype."""
    from gguf.quants import dequantize as gguf_dequantize

    if qtype.name == "F32":
        return raw.view(np.float32).copy()
    try:
        return np.asarray(gguf_dequantize(raw, qtype), dtype=np.float32)
    except NotImplementedError as e:
        raise ModelLoadError(f"{path}: cannot dequantize {qtype.name} (tensor {name})") from e


def q4_0_as_q4(raw: np.ndarray) -> Q4Weight:
    """Q4_0 rows (rows, n_blocks * 18 bytes) as a Q4Weight, exactly: a Q4_0 block is a
    float16 scale d and 32 codes q (elements 0..15 in the low nibbles, 16..31 in the high
    ones), w = d * (q - 8), which is MatMulNBits' (q - zero) * scale with zero 8."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 18)
    scales = _f16_block_scales(blocks)
    qs = blocks[:, :, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (rows, n_blocks, 32) in element order
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return Q4Weight(packed, scales, np.full(scales.shape, 8, np.uint8))


def _f16_block_scales(blocks: np.ndarray) -> np.ndarray:
    """The float16 scale d that starts each block (rows, n_blocks, block_bytes), as float32."""
    return blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)


def q8_0_as_blockwise(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows (rows, n_blocks * 34 bytes) as blockwise int8 (codes (rows, in), scales
    (rows, n_blocks)), exactly: a block is a float16 scale d and 32 int8 codes q, w = d * q."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 34)
    codes = blocks[:, :, 2:].view(np.int8).reshape(rows, -1)
    return np.ascontiguousarray(codes), _f16_block_scales(blocks)


def q5_0_as_blockwise(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0 rows (rows, n_blocks * 22 bytes) as blockwise int8, exactly: a block is a float16
    scale d, 32 high bits (a little-endian uint32, bit i for element i) and 32 low nibbles
    (elements 0..15 in the low nibbles of 16 bytes, 16..31 in the high ones); w = d * (q - 16)
    with q = low | high << 4, so the int8 code is q - 16 (-16..15)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 22)
    high_bits = blocks[:, :, 2:6].copy().view("<u4")  # (rows, n_blocks, 1)
    high = ((high_bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4  # (rows, n_blocks, 32)
    qs = blocks[:, :, 6:]
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    codes = ((low | high).astype(np.int16) - 16).astype(np.int8).reshape(rows, -1)
    return codes, _f16_block_scales(blocks)


BLOCKWISE_INT8_READERS = {"Q8_0": q8_0_as_blockwise, "Q5_0": q5_0_as_blockwise}


class _Cursor:
    """Little-endian reads from a buffer, advancing an offset."""

    def __init__(self, buf, offset: int = 0):
        self.buf, self.pos = buf, offset

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype in _ARRAY_DTYPES:
                dtype = np.dtype(_ARRAY_DTYPES[etype])
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            return [self.value(etype) for _ in range(count)]  # arrays of arrays
        if vtype not in _SCALAR_FORMATS:
            raise ValueError(f"unknown metadata value type {vtype}")
        return self.scalar(_SCALAR_FORMATS[vtype])


def _parse_header(buf) -> tuple[dict, dict[str, GGUFTensorInfo]]:
    if buf[:4] != b"GGUF":
        raise ValueError("bad magic (not GGUF)")
    cur = _Cursor(buf, 4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (2 or 3; big-endian files are not)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        dims = [cur.scalar("<Q") for _ in range(n_dims)]
        ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos.append((name, ggml_type, tuple(reversed(dims)), offset))
    align = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors = {name: GGUFTensorInfo(name, t, shape, data_start + off) for name, t, shape, off in infos}
    return metadata, tensors


# ---------------------------------------------------------------- tokenizer


def _merge_pairs(merges: list[str]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) for m in merges]


def _sentencepiece_merges(tokens: list[str], scores, types) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece vocabulary: a pair merges when the
    concatenation is a normal token, higher-scored concatenations first."""
    ids = {}
    for i, t in enumerate(tokens):
        if types[i] == NORMAL:
            ids.setdefault(t, i)
    found = []
    for piece, idx in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                found.append((-float(scores[idx]), idx, ids[left], ids[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_gguf_tokenizer(meta: dict, extra_special_ids: set[int] = frozenset()):
    """A `tokenizers.Tokenizer` rebuilt from tokenizer.ggml.* metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ModelLoadError("GGUF file has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_SPLITS:
            raise ModelLoadError(f"GGUF pre-tokenizer {pre!r} is not supported "
                                 f"(supported: {', '.join(PRE_TOKENIZER_SPLITS)})")
        merges = _merge_pairs(meta.get("tokenizer.ggml.merges") or [])
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
        if pre in _NFC:
            tok.normalizer = normalizers.NFC()
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama":  # SentencePiece BPE with byte fallback (Llama 2, CodeLlama)
        scores = meta.get("tokenizer.ggml.scores")
        merges = meta.get("tokenizer.ggml.merges")
        if merges is not None:
            pairs = _merge_pairs(merges)
        elif scores is not None:
            pairs = _sentencepiece_merges(tokens, scores, types)
        else:
            raise ModelLoadError("SentencePiece GGUF vocabulary has neither merges nor scores")
        unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, unk_token=tokens[unk_id], fuse_unk=True,
                                   byte_fallback=True))
        rules = [normalizers.Replace(" ", "\u2581")]
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            rules.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(rules)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        raise ModelLoadError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 or llama)")
    special_types = (CONTROL, UNKNOWN, UNUSED)
    special = [AddedToken(t, special=True, normalized=False) for i, t in enumerate(tokens)
               if (types[i] in special_types or i in extra_special_ids) and vocab[t] == i]
    user = [AddedToken(t, special=False, normalized=False) for i, t in enumerate(tokens)
            if types[i] == USER_DEFINED and i not in extra_special_ids and vocab[t] == i]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok


def gguf_tokenizer_json(path: str | Path) -> str:
    """The file's tokenizer as compact tokenizer.json text, padded to the embedding's rows
    (Qwen: 151,936), merges written as "a b" strings (a byte-level token never holds a
    space; 0.6 MB less). Only the header is read, so the first piece of a file split for
    carrying is enough."""
    with GGUFFile(path) as gf:
        facts = gguf_token_facts(gf.metadata)
        tok = build_gguf_tokenizer(gf.metadata, facts.ids())
        vocab_size = gf.tensors["token_embd.weight"].shape[0]
    pad_tokenizer_to(tok, vocab_size)
    data = json.loads(tok.to_str())
    merges = data["model"].get("merges") or []
    if merges and not isinstance(merges[0], str) and not any(" " in a or " " in b for a, b in merges):
        data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _meta_id(meta: dict, key: str) -> int:
    value = meta.get(f"tokenizer.ggml.{key}")
    return -1 if value is None else int(value)


def gguf_token_facts(meta: dict) -> TokenFacts:
    """BOS/EOS/pad and FIM ids from metadata, completed by the token texts."""
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    default_add_bos = meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in _IGNORE_MERGES
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
    eos = [_meta_id(meta, k) for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    facts = find_token_facts(vocab, eos, _meta_id(meta, "bos_token_id") if add_bos else -1,
                             _meta_id(meta, "padding_token_id"))
    for field_name, keys in (("fim_prefix_id", ("fim_pre_token_id", "prefix_token_id")),
                             ("fim_suffix_id", ("fim_suf_token_id", "suffix_token_id")),
                             ("fim_middle_id", ("fim_mid_token_id", "middle_token_id")),
                             ("fim_pad_id", ("fim_pad_token_id",)),
                             ("file_sep_id", ("fim_sep_token_id",))):
        ids = [_meta_id(meta, k) for k in keys if _meta_id(meta, k) >= 0]
        if ids:
            setattr(facts, field_name, ids[0])
    for stop in (facts.fim_pad_id, facts.file_sep_id, _meta_id(meta, "fim_rep_token_id")):
        if stop >= 0 and stop not in facts.eos_ids:
            facts.eos_ids.append(stop)
    return facts


# ---------------------------------------------------------------- config and weights


def gguf_model_config(gf: GGUFFile, facts: TokenFacts) -> ModelConfig:
    """ModelConfig from `<arch>.*` metadata and the tensor table."""
    arch = gf.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{gf.path}: GGUF architecture {arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def key(name, default=None):
        value = gf.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{gf.path}: metadata {arch}.{name} is missing")
        if isinstance(value, np.ndarray):
            raise ModelLoadError(f"{gf.path}: per-layer {arch}.{name} is not supported")
        return value

    if "rope_freqs.weight" in gf.tensors:
        raise ModelLoadError(f"{gf.path}: Llama 3.1-style rope frequency scaling is not supported yet")
    old_linear = gf.get(f"{arch}.rope.scale_linear")  # the key before rope.scaling.* (older files)
    scaling = gf.get(f"{arch}.rope.scaling.type", "linear" if old_linear else "none")
    factor = float(gf.get(f"{arch}.rope.scaling.factor", old_linear or 1.0) or 1.0)
    if scaling not in ("none", "linear"):
        raise ModelLoadError(f"{gf.path}: rope scaling {scaling!r} (factor {factor}) is not supported yet")
    dim, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        raise ModelLoadError(f"{gf.path}: partial rotary embeddings are not supported")
    vocab_size = gf.tensors["token_embd.weight"].shape[0]
    fields = dict(ARCH_FIELDS.get(arch, {}))
    if arch == "gemma":
        fields["embedding_scale"] = float(dim) ** 0.5
    if arch == "granite":  # the multipliers of its config.json, under llama.cpp's names
        fields.update(embedding_scale=float(key("embedding_scale", 1.0)), attention_scale=float(key("attention.scale", 0.0)),
                      residual_scale=float(key("residual_scale", 1.0)), logits_divisor=float(key("logit_scale", 1.0)))
    layer_norm = fields.get("norm_kind") == "layer"
    eps = float(key("attention.layer_norm_epsilon", 1e-5) if layer_norm else key("attention.layer_norm_rms_epsilon", 1e-5))
    max_len = min(int(key("context_length", 4096)), MAX_SEQ_LEN_CAP)
    window = int(key("attention.sliding_window", 0))
    if arch == "starcoder2" and not window:
        max_len = min(max_len, STARCODER2_SLIDING_WINDOW)
    return ModelConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(key("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(key("feed_forward_length")),
        max_seq_len=max_len,
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_linear_factor=factor if scaling == "linear" else 1.0,
        norm_eps=eps,
        qkv_bias="blk.0.attn_q.bias" in gf.tensors,
        wo_bias="blk.0.attn_output.bias" in gf.tensors,
        mlp_bias="blk.0.ffn_down.bias" in gf.tensors,
        tie_embeddings="output.weight" not in gf.tensors,
        sliding_window=window if window < max_len else 0,
        **fields,
        align_back_off="fixed",  # see ModelConfig.align_back_off
        **facts.config_fields(),
    )


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it interleaves rows i and
    i + D/2 (pairs for its RoPE kernel); ours keeps the two halves apart."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def our_param_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_PARTS and parts[3] in ("weight", "bias"):
        return f"layers.{parts[1]}.{_LAYER_PARTS[parts[2]]}.{parts[3]}"
    return None


def gguf_precision(precision: str | None) -> str:
    """What a runtime precision (`--precision`) converts a GGUF to: fp32 -> fp32, int8 and
    its linear kinds (int8-w7, ...) -> int8, int4 -> int4, everything else (auto, bf16,
    fp16, and int8-nbits, which runs Q8_0/Q5_0 blocks exactly) -> native, the file's own
    precision class. Refuses the removed environment variable."""
    if os.environ.get(REMOVED_CACHE_DTYPE_ENV):
        raise ModelLoadError(f"{REMOVED_CACHE_DTYPE_ENV} is no longer read: use --precision "
                             "(auto keeps the GGUF's precision class, int8 or fp32 convert it)")
    precision = precision or "auto"
    if precision in GGUF_PRECISIONS:
        return precision
    if precision == "int8-nbits":  # the one int8 kind with a scale per block: Q8_0/Q5_0 run as stored
        return "native"
    if precision == "int8" or precision.startswith("int8-"):
        return "int8"
    return "native"


def _gguf_names(gf: GGUFFile, cfg: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> our name, every expected parameter present."""
    names = {}
    for gguf_name in gf.tensors:
        name = our_param_name(gguf_name)
        if name is None:
            raise ModelLoadError(f"{gf.path}: tensor {gguf_name!r} is not one this importer knows")
        names[gguf_name] = name
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise ModelLoadError(f"{gf.path}: tensors missing for {missing[:5]}")
    for gguf_name, name in names.items():
        if gf.tensors[gguf_name].shape != expected.get(name, gf.tensors[gguf_name].shape):
            raise ModelLoadError(f"{gf.path}: {name} has shape {gf.tensors[gguf_name].shape}, "
                                 f"expected {expected[name]}")
    return names


def convert_tensor(gf: GGUFFile, gguf_name: str, name: str, cfg: ModelConfig, precision: str) -> dict[str, np.ndarray]:
    """One GGUF tensor as the model folder stores it under `precision` (GGUF_PRECISIONS):
    {name: float} or {name: int8, name_scale: float32 (rows,) or, blockwise, (rows, in/32)}
    or Q4Weight.tensors(name).
    2-D tensors are dequantized a chunk of rows at a time."""
    raw, qtype = gf.raw(gguf_name)
    permuted = gf.get("general.architecture") in PERMUTED_ARCHITECTURES and name.endswith(
        ("wq.weight", "wq.bias", "wk.weight", "wk.bias"))
    heads = cfg.n_heads if ".wq." in name else cfg.n_kv_heads
    if raw.ndim == 1:  # a bias or norm: its bytes are one row, values are what we permute
        w = dequantize_raw(raw, qtype, gf.path, name)
        return {name: unpermute_rope_rows(w, heads) if permuted else w}
    if permuted:
        raw = unpermute_rope_rows(raw, heads)  # rows are whole blocks: permute before dequantizing
    if precision == "fp32":
        return {name: dequantize_raw(raw, qtype, gf.path, name)}
    rows, cols = raw.shape[0], gf.tensors[gguf_name].shape[-1]
    if precision == "native" and qtype.name in FLOAT_TYPES:
        w = dequantize_raw(raw, qtype, gf.path, name)
        return {name: w.astype(np.float16) if qtype.name == "F16" else w}
    to_q4 = cols % Q4_BLOCK == 0 and name != "tok_embeddings.weight" and (
        precision == "int4" or (precision == "native" and qtype.name in FOUR_BIT_TYPES))
    if to_q4 and qtype.name == "Q4_0":
        return q4_0_as_q4(raw).tensors(name)
    if precision == "native" and qtype.name in BLOCKWISE_INT8_READERS:
        codes, scales = BLOCKWISE_INT8_READERS[qtype.name](raw)
        return {name: codes, name + SCALE_SUFFIX: scales}
    chunk = max(1, CHUNK_FLOAT_BYTES // (4 * cols))
    parts = []
    for start in range(0, rows, chunk):
        w = dequantize_raw(raw[start:start + chunk], qtype, gf.path, name)
        parts.append(quantize_rows_q4(w) if to_q4 else quantize_rows_int8(w))
    if to_q4:
        return Q4Weight(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("packed", "scales", "zeros"))).tensors(name)
    return {name: np.concatenate([q for q, _ in parts]), name + SCALE_SUFFIX: np.concatenate([s for _, s in parts])}


class _Progress:
    """A one-line progress bar on stderr when it is a terminal (stdout may be the LSP
    channel), else a log line every 10%."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done, self.start = max(total, 1), label, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self._logged = -1

    def step(self, amount: int) -> None:
        self.done += amount
        frac = self.done / self.total
        if self.tty:
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {100 * frac:3.0f}% {time.monotonic() - self.start:.0f}s")
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif int(10 * frac) > self._logged:
            self._logged = int(10 * frac)
            log.info("%s: %.0f%% (%.0f s)", self.label, 100 * frac, time.monotonic() - self.start)


def gguf_weights(gf: GGUFFile, cfg: ModelConfig, precision: str = "fp32", show_progress: bool = False
                 ) -> dict[str, np.ndarray]:
    """Weights under our names (q/k unpermuted for llama and granite), converted tensor by tensor as
    `precision` says (GGUF_PRECISIONS; fp32: the file's values exactly, widened)."""
    if precision not in GGUF_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(GGUF_PRECISIONS)}, not {precision!r}")
    names = _gguf_names(gf, cfg)
    bar = _Progress(sum(int(np.prod(gf.tensors[n].shape)) for n in names),
                    f"converting {gf.path.name} ({precision})") if show_progress else None

    def one(gguf_name: str) -> dict[str, np.ndarray]:
        out = convert_tensor(gf, gguf_name, names[gguf_name], cfg, precision)
        if bar is not None:
            bar.step(int(np.prod(gf.tensors[gguf_name].shape)))
        return out

    weights: dict[str, np.ndarray] = {}
    # numpy releases the GIL; each tensor's file pages are read once, then need not stay resident
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool, dropping_mapped_pages([gf.mapped]):
        for part in pool.map(one, names):
            weights.update(part)
    return weights


def folder_quantization(weights: dict[str, np.ndarray]) -> str:
    """The model folder's `quantization` field for these stored tensors."""
    if any(k.endswith(".q4") for k in weights):
        return "int4-blockwise"
    if any(k.endswith(SCALE_SUFFIX) and v.ndim == 2 for k, v in weights.items()):
        return "int8-blockwise"
    return "int8-per-channel" if any(k.endswith(SCALE_SUFFIX) for k in weights) else "none"


def convert_gguf(path: str | Path, precision: str = "fp32", show_progress: bool = False
                 ) -> tuple[ModelConfig, object, dict[str, np.ndarray]]:
    """(config, tokenizers.Tokenizer, weights as `precision` stores them) from a GGUF file, uncached."""
    with GGUFFile(path) as gf:
        arch = gf.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"{gf.path}: GGUF architecture {arch!r} is not supported "
                                 f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        facts = gguf_token_facts(gf.metadata)
        hf_tok = build_gguf_tokenizer(gf.metadata, facts.ids())
        cfg = gguf_model_config(gf, facts)
        weights = gguf_weights(gf, cfg, precision, show_progress)
    pad_tokenizer_to(hf_tok, cfg.vocab_size)
    return cfg, hf_tok, weights


# ---------------------------------------------------------------- cache


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def cache_folder_for(path: str | Path, precision: str) -> Path:
    digest = file_sha256(path)
    return cache_root() / "gguf" / f"{Path(path).stem}-{digest[:16]}-v{CONVERTER_VERSION}-{precision}"


def write_cache_folder(folder: Path, cfg: ModelConfig, hf_tok, weights: dict[str, np.ndarray],
                       precision: str, source_file: Path) -> None:
    """Write a model folder atomically (a temp folder renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache follows the umask
    try:
        write_safetensors(tmp / "model.safetensors", weights)
        hf_tok.save(str(tmp / "tokenizer.json"))
        meta = {"format": FORMAT, "version": 1, "model": cfg.to_dict(), "weights": "model.safetensors",
                "tokenizer": "tokenizer.json", "quantization": folder_quantization(weights),
                "converted_from": {"gguf": source_file.name, "precision": precision}}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_model_folder(folder):  # another process may have won the race
            raise


def _widen(w: np.ndarray) -> np.ndarray:
    """float32 weights (torch widens float16 ~3x faster than numpy where it is installed)."""
    if w.dtype == np.float16:
        try:
            import torch
        except ImportError:
            return w.astype(np.float32)
        out = np.empty(w.shape, dtype=np.float32)
        with warnings.catch_warnings():  # w is a read-only view of the mapped file; only read
            warnings.simplefilter("ignore", UserWarning)
            torch.from_numpy(out).copy_(torch.from_numpy(w))
        return out
    return w  # float32 already: a read-only view of the mapped file, as model folders give


def _source_from_folder(folder: Path, gguf_path: Path) -> ModelSource:
    from .tokenizer import Tokenizer

    mf = open_model_folder(folder)
    weights = {name: _widen(w) for name, w in mf.load_weights().items()}  # float16 tensors of an F16 file
    return ModelSource(gguf_path.stem, mf.config, Tokenizer.from_file(mf.tokenizer_file), weights,
                       mf.quantization, str(gguf_path))


def load_gguf(path: str | Path, cache: bool = True, precision: str | None = "auto") -> ModelSource:
    """A GGUF file as a ModelSource; with `cache`, converted once and reloaded from the
    cache folder afterwards. precision: a runtime precision (see gguf_precision): auto
    keeps each tensor's precision class (4-bit blocks, int8 per channel, float), fp32
    widens the file's values exactly, int8 re-quantizes every 2-D weight per channel."""
    kind = gguf_precision(precision)
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file does not exist: {path}")
    folder = cache_folder_for(path, kind) if cache else None
    if folder is not None and is_model_folder(folder):
        return _source_from_folder(folder, path)
    cfg, hf_tok, weights = convert_gguf(path, kind, show_progress=True)
    if folder is not None:
        try:
            write_cache_folder(folder, cfg, hf_tok, weights, kind, path)
            del weights
            return _source_from_folder(folder, path)  # first and later starts see the same weights
        except OSError as e:
            log.warning("could not cache the converted GGUF model in %s: %s", folder, e)
    from .tokenizer import Tokenizer

    return ModelSource(path.stem, cfg, Tokenizer(hf_tok), {k: _widen(w) for k, w in weights.items()},
                       folder_quantization(weights), str(path))
