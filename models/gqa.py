"""Turn a multi-head model into a grouped-query one (numpy only, no torch).

Ainslie et al. (2023, "GQA") start a grouped-query model from a multi-head checkpoint by
mean-pooling the key and value projections of each group of heads, then train it a
little more ("uptraining", ~5% of the original compute recovers most of the quality).
Query head i reads kv head i // (n_heads // n_kv_heads) in model.py and both runtimes,
so a group is a run of adjacent heads.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .format.config import ModelConfig


def group_kv_heads(config: ModelConfig, weights: dict[str, np.ndarray],
                   n_kv_heads: int) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config, weights) with n_kv_heads kv heads, each the mean of its group's heads.

    weights are float (dequantized); tensors other than wk / wv pass through unchanged.
    """
    g = config.n_kv_heads
    if n_kv_heads <= 0 or g % n_kv_heads or config.n_heads % n_kv_heads:
        raise ValueError(f"cannot group {g} kv heads ({config.n_heads} query heads) into {n_kv_heads}")
    if n_kv_heads == g:
        return config, dict(weights)
    per = g // n_kv_heads
    hd = config.head_dim
    out = {}
    for name, w in weights.items():
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            if w.shape != (g * hd, config.dim):
                raise ValueError(f"{name}: shape {w.shape}, expected {(g * hd, config.dim)}")
            w = w.reshape(n_kv_heads, per, hd, config.dim).mean(axis=1).reshape(n_kv_heads * hd, config.dim)
        elif name.endswith(("attention.wk.bias", "attention.wv.bias")):
            w = w.reshape(n_kv_heads, per, hd).mean(axis=1).reshape(n_kv_heads * hd)
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    return replace(config, n_kv_heads=n_kv_heads), out
