"""A Llama-style decoder (RMSNorm, RoPE, SwiGLU), gpt-fast style: the whole forward pass.

The imported families' variants are config fields (format/config.py), read here and by
runtime/onnx_graph.py: LayerNorm with a bias instead of RMSNorm, a GELU MLP with or without
a gate, biases on the attention output and the MLP, scaled embeddings, a sliding window, Granite's multipliers (attention scale, residual scale, logits divisor).

Two attention paths share every block (TransformerBlock.forward holds the residuals):
- causal prefill over a prompt, appending to a context KV cache that has no batch
  dimension: k, v (Hkv, M, D) per layer (training is the same path without a cache);
- bifurcated decode: the context KV is read once for all branches, each branch has a
  small decode KV (N, Hkv, m, D), and one softmax runs over both parts.
The reference variants (plain batched attention over per-branch copies, the two-part
einsum) live beside the benchmark that measures against them, codecomplete/bench/attention.py.

q/k/v and gate/up are one linear layer each (fewer, larger matrix products); the model
folder stores them apart (wq, wk, wv, w1, w3): load_state_dict fuses them, state_dict
splits them again, so checkpoints keep the folder's names.

Shapes are named in comments: N branches, H query heads, G kv heads, P = H // G queries
per kv head, M context tokens, m decoded tokens, D head dim, T new tokens.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fused_triton, skinny_triton
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


def project(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
            residual_scale: float = 1.0) -> torch.Tensor:
    """linear(x), plus residual (times residual_scale for linear's part) when given. A layer
    with a tuned plan (skinny_triton.tune_model: CUDA inference, a decode step's few rows)
    runs it as one Triton kernel that also adds the bias and the residual as it stores."""
    plan = skinny_triton.plan_for(x, getattr(linear, "skinny_plans", None))
    if plan is not None and (residual is None or residual_scale == 1.0):
        return skinny_triton.linear(x, linear.weight, linear.bias, plan, residual)
    y = linear(x)
    if residual is None:
        return y
    return residual + (y if residual_scale == 1.0 else y * residual_scale)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The architecture's norm: RMSNorm, or LayerNorm with a bias (StarCoder2)."""
    if cfg.norm_kind == "layer":
        return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
    return RMSNorm(cfg.dim, cfg.norm_eps)


# the MLP's activation by ModelConfig.activation ("gelu_tanh" is transformers' gelu_pytorch_tanh)
ACTIVATIONS: dict[str, Callable] = {"silu": F.silu, "gelu_tanh": partial(F.gelu, approximate="tanh"),
                                    "gelu": F.gelu}


def rope_tables(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, D/2) for the given absolute positions (half-split layout)."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32) / half))
    if cfg.rope_linear_factor != 1.0:  # as transformers applies linear scaling: to the frequencies
        inv_freq = inv_freq / cfg.rope_linear_factor
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


def visible_keys(t: int, start: int, window: int, device) -> torch.Tensor:
    """(T, start + T) bool: query i (position start + i) sees keys 0..start + i; with a
    sliding window only the last `window` of those, itself included (transformers' rule)."""
    mask = torch.ones(t, start + t, dtype=torch.bool, device=device).tril(diagonal=start)
    if window:
        mask &= ~torch.ones_like(mask).tril(diagonal=start - window)
    return mask


@functools.lru_cache(maxsize=2)  # one per prefill chunk, shared by its layers
def _grouped_visible_keys(t: int, start: int, window: int, heads_per_group: int, device) -> torch.Tensor:
    """visible_keys for a kv group's query heads stacked as one query list: rows (head, token)."""
    return visible_keys(t, start, window, device).repeat(heads_per_group, 1)


def branch_only_attention(q, k_dec, v_dec, scale: float):
    """q (N, H, D) over each branch's own keys k_dec, v_dec (N, G, m, D) alone: a decode step
    whose sliding window has moved past the whole shared context."""
    n, h, d = q.shape
    qg = q.view(n, k_dec.shape[1], -1, d)  # (N, G, P, D)
    w = torch.softmax(torch.einsum("ngpd,ngmd->ngpm", qg, k_dec).float() * scale, dim=-1)
    return torch.einsum("ngpm,ngmd->ngpd", w.to(v_dec.dtype), v_dec).reshape(n, h, d)


def bifurcated_attention_merged(q, k_ctx, v_ctx, k_dec, v_dec, scale: float):
    """One decode step for N branches over a shared context: q (N, H, D); k_ctx, v_ctx
    (G, M, D) stored once; k_dec, v_dec (N, G, m, D) per branch, already holding this
    step's key/value. Returns (N, H, D).

    The context part is one fused flash-attention call over all N·P queries stacked per kv
    head (it returns the log-sum-exp), the small per-branch part an einsum, then a
    log-sum-exp merge: the context KV is read once, in one kernel, and no scores are
    materialised (bench/attention.py holds the two-part einsum it replaces)."""
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




# decode attention by name: the library-call composition (CPU and CUDA) and the Triton kernel
DECODE_ATTENTION: dict[str, Callable] = {
    "bifurcated": bifurcated_attention_merged,
    "bifurcated-triton": bifurcated_attention_triton,  # split context pass + merge, two kernels
}


def _fuse_parts_on_load(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: the folder's separate layers (wq, wk, wv; w1, w3) become
    the module's fused one, their rows stacked in that order."""
    for fused, parts in module.FUSED.items():
        for kind in ("weight", "bias"):
            names = [f"{prefix}{part}.{kind}" for part in parts]
            if all(name in state_dict for name in names):
                state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(name) for name in names])


def _split_fused_on_save(module, state_dict, prefix, _metadata):
    """state_dict post-hook: the fused layers as the folder's separate ones again (copies:
    safetensors refuses tensors that share memory)."""
    for fused, parts in module.FUSED.items():
        if type(getattr(module, fused)) is not nn.Linear:  # a quantized layer keeps its own layout
            continue
        for kind in ("weight", "bias"):
            tensor = state_dict.pop(f"{prefix}{fused}.{kind}", None)
            if tensor is None:
                continue
            for part, rows in zip(parts, tensor.split(module.part_rows[fused]), strict=True):
                state_dict[f"{prefix}{part}.{kind}"] = rows.clone()


class _FusedProjections(nn.Module):
    """A module with fused linear layers (FUSED: fused name -> the folder's part names)."""

    FUSED: dict[str, tuple[str, ...]] = {}

    def __init__(self, part_rows: dict[str, list[int]]):
        super().__init__()
        self.part_rows = part_rows  # fused name -> output rows of each part, in FUSED order
        self.register_load_state_dict_pre_hook(_fuse_parts_on_load)
        self.register_state_dict_post_hook(_split_fused_on_save)


class Attention(_FusedProjections):
    FUSED = {"wqkv": ("wq", "wk", "wv")}

    def __init__(self, cfg: ModelConfig):
        hd = cfg.head_dim
        super().__init__({"wqkv": [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd]})
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, sum(self.part_rows["wqkv"]), bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.wo_bias)
        self.scale = cfg.attention_scale or 1.0 / math.sqrt(hd)

    def qkv(self, x, cos, sin):
        """x (B, T, dim) -> q (B, H, T, D), k, v (B, G, T, D) with RoPE applied."""
        b, t, _ = x.shape
        hd, h, g = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        q, k, v = project(self.wqkv, x).split(self.part_rows["wqkv"], dim=-1)
        q = q.view(b, t, h, hd).transpose(1, 2)
        k = k.view(b, t, g, hd).transpose(1, 2)
        v = v.view(b, t, g, hd).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward_causal(self, x, cos, sin, k_cache=None, v_cache=None, start: int = 0):
        """Training (no cache) or prefill. x (B, T, dim). With a cache (B, G, cap, D) the new
        keys/values are written at [start, start + T) and attention covers [0, start + T).
        Returns the heads' outputs (B, T, H·D), before wo (the block applies it with the
        residual)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if k_cache is not None:
            k_cache[:, :, start : start + t] = k
            v_cache[:, :, start : start + t] = v
            k, v = k_cache[:, :, : start + t], v_cache[:, :, : start + t]
        g, h = self.cfg.n_kv_heads, self.cfg.n_heads
        window = self.cfg.sliding_window
        if start == 0 and (not window or window >= t):
            if g != h:
                k = k.repeat_interleave(h // g, dim=1)
                v = v.repeat_interleave(h // g, dim=1)
            y = sdpa(q, k, v, is_causal=True, scale=self.scale)
        elif g != h:
            # a chunk after a prefix: each kv group's query heads as one longer query list
            # over its keys, not the keys copied per head (that copy is the whole prefix's
            # KV a chunk: its cost grew with the prompt, not the chunk)
            p, d = h // g, q.shape[-1]
            mask = _grouped_visible_keys(t, start, window, p, x.device)
            y = sdpa(q.reshape(b, g, p * t, d), k, v, attn_mask=mask, scale=self.scale).reshape(b, h, t, d)
        else:
            y = sdpa(q, k, v, attn_mask=visible_keys(t, start, window, x.device), scale=self.scale)
        return y.transpose(1, 2).reshape(b, t, h * self.cfg.head_dim)

    def forward_decode(self, x, cos, sin, k_ctx, v_ctx, k_dec, v_dec, step: int, attend: Callable):
        """One token per branch. x (N, 1, dim); k_ctx/v_ctx (G, M, D); k_dec/v_dec
        (N, G, m_max, D) preallocated, written in place at index `step`; attend has
        bifurcated_attention_merged's contract. Returns the heads (N, 1, H·D), before wo."""
        n, m = x.shape[0], k_ctx.shape[1]
        q, k, v = self.qkv(x, cos, sin)  # q (N, H, 1, D), k/v (N, G, 1, D)
        k_dec[:, :, step] = k[:, :, 0]
        v_dec[:, :, step] = v[:, :, 0]
        first_ctx = first_dec = 0  # the oldest context key and branch key this step sees
        if self.cfg.sliding_window:
            first = m + step + 1 - self.cfg.sliding_window  # as a position
            first_ctx, first_dec = min(max(first, 0), m), max(first - m, 0)
        k_dec, v_dec = k_dec[:, :, first_dec : step + 1], v_dec[:, :, first_dec : step + 1]
        if first_ctx == m:  # (flash attention over no keys at all dies with SIGFPE on a CPU)
            y = branch_only_attention(q[:, :, 0], k_dec, v_dec, self.scale)
        else:
            y = attend(q[:, :, 0], k_ctx[:, first_ctx:], v_ctx[:, first_ctx:], k_dec, v_dec, self.scale)
        return y.reshape(n, 1, -1)


class FeedForward(_FusedProjections):
    FUSED = {"w13": ("w1", "w3")}  # gate and up; an ungated MLP's w13 is its up layer alone

    def __init__(self, cfg: ModelConfig):
        parts = ("w1", "w3") if cfg.mlp_gated else ("w3",)
        super().__init__({"w13": [cfg.ffn_dim] * len(parts)})
        self.FUSED = {"w13": parts}
        self.gated, self.activation = cfg.mlp_gated, cfg.activation
        self.act = ACTIVATIONS[cfg.activation]
        self.w13 = nn.Linear(cfg.dim, len(parts) * cfg.ffn_dim, bias=cfg.mlp_bias)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)  # down

    def forward(self, x, residual: torch.Tensor | None = None, residual_scale: float = 1.0):
        """The MLP of x, plus residual (the MLP's part times residual_scale) when given."""
        if not self.gated:
            hidden = self.act(project(self.w13, x))
        else:
            gate, up = project(self.w13, x).chunk(2, dim=-1)
            if self.activation == "silu" and fused_triton.use_for(gate):  # one kernel for silu(gate) * up (CUDA inference)
                hidden = fused_triton.silu_mul(gate, up)
            else:
                hidden = self.act(gate) * up
        return project(self.w2, hidden, residual, residual_scale)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = make_norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = make_norm(cfg)
        self.feed_forward = FeedForward(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, x: torch.Tensor, attend: Callable) -> torch.Tensor:
        """x (B, T, dim); attend(attention, normed x) is this block's attention (causal or
        decode): the heads' outputs (B, T, H·D), which wo projects here, adding the residual
        (in the product's own kernel where a tuned plan runs it)."""
        heads = attend(self.attention, self.attention_norm(x))
        h = project(self.attention.wo, heads, x, self.residual_scale)
        return self.feed_forward(self.ffn_norm(h), h, self.residual_scale)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.embed_rank or cfg.dim)
        # factorized embedding (cfg.embed_rank r): the table is (V, r), embed_proj.weight B
        # (r, dim); a token's vector is A[t]·B, the logits h·Bᵀ·Aᵀ
        self.embed_proj = nn.Linear(cfg.dim, cfg.embed_rank, bias=False) if cfg.embed_rank else None
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 style init: normal(0.02), residual projections scaled by depth. A fused layer
        draws its parts one after another, so a seed gives the weights it gave unfused."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p) if name.endswith("norm.weight") else nn.init.zeros_(p)
                continue
            std = 0.02
            if name.endswith("wo.weight") or name.endswith("w2.weight"):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            owner, _, layer = name.rsplit(".", 1)[0].rpartition(".")
            rows = getattr(self.get_submodule(owner), "part_rows", {}).get(layer, [p.shape[0]])
            with torch.no_grad():
                p.copy_(torch.cat([torch.randn((r, *p.shape[1:]), generator=g) for r in rows]) * std)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (..., dim), scaled as the architecture says (Gemma: by sqrt(dim))."""
        x = self.tok_embeddings(tokens)
        if self.embed_proj is not None:
            x = x @ self.embed_proj.weight.to(x.dtype)  # (..., r) @ (r, dim); a quantized head keeps B float
        return x if self.cfg.embedding_scale == 1.0 else x * self.cfg.embedding_scale

    def head_features(self, h: torch.Tensor) -> torch.Tensor:
        """The last hidden states (..., dim) as the vocabulary matrix multiplies them:
        normed, and projected to rank r for a factorized embedding."""
        h = self.norm(h)
        return h if self.embed_proj is None else self.embed_proj(h)

    def vocab_weight(self) -> torch.Tensor:
        """(V, dim or r): logits = head_features(h) @ vocab_weight().T (before logits_divisor)."""
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.head_features(h)
        if self.output is not None:
            logits = project(self.output, h)
        else:
            plan = skinny_triton.plan_for(h, getattr(self, "head_skinny_plans", None))  # a tied head's tuned plans
            logits = (F.linear(h, self.tok_embeddings.weight) if plan is None
                      else skinny_triton.linear(h, self.tok_embeddings.weight, None, plan))
        return logits if self.cfg.logits_divisor == 1.0 else logits / self.cfg.logits_divisor

    def run_layers(self, h: torch.Tensor, attend: Callable) -> torch.Tensor:
        """h (B, T, dim) through every block; attend(i, attention, x) is layer i's attention:
        the heads' outputs (B, T, H·D) before wo (TransformerBlock.forward)."""
        for i, layer in enumerate(self.layers):
            h = layer(h, partial(attend, i))
        return h

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training forward through the blocks: tokens (B, T) -> last hidden states (B, T, dim)."""
        t = tokens.shape[1]
        cos, sin = rope_tables(self.cfg, torch.arange(t, device=tokens.device))
        return self.run_layers(self.embed(tokens), lambda i, att, x: att.forward_causal(x, cos, sin))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> head_features (B, T, dim or r): logits = features @ vocab_weight().T,
        which a chunked loss computes a slice of positions at a time (152k-wide logits)."""
        return self.head_features(self.hidden(tokens))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training forward: tokens (B, T) -> logits (B, T, V)."""
        return self.logits(self.hidden(tokens))

    def new_cache(self, capacity: int, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Context KV buffers (L, G, capacity, D), stored once for all branches."""
        c = self.cfg
        shape = (c.n_layers, c.n_kv_heads, capacity, c.head_dim)
        dtype = dtype or self.norm.weight.dtype
        device = device or self.norm.weight.device
        return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int,
                last_only: bool = True) -> torch.Tensor:
        """Extend a context: tokens (T,) at positions [start, start + T); caches (L, G, cap, D)
        are written in place. Returns logits (V,) of the last token, or (T, V)."""
        t = tokens.shape[0]
        cos, sin = rope_tables(self.cfg, torch.arange(start, start + t, device=tokens.device))
        h = self.run_layers(self.embed(tokens)[None],  # (1, T, dim)
                            lambda i, att, x: att.forward_causal(x, cos, sin, k_cache[i][None], v_cache[i][None], start))
        h = h[0, -1] if last_only else h[0]
        return self.logits(h)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor,
                    dec_k: torch.Tensor, dec_v: torch.Tensor, step: int,
                    attention: str | Callable = "bifurcated") -> torch.Tensor:
        """One step for N branches. tokens (N,); k_ctx/v_ctx (L, G, M, D) shared by all
        branches; dec_k/dec_v (L, N, G, m_max, D) written at `step`. Returns logits (N, V).
        attention: a name of DECODE_ATTENTION, or a function with its contract (the
        benchmark's reference variants)."""
        attend = DECODE_ATTENTION.get(attention) if isinstance(attention, str) else attention
        if attend is None:
            raise ValueError(f"unknown attention {attention!r} ({', '.join(DECODE_ATTENTION)})")
        m = k_ctx.shape[2]
        cos, sin = rope_tables(self.cfg, torch.arange(m + step, m + step + 1, device=tokens.device))  # no host copy: CUDA-graph safe
        h = self.run_layers(self.embed(tokens)[:, None],  # (N, 1, dim)
                            lambda i, att, x: att.forward_decode(x, cos, sin, k_ctx[i], v_ctx[i], dec_k[i], dec_v[i],
                                                                 step, attend))
        return self.logits(h[:, 0])

    @torch.no_grad()
    def decode_rows(self, tokens: torch.Tensor, positions: torch.Tensor, attend: Callable,
                    select: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for R rows of any number of requests (the batched step of
        decode_many): tokens, positions (R,). attend(i, q, k, v, scale) is layer i's
        attention over whatever KV each row has: q (R, H, D), this step's k, v (R, G, D);
        it stores k, v where the rows keep them and returns (R, H, D). Returns logits (R, V).
        Rows are laid along the time axis of one sequence, so RoPE takes a position per row.
        select (K,) int64: the logits of these rows only, (K, V) (a prefill chunk riding the
        step needs its last token's, not 152k-wide logits for every token)."""
        cos, sin = rope_tables(self.cfg, positions)  # (R, D/2)
        r = tokens.shape[0]

        def layer_attend(i, att, x):  # x (1, R, dim)
            q, k, v = att.qkv(x, cos, sin)  # (1, H, R, D), (1, G, R, D)
            y = attend(i, q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), att.scale)
            return y.reshape(1, r, -1)

        h = self.run_layers(self.embed(tokens)[None], layer_attend)[0]  # (R, dim)
        return self.logits(h if select is None else h.index_select(0, select))
