"""The torch runtime: CPU (fp32, or weight-only int8) and CUDA (bf16, or int8 through
bitsandbytes Linear8bitLt). Bifurcated decode by default."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch

from codecomplete.models import bifurcated_triton
from codecomplete.models.format.folder import dequantize, quantize_rows_int8
from codecomplete.models.format.source import ModelSource
from codecomplete.models.model import DECODE_ATTENTION, Transformer

from .base import BranchState, ContextState, Runtime

log = logging.getLogger(__name__)


def build_torch_model(source: ModelSource, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer holding the source's weights (int8 weights are dequantized). Built on
    the meta device and filled by assignment: no random init, no extra copy."""
    with torch.device("meta"):
        model = Transformer(source.config)
    with warnings.catch_warnings():  # read-only mmap views: inference never writes weights
        warnings.simplefilter("ignore", UserWarning)
        state = {k: torch.from_numpy(v) for k, v in dequantize(source.weights, copy=False).items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device=device, dtype=dtype).eval()


class WeightOnlyInt8Linear(torch.nn.Module):
    """int8 weight (out, in) with a float scale per output channel; activations stay
    float (per-tensor activation quantization flips too many top-1 tokens)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight_int8)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_weight_only_int8(model: Transformer) -> Transformer:
    """Swap every nn.Linear for WeightOnlyInt8Linear (the model folder's int8 rule:
    per-output-channel symmetric, folder.quantize_rows_int8)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.embed_proj:  # B stays float: embed() reads it
                q, scale = quantize_rows_int8(child.weight.data.float().cpu().numpy())
                bias = None if child.bias is None else child.bias.data.clone()
                setattr(parent, name, WeightOnlyInt8Linear(torch.from_numpy(q), torch.from_numpy(scale).to(child.weight.dtype),
                                                           bias))
    return model


def quantize_bnb_int8(model: Transformer) -> Transformer:
    """Swap nn.Linear for bitsandbytes Linear8bitLt (CUDA): int8 weights, fp16 outliers."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not model.embed_proj:  # B stays float: embed() reads it
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16).cpu().contiguous(), requires_grad=False,
                                             has_fp16_weights=False)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(torch.float16).cpu(), requires_grad=False)
                setattr(parent, name, q.cuda())  # moving to CUDA quantizes the weight
    return model


ATTENTION_MODES = tuple(DECODE_ATTENTION)  # bench/reference.py holds the reference variants


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, source: ModelSource | None, device: str = "cpu", precision: str = "auto",
                 attention: str | Callable = "auto", threads: int | None = None, model: Transformer | None = None):
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        if precision == "auto":
            precision = "bf16" if device == "cuda" else "fp32"
        if precision not in ("fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"unknown precision {precision!r} (fp32, bf16, fp16, int8)")
        triton_ok = device == "cuda" and bifurcated_triton.AVAILABLE
        if attention == "auto":  # the Triton kernel on CUDA when Triton is there (it is with CUDA torch)
            attention = "bifurcated-triton" if triton_ok else "bifurcated"
        if not callable(attention) and attention not in ATTENTION_MODES:  # a function: a reference variant
            raise ValueError(f"unknown attention {attention!r} ({', '.join(ATTENTION_MODES)})")
        if attention == "bifurcated-triton":
            if not triton_ok:
                raise ValueError("attention 'bifurcated-triton' needs device 'cuda' and the triton package")
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.precision = precision
        self.attention = attention
        float_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if precision == "int8":  # bitsandbytes computes in fp16 on CUDA
            float_dtype = torch.float16 if device == "cuda" else torch.float32
        self.dtype = float_dtype
        if model is None:
            model = build_torch_model(source, "cpu" if precision == "int8" else device, float_dtype)
        else:
            model = model.to(dtype=float_dtype, device="cpu" if precision == "int8" else device).eval()
        if precision == "int8":
            model = quantize_bnb_int8(model) if device == "cuda" else quantize_weight_only_int8(model)
            model = model.to(device)
        self.model = model
        self.config = model.cfg
        self.tokenizer = source.tokenizer if source is not None else None
        self.name = f"torch-{precision}"

    @classmethod
    def from_model(cls, model: Transformer, tokenizer=None, **kwargs) -> TorchRuntime:
        """A runtime around a model built in memory (benchmarks with random weights)."""
        rt = cls(None, model=model, **kwargs)
        rt.tokenizer = tokenizer
        return rt

    def describe(self) -> dict:
        attention = self.attention if isinstance(self.attention, str) else self.attention.__name__
        return {"runtime": self.name, "device": str(self.device), "attention": attention}

    def weight_bytes(self) -> int:
        """Bytes held by the model's parameters and buffers (int8 weights count one byte)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def prefill(self, tokens, previous=None):
        tokens = self.check_prefill(tokens)
        keep = self.reuse_split(tokens, previous)
        if keep and previous.kv is not None and previous.kv[0].shape[2] >= len(tokens):
            k_buf, v_buf = previous.kv
        else:
            # capacity grows in steps: a 32k-context model must not take 32k of KV per prompt
            capacity = min(self.config.max_seq_len, -(-(len(tokens) + 256) // 1024) * 1024)
            new_k, new_v = self.model.new_cache(capacity, dtype=self.dtype, device=self.device)
            if keep and previous.kv is not None:
                new_k[:, :, :keep] = previous.kv[0][:, :, :keep]
                new_v[:, :, :keep] = previous.kv[1][:, :, :keep]
            k_buf, v_buf = new_k, new_v
        logits = self.model.prefill(self._tensor(tokens[keep:]), k_buf, v_buf, keep)
        state = ContextState(tokens, (k_buf, v_buf), reused_tokens=keep, new_tokens=len(tokens) - keep)
        return state, logits.float().cpu().numpy()

    def start_branches(self, context, n, max_new_tokens):
        c = self.config
        shape = (c.n_layers, n, c.n_kv_heads, max_new_tokens, c.head_dim)
        dec_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        dec_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        return BranchState(n=n, max_new_tokens=max_new_tokens, kv=(dec_k, dec_v))

    @torch.inference_mode()
    def decode(self, context, branches, next_tokens):
        self.check_decode(context, branches, next_tokens)
        logits = self._decode_step(context, branches, self._tensor(next_tokens))
        branches.step += 1
        return logits.float().cpu().numpy()

    def _decode_step(self, context: ContextState, branches: BranchState, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of one step; writes this step's KV into the branch caches."""
        m = len(context.tokens)
        k_buf, v_buf = context.kv
        dec_k, dec_v = branches.kv
        return self.model.decode_step(tokens, k_buf[:, :, :m], v_buf[:, :, :m], dec_k, dec_v, branches.step,
                                      self.attention)

    reuses_branches = True

    @torch.inference_mode()
    def adopt(self, context, branches, row, tokens, start=0):
        m, k = len(context.tokens), len(tokens)
        k_buf, v_buf = context.kv
        if not 0 < k <= branches.step - start or m + k > k_buf.shape[2]:
            return None
        dec_k, dec_v = branches.kv  # (L, N, G, J, D)
        first = self._branch_start(branches, start)
        k_buf[:, :, m:m + k] = dec_k[:, row, :, first:first + k]
        v_buf[:, :, m:m + k] = dec_v[:, row, :, first:first + k]
        return ContextState(list(context.tokens) + [int(t) for t in tokens], (k_buf, v_buf), reused_tokens=m,
                            adopted_tokens=k)

    @torch.inference_mode()
    def branch_from(self, context, branches, rows, start, steps, max_new_tokens):
        if steps > branches.step - start or steps > max_new_tokens:
            return None
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        out = self.start_branches(context, len(rows), max_new_tokens)
        out.step = steps
        dec_k, dec_v = branches.kv
        new_k, new_v = out.kv
        first, to = self._branch_start(branches, start), self._branch_start(out, 0)
        new_k[:, :, :, to:to + steps] = dec_k[:, :, :, first:first + steps].index_select(1, idx)
        new_v[:, :, :, to:to + steps] = dec_v[:, :, :, first:first + steps].index_select(1, idx)
        return out

    def _branch_start(self, branches: BranchState, step: int) -> int:
        """Where a branch's token of this step sits in its cache (bifurcated caches hold only
        the branch tokens)."""
        return step

    def select_branches(self, branches, keep):
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        dec_k, dec_v = branches.kv
        return BranchState(n=len(keep), max_new_tokens=branches.max_new_tokens, step=branches.step,
                           kv=(dec_k.index_select(1, idx), dec_v.index_select(1, idx)))
