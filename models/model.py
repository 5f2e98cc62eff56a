"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU) with three attention paths.

- causal prefill over a prompt, appending to a context KV cache that has no batch
  dimension: k, v (Hkv, M, D) per layer;
- plain batched decode (the reference): each of N branches carries its own copy of the
  context KV, (N, Hkv, M + m, D);
- bifurcated decode: the context KV is read once for all branches, each branch has a
  small decode KV (N, Hkv, m, D), and one softmax runs over both parts.

Shapes are named in comments: N branches, H query heads, G kv heads, P = H // G queries
per kv head, M context tokens, m decoded tokens, D head dim, T new tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fused_triton
from .bifurcated_triton import bifurcated_attention_triton
from .format.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_triton.use_for(x):  # one kernel instead of nine (CUDA inference)
            return fused_triton.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D/2) for the given absolute positions (half-split layout)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) / half))
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (..., T, D) by position; cos/sin (T, D/2). Same layout as HF Llama/Qwen2."""
    half = x.shape[-1] // 2
    if x.dim() == 4 and half & (half - 1) == 0 and fused_triton.use_for(x):
        return fused_triton.rope(x, cos, sin)
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def bifurcated_attention(q, k_ctx, v_ctx, k_dec, v_dec, scale: float):
    """One decode step for N branches over a shared context.

    q (N, H, D); k_ctx, v_ctx (G, M, D) stored once; k_dec, v_dec (N, G, m, D) per branch,
    already holding this step's key/value. Returns (N, H, D).
    """
    n, h, d = q.shape
    g = k_ctx.shape[0]
    qg = q.view(n, g, h // g, d)  # (N, G, P, D)
    s_ctx = torch.einsum("ngpd,gmd->ngpm", qg, k_ctx)  # (N, G, P, M)
    s_dec = torch.einsum("ngpd,ngmd->ngpm", qg, k_dec)  # (N, G, P, m)
    m_ctx = s_ctx.shape[-1]
    w = (torch.cat([s_ctx, s_dec], dim=-1).float() * scale).softmax(dim=-1).to(q.dtype)
    out = torch.einsum("ngpm,gmd->ngpd", w[..., :m_ctx], v_ctx)
    out = out + torch.einsum("ngpm,ngmd->ngpd", w[..., m_ctx:], v_dec)
    return out.reshape(n, h, d)


def bifurcated_attention_merged(q, k_ctx, v_ctx, k_dec, v_dec, scale: float):
    """The same step as bifurcated_attention, with the context part done by one fused
    flash-attention call over all N·P queries stacked per kv head (it returns the
    log-sum-exp), the small per-branch part by einsum, and a log-sum-exp merge.
    Reads the context KV once, in one kernel, instead of materialising scores."""
    n, h, d = q.shape
    g = k_ctx.shape[0]
    p = h // g
    q_stacked = q.view(n, g, p, d).permute(1, 0, 2, 3).reshape(1, g, n * p, d)  # (1, G, N·P, D)
    if q.is_cuda:
        out_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention(
            q_stacked, k_ctx[None], v_ctx[None], 0.0, False, False, scale=scale)[:2]
    else:
        out_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_stacked, k_ctx[None], v_ctx[None], 0.0, False, scale=scale)
    out_c = out_c.reshape(g, n, p, d).permute(1, 0, 2, 3).float()  # (N, G, P, D)
    lse_c = lse_c.reshape(g, n, p).permute(1, 0, 2).float()  # (N, G, P)
    qg = q.view(n, g, p, d)
    s_dec = torch.einsum("ngpd,ngmd->ngpm", qg, k_dec).float() * scale  # (N, G, P, m)
    lse_d = torch.logsumexp(s_dec, dim=-1)
    out_d = torch.einsum("ngpm,ngmd->ngpd", torch.softmax(s_dec, dim=-1).to(v_dec.dtype), v_dec).float()
    lse = torch.logaddexp(lse_c, lse_d)
    out = out_c * torch.exp(lse_c - lse)[..., None] + out_d * torch.exp(lse_d - lse)[..., None]
    return out.to(q.dtype).reshape(n, h, d)


_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q, k, v, **kwargs):
    """scaled_dot_product_attention without the cuDNN backend on CUDA: cuDNN plans its
    kernel for every new key length, and a decode step (or a prefill) has a new one each
    time; that planning cost ~5 ms of CPU per call, more than the whole GPU step."""
    if q.is_cuda:
        with sdpa_kernel(_NO_CUDNN):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def plain_batched_attention(q, k_full, v_full, scale: float):
    """Reference decode step: q (N, H, D), k_full/v_full (N, G, M + m, D) per-branch copies."""
    n, h, d = q.shape
    g = k_full.shape[1]
    if g != h:  # expand kv heads to query heads
        k_full = k_full.repeat_interleave(h // g, dim=1)
        v_full = v_full.repeat_interleave(h // g, dim=1)
    out = sdpa(q[:, :, None, :], k_full, v_full, scale=scale)
    return out[:, :, 0, :]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.scale = 1.0 / math.sqrt(hd)
        self.wqkv: nn.Linear | None = None  # set by Transformer.fuse_projections (inference)

    def _qkv(self, x, cos, sin):
        """x (B, T, dim) -> q (B, H, T, D), k, v (B, G, T, D) with RoPE applied."""
        b, t, _ = x.shape
        hd, h, g = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        if self.wqkv is not None:  # one matrix product instead of three
            q, k, v = self.wqkv(x).split([h * hd, g * hd, g * hd], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, g, hd).transpose(1, 2)
        v = v.view(b, t, g, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_causal(self, x, cos, sin, k_cache=None, v_cache=None, start: int = 0):
        """Training (no cache) or prefill. x (B, T, dim). With a cache (B, G, cap, D) the new
        keys/values are written at [start, start + T) and attention covers [0, start + T)."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        if k_cache is not None:
            k_cache[:, :, start : start + t] = k
            v_cache[:, :, start : start + t] = v
            k, v = k_cache[:, :, : start + t], v_cache[:, :, : start + t]
        g, h = self.cfg.n_kv_heads, self.cfg.n_heads
        if g != h:
            k = k.repeat_interleave(h // g, dim=1)
            v = v.repeat_interleave(h // g, dim=1)
        if start == 0:
            y = sdpa(q, k, v, is_causal=True, scale=self.scale)
        else:  # query i (absolute start + i) sees keys 0..start + i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            y = sdpa(q, k, v, attn_mask=mask, scale=self.scale)
        y = y.transpose(1, 2).reshape(b, t, h * self.cfg.head_dim)
        return self.wo(y)

    def forward_decode(self, x, cos, sin, k_ctx, v_ctx, k_dec, v_dec, step: int, attention: str):
        """One token per branch. x (N, 1, dim); k_ctx/v_ctx (G, M, D); k_dec/v_dec
        (N, G, m_max, D) preallocated, written in place at index `step`."""
        n = x.shape[0]
        q, k, v = self._qkv(x, cos, sin)  # q (N, H, 1, D), k/v (N, G, 1, D)
        k_dec[:, :, step] = k[:, :, 0]
        v_dec[:, :, step] = v[:, :, 0]
        kd, vd = k_dec[:, :, : step + 1], v_dec[:, :, : step + 1]
        if attention == "bifurcated":
            y = bifurcated_attention_merged(q[:, :, 0], k_ctx, v_ctx, kd, vd, self.scale)
        elif attention == "bifurcated-einsum":
            y = bifurcated_attention(q[:, :, 0], k_ctx, v_ctx, kd, vd, self.scale)
        elif attention == "bifurcated-triton":  # two Triton kernels (split context pass + merge)
            y = bifurcated_attention_triton(q[:, :, 0], k_ctx, v_ctx, kd, vd, self.scale)
        elif attention == "plain":
            kf = torch.cat([k_ctx.expand(n, *k_ctx.shape), kd], dim=2)
            vf = torch.cat([v_ctx.expand(n, *v_ctx.shape), vd], dim=2)
            y = plain_batched_attention(q[:, :, 0], kf, vf, self.scale)
        else:
            raise ValueError(f"unknown attention {attention!r} (bifurcated, bifurcated-einsum, bifurcated-triton, plain)")
        return self.wo(y.reshape(n, 1, -1))


def _stack_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose outputs are the parts' outputs, concatenated."""
    w = torch.cat([p.weight for p in parts], dim=0)
    bias = [p.bias for p in parts]
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias[0] is not None, device=w.device, dtype=w.dtype)
    out.weight.copy_(w)
    if bias[0] is not None:
        out.bias.copy_(torch.cat(bias))
    return out


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down
        self.w13: nn.Linear | None = None  # gate and up in one matrix (Transformer.fuse_projections)

    def forward(self, x):
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            if fused_triton.use_for(gate):
                return self.w2(fused_triton.silu_mul(gate, up))
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style init: normal(0.02), residual projections scaled by depth."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
                continue
            std = 0.02
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)

    @torch.no_grad()
    def fuse_projections(self) -> bool:
        """For inference: q/k/v in one linear layer and gate/up in another (fewer, larger
        matrix products per decode step; the separate layers are dropped). Only plain
        nn.Linear layers are fused (not int8 ones); returns whether anything was fused."""
        fused = False
        for layer in self.layers:
            att, ffn = layer.attention, layer.feed_forward
            if att.wqkv is None and all(type(m) is nn.Linear for m in (att.wq, att.wk, att.wv)):
                att.wqkv = _stack_linear([att.wq, att.wk, att.wv])
                att.wq = att.wk = att.wv = None
                fused = True
            if ffn.w13 is None and all(type(m) is nn.Linear for m in (ffn.w1, ffn.w3)):
                ffn.w13 = _stack_linear([ffn.w1, ffn.w3])
                ffn.w1 = ffn.w3 = None
                fused = True
        return fused

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training forward: tokens (B, T) -> logits (B, T, V)."""
        t = tokens.shape[1]
        cos, sin = rope_tables(self.cfg, torch.arange(t, device=tokens.device))
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            a = layer.attention.forward_causal(layer.attention_norm(h), cos, sin)
            h = h + a
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self.logits(h)

    def new_cache(self, capacity: int, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context KV buffers (L, G, capacity, D), stored once for all branches."""
        c = self.cfg
        shape = (c.n_layers, c.n_kv_heads, capacity, c.head_dim)
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = device or self.tok_embeddings.weight.device
        return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                last_only: bool = True) -> torch.Tensor:
        """Extend a context: tokens (T,) at positions [start, start + T); caches (L, G, cap, D)
        are written in place. Returns logits (V,) of the last token, or (T, V)."""
        t = tokens.shape[0]
        cos, sin = rope_tables(self.cfg, torch.arange(start, start + t, device=tokens.device))
        h = self.tok_embeddings(tokens)[None]  # (1, T, dim)
        for i, layer in enumerate(self.layers):
            h = h + layer.attention.forward_causal(layer.attention_norm(h), cos, sin,
                                                   k_cache[i][None], v_cache[i][None], start)
            h = h + layer.feed_forward(layer.ffn_norm(h))
        h = h[0, -1] if last_only else h[0]
        return self.logits(h)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                    dec_k: torch.Tensor, dec_v: torch.Tensor, step: int, attention: str = "bifurcated"):
        """One step for N branches. tokens (N,); k_ctx/v_ctx (L, G, M, D) shared by all
        branches; dec_k/dec_v (L, N, G, m_max, D) written at `step`. Returns logits (N, V).
        attention: "bifurcated" (fused context pass + merge), "bifurcated-einsum" (two-part
        einsum, one softmax), "bifurcated-triton" (bifurcated_triton.py: split context pass
        and merge in two Triton kernels) or "plain" (per-branch copies of the context)."""
        m = k_ctx.shape[2]
        cos, sin = rope_tables(self.cfg, torch.arange(m + step, m + step + 1, device=tokens.device))  # no host copy: CUDA-graph safe
        h = self.tok_embeddings(tokens)[:, None]  # (N, 1, dim)
        for i, layer in enumerate(self.layers):
            a = layer.attention.forward_decode(layer.attention_norm(h), cos, sin, k_ctx[i], v_ctx[i],
                                               dec_k[i], dec_v[i], step, attention)
            h = h + a
            h = h + layer.feed_forward(layer.ffn_norm(h))
        return self.logits(h[:, 0])


@torch.no_grad()
def decode_step_plain_cached(model: Transformer, tokens: torch.Tensor, full_k: torch.Tensor,
                             full_v: torch.Tensor, m_ctx: int, step: int) -> torch.Tensor:
    """Plain batched decode as batch serving does it without prefix sharing: each branch
    holds its own copy of the context KV in a persistent cache full_k/full_v
    (L, N, G, M + m_max, D); this step writes slot M + step and attends over the rest."""
    cfg = model.cfg
    pos = m_ctx + step
    cos, sin = rope_tables(cfg, torch.arange(pos, pos + 1, device=tokens.device))
    h = model.tok_embeddings(tokens)[:, None]  # (N, 1, dim)
    n = tokens.shape[0]
    for i, layer in enumerate(model.layers):
        attn = layer.attention
        q, k, v = attn._qkv(layer.attention_norm(h), cos, sin)
        full_k[i, :, :, pos] = k[:, :, 0]
        full_v[i, :, :, pos] = v[:, :, 0]
        y = plain_batched_attention(q[:, :, 0], full_k[i, :, :, : pos + 1], full_v[i, :, :, : pos + 1], attn.scale)
        h = h + attn.wo(y.reshape(n, 1, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.logits(h[:, 0])
