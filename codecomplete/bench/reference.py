"""The reference decode paths the benchmarks measure bifurcated attention against (torch).

- plain_batched_attention: each branch attends over its own copy of the context KV;
- plain_attention_over_copies: the same, the copies made from the shared context per step;
- bifurcated_attention: the straightforward bifurcated step (two einsums, a cat, one
  softmax), the design's first version; models.model.bifurcated_attention_merged replaced it;
- decode_step_plain_cached and PlainCachedTorchRuntime: plain batched decode as batch
  serving does it without prefix sharing, every branch holding its own persistent cache.

The attention functions have bifurcated_attention_merged's contract where they take a
shared context, so Transformer.decode_step takes them as its `attention`.
"""

from __future__ import annotations

import torch

from codecomplete.models.model import Transformer, rope_tables, sdpa
from codecomplete.runtime.base import BranchState, Runtime
from codecomplete.runtime.torch import TorchRuntime


def plain_batched_attention(q, k_full, v_full, scale: float):
    """One decode step: q (N, H, D), k_full/v_full (N, G, M + m, D) per-branch copies."""
    n, h, d = q.shape
    g = k_full.shape[1]
    if g != h:  # expand kv heads to query heads
        k_full = k_full.repeat_interleave(h // g, dim=1)
        v_full = v_full.repeat_interleave(h // g, dim=1)
    out = sdpa(q[:, :, None, :], k_full, v_full, scale=scale)
    return out[:, :, 0, :]


def plain_attention_over_copies(q, k_ctx, v_ctx, k_dec, v_dec, scale: float):
    """plain_batched_attention over the context copied in front of each branch's decode KV."""
    n = q.shape[0]
    k_full = torch.cat([k_ctx.expand(n, *k_ctx.shape), k_dec], dim=2)
    v_full = torch.cat([v_ctx.expand(n, *v_ctx.shape), v_dec], dim=2)
    return plain_batched_attention(q, k_full, v_full, scale)


def bifurcated_attention(q, k_ctx, v_ctx, k_dec, v_dec, scale: float):
    """One decode step for N branches over a shared context, as two-part einsums.

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


@torch.no_grad()
def decode_step_plain_cached(model: Transformer, tokens: torch.Tensor, full_k: torch.Tensor,
                             full_v: torch.Tensor, m_ctx: int, step: int) -> torch.Tensor:
    """Plain batched decode as batch serving does it without prefix sharing: each branch
    holds its own copy of the context KV in a persistent cache full_k/full_v
    (L, N, G, M + m_max, D); this step writes slot M + step and attends over the rest."""
    pos = m_ctx + step
    cos, sin = rope_tables(model.cfg, torch.arange(pos, pos + 1, device=tokens.device))
    n = tokens.shape[0]

    def attend(i, attention, x):
        q, k, v = attention.qkv(x, cos, sin)
        full_k[i, :, :, pos] = k[:, :, 0]
        full_v[i, :, :, pos] = v[:, :, 0]
        y = plain_batched_attention(q[:, :, 0], full_k[i, :, :, : pos + 1], full_v[i, :, :, : pos + 1],
                                    attention.scale)
        return y.reshape(n, 1, -1)  # the heads: the block applies wo

    h = model.run_layers(model.embed(tokens)[:, None], attend)  # (N, 1, dim)
    return model.logits(h[:, 0])


class PlainCachedTorchRuntime(TorchRuntime):
    """The torch runtime with decode_step_plain_cached: every branch gets its own copy of the
    context KV (the baseline `bench generate` measures bifurcated decode against)."""

    decode_many = Runtime.decode_many  # one request after another: its caches are not the bifurcated layout

    def __init__(self, source, **kwargs):
        kwargs["cuda_graphs"] = False  # the graphs decode the bifurcated layout
        super().__init__(source, **kwargs)
        self.attention = "plain"
        self.graphs = self.varlen = None

    def start_branches(self, context, n, max_new_tokens):
        c = self.config
        m = len(context.tokens)
        k_buf, v_buf = context.kv
        shape = (c.n_layers, n, c.n_kv_heads, m + max_new_tokens, c.head_dim)
        full_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        full_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        full_k[:, :, :, :m] = k_buf[:, None, :, :m]
        full_v[:, :, :, :m] = v_buf[:, None, :, :m]
        return BranchState(n=n, max_new_tokens=max_new_tokens, kv=(full_k, full_v))

    def _decode_step(self, context, branches, tokens):
        dec_k, dec_v = branches.kv
        return decode_step_plain_cached(self.model, tokens, dec_k, dec_v, len(context.tokens), branches.step)

    def _branch_start(self, branches: BranchState, step: int) -> int:
        """The context sits in front of the branch tokens in these caches."""
        return branches.kv[0].shape[3] - branches.max_new_tokens + step


# `bench generate --attention` names beyond the runtime's own (models.model.DECODE_ATTENTION)
REFERENCE_ATTENTION = {"bifurcated-einsum": bifurcated_attention}


def torch_runtime(attention: str, source=None, model: Transformer | None = None, **kwargs) -> TorchRuntime:
    """A torch runtime decoding with the named attention: "plain" (PlainCachedTorchRuntime),
    a REFERENCE_ATTENTION name, or one the runtime knows. `model`: one built in memory."""
    cls = PlainCachedTorchRuntime if attention == "plain" else TorchRuntime
    if attention != "plain":
        kwargs["attention"] = REFERENCE_ATTENTION.get(attention, attention)
    if model is not None:
        return cls.from_model(model, **kwargs)
    return cls(source, **kwargs)
