"""The torch model: bifurcated decode equals plain batched decode, prefill reuse equals
a fresh prefill, int8 weights keep the fp32 top-1."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from codecomplete.bench.reference import (  # noqa: E402
    bifurcated_attention,
    plain_attention_over_copies,
    plain_batched_attention,
)
from codecomplete.models.format.config import ModelConfig  # noqa: E402
from codecomplete.models.format.folder import param_shapes  # noqa: E402
from codecomplete.models.model import Transformer, bifurcated_attention_merged  # noqa: E402


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


@pytest.mark.parametrize("attention", ["bifurcated", bifurcated_attention], ids=["merged", "einsum"])
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
        out_p = model.decode_step(tokens[s], k[:, :, :m], v[:, :, :m], pk, pv, s,
                                  attention=plain_attention_over_copies)
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


@pytest.mark.parametrize("n_kv_heads,qkv_bias,tie", [(4, False, True), (2, True, False)])
def test_folder_weights_fuse_at_load_and_split_back_in_the_state_dict(n_kv_heads, qkv_bias, tie):
    """The model folder stores wq/wk/wv and w1/w3 apart; the model holds them fused."""
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, ffn_dim=96,
                      qkv_bias=qkv_bias, tie_embeddings=tie)
    g = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=g) for name, shape in param_shapes(cfg).items()}
    model = Transformer(cfg)
    model.load_state_dict(weights, strict=True)
    att, ffn = model.layers[1].attention, model.layers[1].feed_forward
    assert torch.equal(att.wqkv.weight, torch.cat([weights[f"layers.1.attention.{w}.weight"] for w in ("wq", "wk", "wv")]))
    assert torch.equal(ffn.w13.weight, torch.cat([weights[f"layers.1.feed_forward.{w}.weight"] for w in ("w1", "w3")]))
    if qkv_bias:
        assert torch.equal(att.wqkv.bias, torch.cat([weights[f"layers.1.attention.{w}.bias"] for w in ("wq", "wk", "wv")]))
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    # parts are copies: safetensors refuses tensors that share memory
    assert state["layers.0.attention.wq.weight"].data_ptr() != state["layers.0.attention.wk.weight"].data_ptr()


def test_load_with_a_missing_part_is_an_error():
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=1, n_heads=4, ffn_dim=96)
    weights = {name: torch.zeros(shape) for name, shape in param_shapes(cfg).items()}
    del weights["layers.0.attention.wk.weight"]
    with pytest.raises(RuntimeError, match="wqkv.weight"):
        Transformer(cfg).load_state_dict(weights, strict=True)


def test_init_weights_draw_the_same_values_for_a_seed():
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96)
    a, b = Transformer(cfg), Transformer(cfg)
    a.init_weights(seed=7)
    b.init_weights(seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    # the parts are drawn one after another: wq's rows are the first draws after the embedding
    g = torch.Generator().manual_seed(7)
    torch.randn((cfg.vocab_size, cfg.dim), generator=g)
    wq = torch.randn((cfg.n_heads * cfg.head_dim, cfg.dim), generator=g) * 0.02
    assert torch.equal(a.state_dict()["layers.0.attention.wq.weight"], wq)


def test_factorized_embedding_is_a_rank_r_table_and_its_transpose_the_head():
    """embed_rank r: a token's vector is A[t]·B and the logits are h·Bᵀ·Aᵀ; the parameter
    count and the folder's shapes say (V + dim)·r for the table."""
    cfg = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, embed_rank=8)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    shapes = param_shapes(cfg)
    assert shapes["tok_embeddings.weight"] == (97, 8) and shapes["embed_proj.weight"] == (8, 64)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert cfg.n_params() == sum(p.numel() for p in model.parameters())
    a, b = model.tok_embeddings.weight, model.embed_proj.weight
    tokens = torch.tensor([[3, 50, 7]])
    assert torch.allclose(model.embed(tokens), a[tokens] @ b)
    h = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(model.logits(h), model.norm(h) @ b.T @ a.T, atol=1e-6)
    with pytest.raises(ValueError, match="tied"):
        ModelConfig(vocab_size=97, dim=64, n_heads=4, embed_rank=8, tie_embeddings=False)


@pytest.mark.parametrize("window", [0, 24])
def test_gqa_chunked_prefill_equals_a_whole_one(window):
    """A chunk after a prefix attends with each kv group's query heads stacked (no copy of
    the prefix's keys per head): the same logits and cache as one whole prefill."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, ffn_dim=128,
                      max_seq_len=256, sliding_window=window)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 300, (90,))
    k, v = model.new_cache(128, dtype=torch.float32, device="cpu")
    k2, v2 = model.new_cache(128, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        whole = model.prefill(tokens, k, v, 0)
        model.prefill(tokens[:50], k2, v2, 0)
        model.prefill(tokens[50:70], k2, v2, 50)
        chunked = model.prefill(tokens[70:], k2, v2, 70)
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(k2[:, :, :90], k[:, :, :90], atol=1e-5, rtol=1e-5)
