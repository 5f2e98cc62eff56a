"""The model folder: one layout that both runtimes load, so a model ships once.

    MODEL_DIR/
      config.json          {"format": "codecomplete-model", "version": 1,
                            "model": {ModelConfig fields}, "weights": "model.safetensors",
                            "quantization": "int8-per-channel" | "none"}
      tokenizer.json       Hugging Face `tokenizers` format (byte-level BPE)
      model.safetensors    parameter names as in models/model.py; with int8, every
                           2-D weight W (out, in) is stored as int8 `W` plus float32
                           `W_scale` (out,): W ≈ int8 * scale[:, None]; 1-D tensors float
      MODEL.md             what it is, what it was trained on, how it scores

Weights are read from safetensors with numpy only (no torch, never pickle).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig

FORMAT = "codecomplete-model"
SCALE_SUFFIX = "_scale"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "default"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class ModelLoadError(RuntimeError):
    """A model folder or file is missing, truncated or not what it claims to be."""


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes, as the folder stores them (models/model.py's state_dict before fusion)."""
    d, hd = cfg.dim, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "attention.wq.weight"] = (cfg.n_heads * hd, d)
        shapes[p + "attention.wk.weight"] = (cfg.n_kv_heads * hd, d)
        shapes[p + "attention.wv.weight"] = (cfg.n_kv_heads * hd, d)
        if cfg.qkv_bias:
            shapes[p + "attention.wq.bias"] = (cfg.n_heads * hd,)
            shapes[p + "attention.wk.bias"] = (cfg.n_kv_heads * hd,)
            shapes[p + "attention.wv.bias"] = (cfg.n_kv_heads * hd,)
        shapes[p + "attention.wo.weight"] = (d, cfg.n_heads * hd)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "feed_forward.w1.weight"] = (cfg.ffn_dim, d)
        shapes[p + "feed_forward.w2.weight"] = (d, cfg.ffn_dim)
        shapes[p + "feed_forward.w3.weight"] = (cfg.ffn_dim, d)
    shapes["norm.weight"] = (d,)
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


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def quantize_rows_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: (int8 (out, in), float32 scale (out,)) with
    w ≈ int8 * scale[:, None]. An all-zero row gets scale 1 (not 0): its int8 values are 0
    and dequantize to 0, and nothing divides by zero."""
    w = np.asarray(w, dtype=np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8), scale


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


def split_int8(weights: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(tensors, scales): int8 tensors keep their int8 values; scales keyed by tensor name."""
    scales = {k[: -len(SCALE_SUFFIX)]: v for k, v in weights.items() if k.endswith(SCALE_SUFFIX)}
    tensors = {k: v for k, v in weights.items() if not k.endswith(SCALE_SUFFIX)}
    return tensors, scales


def dequantize(weights: dict[str, np.ndarray], copy: bool = True) -> dict[str, np.ndarray]:
    """float32 weight dict, int8 tensors multiplied back by their scales. copy=False keeps
    float32 tensors as they are (possibly read-only views of a memory-mapped file)."""
    tensors, scales = split_int8(weights)
    out = {}
    for name, w in tensors.items():
        if name in scales:
            out[name] = w.astype(np.float32) * scales[name][:, None]
        elif copy or w.dtype != np.float32:
            out[name] = np.array(w, dtype=np.float32)
        else:
            out[name] = w
    return out


@dataclass
class ModelFolder:
    path: Path
    config: ModelConfig
    weights_file: Path
    tokenizer_file: Path
    quantization: str  # "int8-per-channel" | "none"

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
