"""Matrix products of a few rows (a decode step of one or a few typists) as Triton
kernels, chosen per weight shape at load (CUDA; CPU through TRITON_INTERPRET=1).

A decode step of 1-64 rows reads every weight once and does little arithmetic on it: its
matrix products are bound by how fast the weights stream in. On an H200, at 16 rows of the
7B shape's layers, cuBLAS streams 1.9-3.9 TB/s against a 4.1 TB/s copy bandwidth; a kernel
that gives each program a few output columns and walks their whole rows in long tiles
streams 2.5-4.2 TB/s on the matrices where it wins (docs/results/batching.md, "Tenth H200
run").
Which one wins depends on the shape: how many programs a grid has against the SMs. So
`tune_model` times both on the model's own weights at load and keeps a Triton plan only
where it is faster, per shape and row class (`Linear.skinny_plans`;
`Transformer.head_skinny_plans` for a tied head). `linear` also adds the bias and the
block's residual as it stores, so the residual's add is no kernel of its own. On CUDA the
plans apply inside CUDA graph captures only (`plan_for`).

The kernel: grid (N / BLOCK_N, S). Program (n, s) multiplies the rows of x by columns
[n·BLOCK_N, (n+1)·BLOCK_N) of Wᵀ over the s-th of S equal slices of K, in tensor-core dots.
The rows are padded to 16, 32 or 64 (the row class); the rows past M are masked zeros.
- One slice: the program adds bias and residual and stores in the input dtype.
- Several: each program stores float32 partials, and `_reduce_kernel` sums them, adds bias
  and residual and casts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .graph_timing import graph_us

try:
    import triton
    import triton.language as tl
except ImportError:  # the laptop install and CI have no Triton
    triton = None
    tl = None

AVAILABLE = triton is not None
ROW_CLASSES = (16, 32, 64)  # the kernel pads a product's rows to the next of these; more rows go to cuBLAS
MAX_ROWS = ROW_CLASSES[-1]
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_enabled = AVAILABLE and os.environ.get("CODECOMPLETE_SKINNY_MATMUL", "1") != "0"
# on CUDA the plans apply only inside a CUDA graph's capture: launched from Python, a
# Triton kernel costs the host more than torch's cuBLAS call, and an eager step of a small
# model is bound by its launches (tests turn this off to compare eager outputs)
_graphs_only = True


@dataclass(frozen=True)
class SkinnyPlan:
    block_n: int  # output columns a program computes
    block_k: int  # the K tile a loop iteration loads
    num_warps: int
    num_stages: int
    splits: int = 1  # slices of K, summed by _reduce_kernel when more than one

    def fits(self, n: int, k: int) -> bool:
        return n % self.block_n == 0 and k % (self.splits * self.block_k) == 0


# per row class: launch shapes that won somewhere in a sweep over the 7B shape's five
# matrices (wqkv, wo, w13, w2, the head) at 4, 16 and 64 rows on an H200, and narrow tiles
# split four ways over K (the shipped model's small w2 took them). tune_model picks among
# them per shape. Each candidate is a Triton compile at a machine's first load (about 1 s
# each; Triton's cache keeps them for later loads), so the list holds only shapes that won.
_FEW = (SkinnyPlan(32, 256, 4, 5), SkinnyPlan(64, 64, 4, 3), SkinnyPlan(128, 128, 4, 3), SkinnyPlan(64, 256, 4, 4, 2),
        SkinnyPlan(32, 128, 4, 4, 4))
CANDIDATES = {16: _FEW, 32: _FEW,
              64: (SkinnyPlan(128, 64, 4, 3), SkinnyPlan(64, 128, 4, 5, 2), SkinnyPlan(128, 128, 4, 4),
                   SkinnyPlan(32, 256, 4, 4))}


def block_rows(m: int) -> int:
    """The row class (the kernel's BLOCK_M) of an m-row product; 0 past the largest."""
    return next((c for c in ROW_CLASSES if m <= c), 0)


def enabled() -> bool:
    """Whether tuned plans are used (CODECOMPLETE_SKINNY_MATMUL=0 and disabled() turn them off)."""
    return _enabled


def set_graphs_only(on: bool) -> None:
    """On CUDA: the plans inside CUDA graph captures only (the default), or in eager calls too."""
    global _graphs_only
    _graphs_only = bool(on)


@contextmanager
def disabled():
    """cuBLAS for every product inside the block (a CUDA graph captured in it keeps that)."""
    global _enabled
    before = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = before


def plan_for(x: torch.Tensor, plans: dict[int, SkinnyPlan] | None) -> SkinnyPlan | None:
    """The plan x (..., K) runs with, or None for torch's own product: a plan for its row
    class, kernels on, inference, on CUDA while a graph is captured (or Triton's interpreter)."""
    if not plans or not _enabled or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if x.is_cuda:
        if _graphs_only and not torch.cuda.is_current_stream_capturing():
            return None
        if x.dtype not in (torch.bfloat16, torch.float16):  # tuned in half precision (float32: TF32 dots)
            return None
    elif not _INTERPRET:
        return None
    return plans.get(block_rows(x.numel() // x.shape[-1]))


if AVAILABLE:

    # the bias and the residual are runtime flags: a branch each, not a compile per combination
    @triton.jit(do_not_specialize=["m", "has_bias", "has_res"])
    def _skinny_kernel(X, W, B, R, Y, m, n, k, stride_xm, stride_wn, stride_rm, stride_ym, stride_ys, k_per_split,
                       has_bias, has_res, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PARTIAL: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        live = rows[:, None] < m
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        first = pid_s * k_per_split
        for start in range(first, first + k_per_split, BLOCK_K):
            x = tl.load(X + rows[:, None] * stride_xm + (start + kk)[None, :], mask=live, other=0.0)
            w = tl.load(W + cols[:, None] * stride_wn + (start + kk)[None, :])
            acc += tl.dot(x, tl.trans(w))
        if PARTIAL:
            tl.store(Y + pid_s * stride_ys + rows[:, None] * stride_ym + cols[None, :], acc, mask=live)
        else:
            if has_bias:
                acc += tl.load(B + cols).to(tl.float32)[None, :]
            if has_res:
                acc += tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=live, other=0.0).to(tl.float32)
            tl.store(Y + rows[:, None] * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty), mask=live)

    @triton.jit(do_not_specialize=["splits", "has_bias", "has_res"])
    def _reduce_kernel(P, B, R, Y, n, splits, stride_ps, stride_pm, stride_rm, stride_ym, has_bias, has_res,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, splits):
            acc += tl.load(P + s * stride_ps + row * stride_pm + cols, mask=ok, other=0.0)
        if has_bias:
            acc += tl.load(B + cols, mask=ok, other=0.0).to(tl.float32)
        if has_res:
            acc += tl.load(R + row * stride_rm + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_ym + cols, acc.to(Y.dtype.element_ty), mask=ok)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: SkinnyPlan,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ + bias + residual (..., N), at most MAX_ROWS rows of x
    (padded to their row class); float32 accumulation, x's dtype out. The plan must fit
    (N, K)."""
    if not AVAILABLE:
        raise RuntimeError("skinny_triton.linear needs the triton package")
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_ROWS or x.shape[-1] != k or not plan.fits(n, k):
        raise ValueError(f"skinny product of {tuple(x.shape)} by {tuple(weight.shape)}: plan {plan} does not fit "
                         f"(at most {MAX_ROWS} rows, N a multiple of {plan.block_n}, K of "
                         f"{plan.splits * plan.block_k})")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("the weight's rows must be contiguous")
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, n)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*lead, n)
    dummy = y  # an unread pointer for the absent bias / residual
    has_bias, has_res = int(bias is not None), int(r2 is not None)
    k_per_split = k // plan.splits
    shape = dict(BLOCK_M=block_rows(m), BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, num_warps=plan.num_warps,
                 num_stages=plan.num_stages)
    if plan.splits == 1:
        _skinny_kernel[(n // plan.block_n, 1)](
            x2, weight, bias if has_bias else dummy, r2 if has_res else dummy, y, m, n, k,
            x2.stride(0), weight.stride(0), r2.stride(0) if has_res else 0, y.stride(0), 0, k_per_split,
            has_bias, has_res, PARTIAL=False, **shape)
    else:
        parts = torch.empty((plan.splits, m, n), dtype=torch.float32, device=x.device)
        _skinny_kernel[(n // plan.block_n, plan.splits)](
            x2, weight, dummy, dummy, parts, m, n, k, x2.stride(0), weight.stride(0), 0, parts.stride(1),
            parts.stride(0), k_per_split, 0, 0, PARTIAL=True, **shape)
        block = 1024
        _reduce_kernel[(m, triton.cdiv(n, block))](
            parts, bias if has_bias else dummy, r2 if has_res else dummy, y, n, plan.splits,
            parts.stride(0), parts.stride(1), r2.stride(0) if has_res else 0, y.stride(0), has_bias, has_res,
            BLOCK=block, num_warps=4)
    return y.view(*lead, n)


# ------------------------------------------------------------------ choosing plans at load


@dataclass
class ShapeChoice:
    """What tune_model measured for one weight shape (all the model's matrices of it) at one
    row class."""

    name: str
    shape: tuple[int, int]  # (N, K)
    rows: int  # the row class, timed at this many rows
    matrices: int
    cublas_us: float  # one product and, where the block adds one, its residual's add
    best_us: float
    plan: SkinnyPlan | None  # None: cuBLAS

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "rows": self.rows, "matrices": self.matrices,
                "cublas_us": round(self.cublas_us, 2), "best_us": round(self.best_us, 2),
                "plan": None if self.plan is None else dict(vars(self.plan))}


def model_products(model) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor | None], bool, list]]:
    """The model's matrix products a decode step runs, by role: (weights, biases, whether the
    block adds a residual to the result, the owners that keep the chosen plans)."""
    roles = {"wqkv": ([], [], False, []), "wo": ([], [], True, []), "w13": ([], [], False, []),
             "w2": ([], [], True, [])}
    for layer in model.layers:
        for role, lin in (("wqkv", layer.attention.wqkv), ("wo", layer.attention.wo),
                          ("w13", layer.feed_forward.w13), ("w2", layer.feed_forward.w2)):
            if type(lin) is not torch.nn.Linear:  # a quantized layer keeps its own forward
                continue
            weights, biases, _, owners = roles[role]
            weights.append(lin.weight)
            biases.append(lin.bias)
            owners.append(lin)
    head = model.output
    if model.embed_proj is None and (head is None or type(head) is torch.nn.Linear):
        roles["head"] = ([model.vocab_weight()], [None], False, [head if head is not None else model])
    return {k: v for k, v in roles.items() if v[0]}


def _assign(owners: list, plans: dict[int, SkinnyPlan]) -> None:
    for owner in owners:
        if isinstance(owner, torch.nn.Linear):
            owner.skinny_plans = dict(plans)
        else:  # a tied head: the Transformer keeps its plans
            owner.head_skinny_plans = dict(plans)


@torch.inference_mode()
def tune_model(model, classes: Sequence[int] = ROW_CLASSES, margin: float = 0.97,
               candidates: dict[int, Sequence[SkinnyPlan]] | None = None) -> list[ShapeChoice]:
    """Time cuBLAS against each candidate plan on the model's own weights (every matrix of a
    shape in turn, as a step reads them, so none is in L2) at each row class's rows, in CUDA
    graphs; keep a plan where it takes under `margin` of cuBLAS's time. A CUDA model in bf16
    or fp16 with the kernels on only; elsewhere nothing is chosen. Returns what was measured."""
    weight = model.norm.weight
    if not (AVAILABLE and _enabled and weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)):
        return []
    candidates = CANDIDATES if candidates is None else candidates
    out = []
    for role, (weights, biases, residual, owners) in model_products(model).items():
        n, k = weights[0].shape
        chosen: dict[int, SkinnyPlan] = {}
        for rows in classes:
            x = torch.randn(rows, k, device=weight.device, dtype=weight.dtype)
            res = torch.randn(rows, n, device=weight.device, dtype=weight.dtype) if residual else None

            def cublas(w, b, x=x, res=res):
                y = torch.nn.functional.linear(x, w, b)
                return y + res if res is not None else y

            base = graph_us([lambda w=w, b=b: cublas(w, b) for w, b in zip(weights, biases, strict=True)])
            best, best_us = None, base
            for plan in candidates.get(rows, ()):
                if not plan.fits(n, k):
                    continue
                us = graph_us([lambda w=w, b=b, p=plan, x=x, res=res: linear(x, w, b, p, res)
                                for w, b in zip(weights, biases, strict=True)])
                if us < best_us:
                    best, best_us = plan, us
            keep = best if best is not None and best_us < margin * base else None
            if keep is not None:
                chosen[rows] = keep
            out.append(ShapeChoice(role, (n, k), rows, len(weights), base, best_us, keep))
        _assign(owners, chosen)
    torch.cuda.synchronize()
    return out


def clear_plans(model) -> None:
    """Every product of the model back to torch's own."""
    for _, (_, _, _, owners) in model_products(model).items():
        _assign(owners, {})
