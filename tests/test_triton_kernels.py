"""The Triton kernels (bifurcated decode attention, fused RMSNorm and RoPE) against the
PyTorch reference. Run on CUDA when there is one, else through Triton's interpreter
(TRITON_INTERPRET=1, in a subprocess since the flag is read when kernels are defined);
skipped where Triton is not installed (the laptop install and CI)."""

from __future__ import annotations

import textwrap

from triton_check import needs_triton, run_check

pytestmark = needs_triton

CHECK = textwrap.dedent("""
    import torch
    from codecomplete.models import fused_triton
    from codecomplete.models.bifurcated_triton import bifurcated_attention_triton, plan_splits
    from codecomplete.models.format.config import ModelConfig
    from codecomplete.bench.reference import bifurcated_attention
    from codecomplete.models.model import RMSNorm, apply_rope, rope_tables

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    tol = 2e-2 if dev == "cuda" else 1e-5
    torch.manual_seed(0)
    # N, H, G, D, context, decoded: MHA, GQA (P=7 as Qwen2.5-0.5B), many branches, tiny context
    for n, h, g, d, ctx, m in [(4, 9, 9, 64, 300, 5), (3, 14, 2, 64, 129, 1), (32, 4, 4, 128, 1000, 17),
                               (1, 2, 1, 16, 7, 3), (5, 8, 8, 64, 64, 64)]:
        q = torch.randn(n, h, d, device=dev, dtype=dtype)
        kc, vc = (torch.randn(g, ctx + 10, d, device=dev, dtype=dtype)[:, :ctx] for _ in range(2))
        kd, vd = (torch.randn(n, g, m + 4, d, device=dev, dtype=dtype)[:, :, :m] for _ in range(2))
        ref = bifurcated_attention(q.float(), kc.float(), vc.float(), kd.float(), vd.float(), d ** -0.5)
        out = bifurcated_attention_triton(q, kc, vc, kd, vd, d ** -0.5)
        assert out.shape == ref.shape and out.dtype == q.dtype
        err = float((out.float() - ref).abs().max())
        assert err < tol, (n, h, g, d, ctx, m, err)
    # slices: every one non-empty, together exactly the context, about two blocks per SM
    for ctx in (1, 63, 64, 65, 8192, 16384 + 3):
        splits, chunk = plan_splits(ctx, 32, 132, 64)
        assert chunk % 64 == 0 and (splits - 1) * chunk < ctx <= splits * chunk
    assert plan_splits(8192, 32, 132, 64)[0] * 32 >= 132
    x = torch.randn(3, 2, 576, device=dev, dtype=dtype)
    norm = RMSNorm(576).to(dev)
    with torch.no_grad():
        norm.weight.normal_()
        fused_triton.set_enabled(False)
        ref = norm(x)
        assert float((fused_triton.rms_norm(x, norm.weight, 1e-5).float() - ref.float()).abs().max()) < tol
    cfg = ModelConfig(vocab_size=100, dim=256, n_layers=1, n_heads=4, ffn_dim=64, max_seq_len=64)
    q = torch.randn(2, 5, 4, 64, device=dev, dtype=dtype).transpose(1, 2)  # (B, H, T, D) as _qkv makes it
    cos, sin = rope_tables(cfg, torch.arange(7, 12, device=dev))
    out = fused_triton.rope(q, cos, sin)
    assert out.is_contiguous() and float((out.float() - apply_rope(q, cos, sin).float()).abs().max()) < tol
    gate_up = torch.randn(3, 1, 2 * 1500, device=dev, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = (torch.nn.functional.silu(gate.float()) * up.float())
    assert float((fused_triton.silu_mul(gate, up).float() - ref).abs().max()) < tol * 4
    print("ok")
""")


def test_triton_kernels_match_the_pytorch_reference():
    assert "ok" in run_check(CHECK, timeout=600)


def test_fused_kernels_are_off_for_cpu_tensors_and_for_training():
    import torch

    from codecomplete.models import fused_triton

    assert not fused_triton.use_for(torch.zeros(2))
    if torch.cuda.is_available() and fused_triton.AVAILABLE:
        w = torch.zeros(2, device="cuda", requires_grad=True)
        assert not fused_triton.use_for(w * 2) and fused_triton.use_for(torch.zeros(2, device="cuda"))
