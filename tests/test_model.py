"""The torch model: bifurcated decode equals plain batched decode, prefill reuse equals
a fresh prefill, int8 weights keep the fp32 top-1."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from codecomplete.models.format.config import ModelConfig  # noqa: E402
from codecomplete.models.model import (  # noqa: E402
    Transformer,
    bifurcated_attention,
    bifurcated_attention_merged,
    plain_batched_attention,
)


def _rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", range(6))
def test_bifurcated_attention_equals_plain_for_random_shapes(seed):
    g = torch.Generator().manual_seed(seed)
    rnd = np.random.default_rng(seed)
    n = int(rnd.integers(1, 9))
    kv_heads = int(rnd.choice([1, 2, 4]))
    heads = kv_heads * int(rnd.choice([1, 2, 4]))  # 1 -> multi-head, >1 -> grouped-query
    m_ctx, m_dec, d = int(rnd.integers(1, 300)), int(rnd.integers(1, 20)), 16
    q = torch.randn(n, heads, d, generator=g)
    kc, vc = torch.randn(kv_heads, m_ctx, d, generator=g), torch.randn(kv_heads, m_ctx, d, generator=g)
    kd, vd = torch.randn(n, kv_heads, m_dec, d, generator=g), torch.randn(n, kv_heads, m_dec, d, generator=g)
    out = bifurcated_attention(q, kc, vc, kd, vd, d ** -0.5)
    merged = bifurcated_attention_merged(q, kc, vc, kd, vd, d ** -0.5)
    kf = torch.cat([kc.expand(n, -1, -1, -1), kd], dim=2)
    vf = torch.cat([vc.expand(n, -1, -1, -1), vd], dim=2)
    ref = plain_batched_attention(q.double(), kf.double(), vf.double(), d ** -0.5)
    assert _rel_err(out.double(), ref) < 1e-5
    assert _rel_err(merged.double(), ref) < 1e-5


def _tiny(n_kv_heads: int, qkv_bias: bool = False) -> Transformer:
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96,
                      max_seq_len=256, qkv_bias=qkv_bias)
    model = Transformer(cfg)
    model.init_weights(seed=3)
    with torch.no_grad():  # larger weights than training init, so logits are far from flat
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model.eval()


@pytest.mark.parametrize("attention", ["bifurcated", "bifurcated-einsum"])
@pytest.mark.parametrize("n_kv_heads,qkv_bias", [(4, False), (2, True), (1, False)])
def test_bifurcated_decode_steps_equal_plain_batched_decode(n_kv_heads, qkv_bias, attention):
    model = _tiny(n_kv_heads, qkv_bias)
    cfg = model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    k, v = model.new_cache(cfg.max_seq_len)
    model.prefill(prompt, k, v, 0)
    n, steps = 5, 6
    shape = (cfg.n_layers, n, cfg.n_kv_heads, steps, cfg.head_dim)
    bk, bv, pk, pv = (torch.zeros(shape) for _ in range(4))
    tokens = torch.randint(0, cfg.vocab_size, (steps, n), generator=torch.Generator().manual_seed(1))
    m = prompt.shape[0]
    for s in range(steps):
        out_b = model.decode_step(tokens[s], k[:, :, :m], v[:, :, :m], bk, bv, s, attention=attention)
        out_p = model.decode_step(tokens[s], k[:, :, :m], v[:, :, :m], pk, pv, s, attention="plain")
        assert _rel_err(out_b, out_p) < 1e-5


def test_decode_matches_full_forward_of_each_branch():
    model = _tiny(2)
    cfg = model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    k, v = model.new_cache(64)
    model.prefill(prompt, k, v, 0)
    branch_tokens = torch.tensor([[3, 4, 5], [7, 8, 9]])
    shape = (cfg.n_layers, 2, cfg.n_kv_heads, 3, cfg.head_dim)
    dk, dv = torch.zeros(shape), torch.zeros(shape)
    for s in range(3):
        logits = model.decode_step(branch_tokens[:, s], k[:, :, :20], v[:, :, :20], dk, dv, s)
    for b in range(2):
        full = model(torch.cat([prompt, branch_tokens[b]])[None])[0, -1]
        assert _rel_err(logits[b], full) < 1e-5


def test_prefill_with_reuse_equals_fresh_prefill():
    model = _tiny(4)
    cfg = model.cfg
    tokens = torch.randint(0, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(2))
    k1, v1 = model.new_cache(cfg.max_seq_len)
    model.prefill(tokens[:30], k1, v1, 0)
    reused = model.prefill(tokens[30:], k1, v1, 30)  # 20 new tokens after 30 cached
    k2, v2 = model.new_cache(cfg.max_seq_len)
    fresh = model.prefill(tokens, k2, v2, 0)
    assert _rel_err(reused, fresh) < 1e-5
    assert _rel_err(k1[:, :, :50], k2[:, :, :50]) < 1e-5


def test_causal_forward_equals_prefill_all_positions():
    model = _tiny(2, qkv_bias=True)
    tokens = torch.randint(0, model.cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(9))
    k, v = model.new_cache(64)
    assert _rel_err(model.prefill(tokens, k, v, 0, last_only=False), model(tokens[None])[0]) < 1e-5


@pytest.mark.parametrize("n_kv_heads,qkv_bias", [(4, False), (2, True)])
def test_fused_projections_give_the_same_prefill_and_decode(n_kv_heads, qkv_bias):
    import copy

    model = _tiny(n_kv_heads, qkv_bias)
    fused = copy.deepcopy(model)
    assert fused.fuse_projections() and not fused.fuse_projections()  # once only
    att = fused.layers[0].attention
    assert att.wq is None and att.wqkv.weight.shape[0] == (4 + 2 * n_kv_heads) * model.cfg.head_dim
    prompt = torch.randint(0, model.cfg.vocab_size, (29,), generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (model, fused):
        k, v = m.new_cache(64)
        first = m.prefill(prompt, k, v, 0)
        shape = (m.cfg.n_layers, 3, m.cfg.n_kv_heads, 4, m.cfg.head_dim)
        dk, dv = torch.zeros(shape), torch.zeros(shape)
        step = m.decode_step(torch.tensor([1, 2, 3]), k[:, :, :29], v[:, :, :29], dk, dv, 0)
        outs.append((first, step))
    assert _rel_err(outs[1][0], outs[0][0]) < 1e-5 and _rel_err(outs[1][1], outs[0][1]) < 1e-5
