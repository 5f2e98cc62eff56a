"""The model folder: one layout that both runtimes load, so a model ships once.

    MODEL_DIR/
      config.json          {"format": "codecomplete-model", "version": 1,
                            "model": {ModelConfig fields}, "weights": "model.safetensors",
                            "quantization": "int8-per-channel" | "int4-blockwise" | "none"}
      tokenizer.json       Hugging Face `tokenizers` format (byte-level BPE)
      model.safetensors    parameter names as in models/model.py (a factorized embedding,
                           ModelConfig.embed_rank r: `tok_embeddings.weight` (vocab, r) and
                           `embed_proj.weight` (r, dim)); with int8, every
                           2-D weight W (out, in) is stored as int8 `W` plus float32
                           `W_scale` (out,): W ≈ int8 * scale[:, None]; 1-D tensors float.
                           A 2-D `W_scale` (out, in/32) is one scale per block of 32 along
                           the row (int8 blockwise, GGUF Q8_0/Q5_0 kept exactly):
                           W[r, 32b + i] = int8[r, 32b + i] * scale[r, b].
                           With int4-blockwise, some 2-D weights are 4-bit instead:
                           uint8 `W.q4` (out, in/32, 16) two weights a byte (low nibble
                           first), float32 `W.q4_scales` and uint8 `W.q4_zeros` (out, in/32):
                           W[r, 32b + i] ≈ (q - zero[r, b]) * scale[r, b] (MatMulNBits' layout)
      MODEL.md             what it is, what it was trained on, how it scores

Weights are read from safetensors with numpy only (no torch, never pickle).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig

FORMAT = "codecomplete-model"
SCALE_SUFFIX = "_scale"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default"
EMBED_PROJ = "embed_proj.weight"  # (r, dim) of a factorized embedding (ModelConfig.embed_rank)

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class ModelLoadError(RuntimeError):
    """A model folder or file is missing, truncated or not what it claims to be."""


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, as the folder stores them (models/model.py's state_dict
    before fusion). The order is fixed: random test weights are drawn in it."""
    d, hd = cfg.dim, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.embed_rank or d)}
    if cfg.embed_rank:
        shapes[EMBED_PROJ] = (cfg.embed_rank, d)

    def norm(name: str) -> None:
        shapes[name + ".weight"] = (d,)
        if cfg.norm_kind == "layer":
            shapes[name + ".bias"] = (d,)

    qkv_rows = {"wq": cfg.n_heads * hd, "wk": cfg.n_kv_heads * hd, "wv": cfg.n_kv_heads * hd}
    ffn = {"w1": (cfg.ffn_dim, d), "w2": (d, cfg.ffn_dim), "w3": (cfg.ffn_dim, d)}  # gate, down, up
    if not cfg.mlp_gated:
        del ffn["w1"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        norm(p + "attention_norm")
        for name, rows in qkv_rows.items():
            shapes[f"{p}attention.{name}.weight"] = (rows, d)
        if cfg.qkv_bias:
            for name, rows in qkv_rows.items():
                shapes[f"{p}attention.{name}.bias"] = (rows,)
        shapes[p + "attention.wo.weight"] = (d, cfg.n_heads * hd)
        if cfg.wo_bias:
            shapes[p + "attention.wo.bias"] = (d,)
        norm(p + "ffn_norm")
        for name, shape in ffn.items():
            shapes[f"{p}feed_forward.{name}.weight"] = shape
        if cfg.mlp_bias:
            for name, shape in ffn.items():
                shapes[f"{p}feed_forward.{name}.bias"] = shape[:1]
    norm("norm")
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, d)
    return shapes


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as numpy arrays (BF16 widened to float32)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 8:
                raise ModelLoadError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(size - 8, 100 << 20):
                raise ModelLoadError(f"{path}: corrupt safetensors header (length {header_len})")
            header = json.loads(f.read(header_len))
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read safetensors ({e})") from e
    base = 8 + header_len
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if base + end > size:
            raise ModelLoadError(f"{path}: truncated (tensor {name} ends past the file)")
        dtype, shape = info["dtype"], tuple(info["shape"])
        raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=base + start)
        if dtype == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif dtype in _DTYPES:
            arr = raw.view(_DTYPES[dtype])
        else:
            raise ModelLoadError(f"{path}: unsupported dtype {dtype} for {name}")
        out[name] = arr.reshape(shape)
    return out


_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Write a .safetensors file tensor by tensor from the arrays' own buffers (no
    serialised copy of the whole model in memory)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name, a in arrays.items():
        if a.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot store {name} of dtype {a.dtype} in safetensors")
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format asks
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(memoryview(a.reshape(-1)).cast("B") if a.size else b"")


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: (int8 (out, in), float32 scale (out,)) with
    w ≈ int8 * scale[:, None]. An all-zero row gets scale 1 (not 0): its int8 values are 0
    and dequantize to 0, and nothing divides by zero."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


INT8_BLOCK = 32  # weights per block of a blockwise int8 weight (a 2-D scale): GGUF Q8_0/Q5_0's block


def int8_dequantized(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of int8 weights (..., in) with a scale per row (...,) or per block of
    INT8_BLOCK along the row (..., in / INT8_BLOCK)."""
    out = w.astype(np.float32)
    if scale.ndim == w.ndim:  # blockwise
        blocks = out.reshape(*w.shape[:-1], -1, INT8_BLOCK)
        blocks *= scale[..., None]
        return out
    out *= scale[..., None]
    return out


def blockwise_to_per_channel(w: np.ndarray, scale: np.ndarray, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise int8 (w (out, in), scale (out, in / INT8_BLOCK)) re-rounded to int8 with one
    scale per output channel, a chunk of rows at a time (a few MB of float32 in flight)."""
    codes, scales = np.empty(w.shape, np.int8), np.empty(w.shape[0], np.float32)
    for start in range(0, w.shape[0], chunk_rows):
        end = start + chunk_rows
        codes[start:end], scales[start:end] = quantize_rows_int8(int8_dequantized(w[start:end], scale[start:end]))
    return codes, scales


def quantize_int8(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-output-channel symmetric int8 for every 2-D weight; 1-D tensors stay float32."""
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            out[name] = w
            continue
        out[name], out[name + SCALE_SUFFIX] = quantize_rows_int8(w)
    return out


Q4_BLOCK = 32  # weights per 4-bit block: onnxruntime MatMulNBits' block_size, and Q4_0/Q4_K's (sub-)block
Q4_SUFFIX, Q4_SCALES_SUFFIX, Q4_ZEROS_SUFFIX = ".q4", ".q4_scales", ".q4_zeros"


@dataclass
class Q4Weight:
    """A 4-bit blockwise weight (out, in): packed (out, in/32, 16) uint8, scales and zero
    points (out, in/32); w[r, 32b + i] = (q[r, 32b + i] - zeros[r, b]) * scales[r, b]."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * Q4_BLOCK

    def codes(self) -> np.ndarray:
        """The 4-bit values (out, in/32, 32) as uint8 0..15."""
        p = self.packed
        return np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[0], p.shape[1], Q4_BLOCK)

    def dequantized(self) -> np.ndarray:
        q = self.codes().astype(np.float32) - self.zeros[:, :, None].astype(np.float32)
        return (q * self.scales[:, :, None]).reshape(self.shape)

    def tensors(self, name: str) -> dict[str, np.ndarray]:
        return {name + Q4_SUFFIX: self.packed, name + Q4_SCALES_SUFFIX: self.scales, name + Q4_ZEROS_SUFFIX: self.zeros}


def _q4_codes(blocks: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(blocks / scales[..., None]) + zeros[..., None], 0, 15)


def quantize_rows_q4(w: np.ndarray, refine_steps: int = 2) -> Q4Weight:
    """Asymmetric 4-bit per block of 32 along each row, MatMulNBits' rule w ≈ (q - zero) *
    scale with an integer zero point 0..15 (so every block's range keeps 0). Start from
    scale = (max - min) / 15, zero = round(-min / scale); then, for the zero points one
    either side too, alternate codes and the least-squares scale for them, and keep the
    (zero, scale) of least squared error per block. Q4_0 blocks come back exactly; a Q4_K
    sub-block (scale * q - min, min not a whole number of steps) nearly so: the error of
    the shift is spread over a slightly different scale. in must be whole blocks."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if cols % Q4_BLOCK:
        raise ModelLoadError(f"a 4-bit weight needs whole blocks of {Q4_BLOCK} columns, not {cols}")
    blocks = w.reshape(rows, cols // Q4_BLOCK, Q4_BLOCK)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    base = (hi - lo) / 15.0
    base = np.where(base == 0, 1.0, base).astype(np.float32)  # an all-zero block: codes = zero point
    z0 = np.rint(-lo / base)
    best_err = np.full(base.shape, np.inf, np.float32)
    best_scale, best_zero = base, np.clip(z0, 0, 15)
    for shift in (0, -1, 1):
        zeros = np.clip(z0 + shift, 0, 15).astype(np.float32)
        scales = base
        for _ in range(refine_steps + 1):
            q = _q4_codes(blocks, scales, zeros) - zeros[..., None]
            qq = (q * q).sum(axis=-1)
            fitted = (blocks * q).sum(axis=-1) / np.where(qq == 0, 1.0, qq)
            scales = np.where((qq == 0) | (fitted <= 0), scales, fitted).astype(np.float32)
        q = _q4_codes(blocks, scales, zeros) - zeros[..., None]
        err = ((q * scales[..., None] - blocks) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scales, best_scale)
        best_zero = np.where(better, zeros, best_zero)
    scales, zeros = best_scale.astype(np.float32), best_zero.astype(np.uint8)
    q = _q4_codes(blocks, scales, zeros).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return Q4Weight(packed, scales, zeros)


def split_q4(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Q4Weight]]:
    """(the other tensors, 4-bit weights by their name)."""
    names = [k[: -len(Q4_SUFFIX)] for k in weights if k.endswith(Q4_SUFFIX)]
    q4 = {n: Q4Weight(weights[n + Q4_SUFFIX], weights[n + Q4_SCALES_SUFFIX], weights[n + Q4_ZEROS_SUFFIX])
          for n in names}
    parts = {k for n in names for k in (n + Q4_SUFFIX, n + Q4_SCALES_SUFFIX, n + Q4_ZEROS_SUFFIX)}
    return {k: v for k, v in weights.items() if k not in parts}, q4


def split_int8(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(tensors, scales): int8 tensors keep their int8 values; scales keyed by tensor name."""
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in weights.items() if k.endswith(SCALE_SUFFIX)}
    tensors = {k: v for k, v in weights.items() if not k.endswith(SCALE_SUFFIX)}
    return tensors, scales


def dequantize(weights: dict[str, np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
    """float32 weight dict, int8 tensors multiplied back by their scales, 4-bit ones
    widened by theirs. copy=False keeps
    float32 tensors as they are (possibly read-only views of a memory-mapped file)."""
    rest, q4 = split_q4(weights)
    tensors, scales = split_int8(rest)
    out = {name: w.dequantized() for name, w in q4.items()}
    for name, w in tensors.items():
        if name in scales:
            out[name] = int8_dequantized(w, scales[name])
        elif copy or w.dtype != np.float32:
            out[name] = np.array(w, dtype=np.float32)
        else:
            out[name] = w
    return out


def mapped_file(array) -> mmap.mmap | None:
    """The memory map an array is a view of (read_safetensors' arrays are), if any."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if isinstance(base, np.ndarray) else getattr(base, "obj", None)
    return base


def mapped_files(weights: dict[str, np.ndarray]) -> list[mmap.mmap]:
    """The distinct memory maps behind a weight dict's arrays."""
    return list({id(m): m for m in map(mapped_file, weights.values()) if m is not None}.values())


def drop_mapped_pages(maps: list[mmap.mmap]) -> int:
    """Tell the kernel it may drop the resident pages of these read-only file mappings
    (once their data has been copied or packed elsewhere). Safe: a page read again is read
    back from the file. Returns the bytes advised."""
    advised = 0
    for m in maps:
        try:
            m.madvise(mmap.MADV_DONTNEED)
            advised += len(m)
        except (AttributeError, OSError, ValueError):  # no madvise here, or a closed map
            pass
    return advised


@contextlib.contextmanager
def dropping_mapped_pages(maps: list[mmap.mmap], every_s: float = 0.05):
    """drop_mapped_pages every `every_s` while the body runs, and once after: a body that
    reads each mapped weight once to make its own copy (a GGUF conversion, onnxruntime
    packing its weights) would otherwise keep every page it read resident until it ends:
    the peak memory of a start."""
    stop = threading.Event()

    def loop():
        while not stop.wait(every_s):
            drop_mapped_pages(maps)

    worker = threading.Thread(target=loop, name="drop-mapped-pages", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        drop_mapped_pages(maps)


@dataclass
class ModelFolder:
    path: Path
    config: ModelConfig
    weights_file: Path
    tokenizer_file: Path
    quantization: str  # "int8-per-channel" | "int4-blockwise" | "none"

    def load_weights(self) -> dict[str, np.ndarray]:
        return read_safetensors(self.weights_file)

    def load_tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer.from_file(self.tokenizer_file)


def is_model_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def open_model_folder(path: str | Path) -> ModelFolder:
    """Read config.json and check the files it names exist."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a model folder)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path}: unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise ModelLoadError(f"{cfg_path}: not a codecomplete model folder (format {meta.get('format')!r})")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{cfg_path}: bad model config ({e})") from e
    weights = path / meta.get("weights", "model.safetensors")
    tokenizer = path / meta.get("tokenizer", "tokenizer.json")
    for f in (weights, tokenizer):
        if not f.is_file():
            raise ModelLoadError(f"{path}: missing {f.name}")
    return ModelFolder(path, config, weights, tokenizer, meta.get("quantization", "none"))


def save_model_folder(path: str | Path, config: ModelConfig, weights: dict[str, np.ndarray],
                      tokenizer_file: str | Path, int8: bool = True) -> ModelFolder:
    """Write a model folder from float weights (quantized to int8 unless int8=False)."""
    import shutil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = quantize_int8(weights) if int8 else {k: np.asarray(v, np.float32) for k, v in weights.items()}
    write_safetensors(path / "model.safetensors", tensors)
    if Path(tokenizer_file).resolve() != (path / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_file, path / "tokenizer.json")
    meta = {"format": FORMAT, "version": 1, "model": config.to_dict(), "weights": "model.safetensors",
            "tokenizer": "tokenizer.json", "quantization": "int8-per-channel" if int8 else "none"}
    (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return open_model_folder(path)
