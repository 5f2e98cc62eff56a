"""Grouping a multi-head model's kv heads (the start of GQA uptraining)."""

import numpy as np
import pytest
import torch

from codecomplete.models.format.config import ModelConfig
from codecomplete.models.gqa import group_kv_heads
from codecomplete.models.model import Transformer
from codecomplete.models.testing import random_weights

CFG = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, ffn_dim=64, max_seq_len=64, qkv_bias=True)


def _logits(cfg, weights, tokens):
    model = Transformer(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        return model(torch.tensor([tokens])).numpy()[0]


@pytest.mark.parametrize("groups", [3, 2, 1])
def test_heads_equal_within_each_group_pool_to_the_same_model(groups):
    """Query head i reads kv head i // (heads per group): when the heads of a group are
    equal, the grouped model computes exactly what the multi-head one did."""
    w = random_weights(CFG, seed=3)
    per, hd = CFG.n_heads // groups, CFG.head_dim
    for name in list(w):
        if ".wk." in name or ".wv." in name:
            head_shape = (hd, CFG.dim) if name.endswith("weight") else (hd,)
            heads = w[name].reshape(CFG.n_heads, *head_shape)[::per]  # one per group
            w[name] = np.repeat(heads, per, axis=0).reshape(w[name].shape)
    cfg, pooled = group_kv_heads(CFG, w, groups)
    assert cfg.n_kv_heads == groups and cfg.n_heads == CFG.n_heads
    assert pooled["layers.0.attention.wk.weight"].shape == (groups * hd, CFG.dim)
    assert pooled["layers.1.attention.wv.bias"].shape == (groups * hd,)
    tokens = [5, 17, 3, 80, 41, 9, 9, 60]
    np.testing.assert_allclose(_logits(cfg, pooled, tokens), _logits(CFG, w, tokens), atol=1e-4)


def test_pooling_is_the_mean_of_adjacent_heads_and_leaves_the_rest():
    w = random_weights(CFG, seed=4)
    cfg, pooled = group_kv_heads(CFG, w, 2)
    hd = CFG.head_dim
    wk = w["layers.1.attention.wk.weight"]
    np.testing.assert_allclose(pooled["layers.1.attention.wk.weight"][:hd], wk[:3 * hd].reshape(3, hd, -1).mean(0),
                               rtol=1e-6)
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "tok_embeddings.weight"):
        np.testing.assert_array_equal(pooled[name], w[name])
    assert cfg.n_params() < CFG.n_params()


@pytest.mark.parametrize("groups", [0, 4, 12])
def test_groups_that_do_not_divide_the_heads_are_refused(groups):
    with pytest.raises(ValueError, match="cannot group"):
        group_kv_heads(CFG, random_weights(CFG), groups)
