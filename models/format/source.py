"""Resolve what the user points at (nothing, a model folder, a Hugging Face folder, a
.gguf file) to one ModelSource: config, tokenizer and numpy weights with our names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codecomplete.hub import resolve_model_path

from .config import ModelConfig
from .folder import DEFAULT_MODEL_DIR, ModelLoadError, is_model_folder, open_model_folder


@dataclass
class ModelSource:
    name: str
    config: ModelConfig
    tokenizer: object  # codecomplete.models.format.tokenizer.Tokenizer
    weights: dict[str, np.ndarray]  # float, or int8 with `<name>_scale` float32 beside
    quantization: str  # "int8-per-channel" | "int4-blockwise" (4-bit and int8 weights) | "none"
    path: str = ""


def default_model_dir() -> Path:
    return DEFAULT_MODEL_DIR


def load_model_source(path: str | Path | None = None, precision: str = "auto") -> ModelSource:
    """Load a model by path; None means the shipped default model. precision (the
    runtime's `--precision`) says what a .gguf file is converted to (gguf_import.gguf_precision);
    folders load as they are stored."""
    p = Path(resolve_model_path(path)).expanduser() if path else DEFAULT_MODEL_DIR  # a pulled model's name too
    if not p.exists():
        if path is None:
            raise ModelLoadError(f"the shipped default model is missing ({p}); reinstall codecomplete")
        raise ModelLoadError(f"model path does not exist: {p}")
    if p.is_file() and p.suffix == ".gguf":
        from .gguf_import import load_gguf

        return load_gguf(p, precision=precision)
    if p.is_dir() and is_model_folder(p):
        folder = open_model_folder(p)
        return ModelSource(p.name, folder.config, folder.load_tokenizer(), folder.load_weights(),
                           folder.quantization, str(p))
    if p.is_dir() and (p / "config.json").is_file():
        try:
            meta = json.loads((p / "config.json").read_text())
        except ValueError as e:
            raise ModelLoadError(f"{p / 'config.json'}: not valid JSON ({e})") from e
        if "model_type" in meta:
            from .hf_import import load_hf_folder

            return load_hf_folder(p)
    raise ModelLoadError(
        f"{p}: not a model (expected a codecomplete model folder, a Hugging Face folder with "
        "config.json + *.safetensors + tokenizer.json, or a .gguf file)")
