"""The torch runtime: CPU (fp32, or weight-only int8) and CUDA (bf16, or int8 through
bitsandbytes Linear8bitLt). Bifurcated decode by default."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence

import torch

from codecomplete.models import bifurcated_triton, skinny_triton
from codecomplete.models.format.folder import dequantize, quantize_rows_int8
from codecomplete.models.format.source import ModelSource
from codecomplete.models.model import DECODE_ATTENTION, Transformer
from codecomplete.sampler import TAIL, TOP_K, _banned_mask, per_array

from . import torch_graphs
from .base import BranchState, ContextState, DecodeStep, PrefillChunk, Runtime

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
            if isinstance(child, torch.nn.Linear) and child is not getattr(model, "embed_proj", None):  # B stays float: embed() reads it
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
            if isinstance(child, torch.nn.Linear) and child is not getattr(model, "embed_proj", None):  # B stays float: embed() reads it
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
                q.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16).cpu().contiguous(), requires_grad=False,
                                             has_fp16_weights=False)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(torch.float16).cpu(), requires_grad=False)
                setattr(parent, name, q.cuda())  # moving to CUDA quantizes the weight
    return model


ATTENTION_MODES = tuple(DECODE_ATTENTION)  # bench/reference.py holds the reference variants
BATCH_ATTENTION = ("bifurcated", "plain")  # how decode_many attends a request's context
ROW_INDICES_KEPT = 512  # distinct branch-row lists kept as device indices (a step keeps or splits up to N rows)


class TorchRuntime(Runtime):
    name = "torch"

    def __init__(self, source: ModelSource | None, device: str = "cpu", precision: str = "auto",
                 attention: str | Callable = "auto", threads: int | None = None, model: Transformer | None = None,
                 batch_attention: str = "bifurcated", cuda_graphs: bool | None = None, max_batch_rows: int = 256,
                 max_request_rows: int = 32, varlen: bool | None = None, graph_prefill_tokens: int = 2,
                 fused_chunk_tokens: int = 256):
        """batch_attention: "bifurcated" reads each request's context once per layer for all its
        rows in decode_many, "plain" once per row (the baseline). cuda_graphs (CUDA): decode
        through CUDA graphs captured at load for batches of up to max_batch_rows rows, each
        request at most max_request_rows (None: on wherever they can run: CUDA, a float
        precision, Triton, attention "auto"; a named attention is decoded with that function,
        eagerly). varlen (CUDA): the batched step's attention as one varlen kernel per layer
        (None: as cuda_graphs; False: a loop over the requests, as on CPU). graph_prefill_tokens:
        with graphs, a prefill of at most this many new tokens runs as that many one-row
        replays (a typed character's prefill, without launching every layer from Python).
        fused_chunk_tokens: with graphs, each bucket is also captured with a prefill chunk of
        up to this many tokens riding the step (decode_many(chunk=)), so that a newcomer's
        prompt costs the others a longer step, not an eager pass of its own between two
        steps (0: no such graphs; a model with a sliding window has none)."""
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
        if precision == "auto":
            precision = "bf16" if device == "cuda" else "fp32"
        if precision not in ("fp32", "bf16", "fp16", "int8"):
            raise ValueError(f"unknown precision {precision!r} (fp32, bf16, fp16, int8)")
        triton_ok = device == "cuda" and bifurcated_triton.AVAILABLE
        chosen_attention = attention != "auto"  # a named decode attention is what decode must run (benchmarks)
        if attention == "auto":  # the Triton kernel on CUDA when Triton is there (it is with CUDA torch)
            attention = "bifurcated-triton" if triton_ok else "bifurcated"
        if not callable(attention) and attention not in ATTENTION_MODES:  # a function: a reference variant
            raise ValueError(f"unknown attention {attention!r} ({', '.join(ATTENTION_MODES)})")
        if attention == "bifurcated-triton":
            if not triton_ok:
                raise ValueError("attention 'bifurcated-triton' needs device 'cuda' and the triton package")
        if batch_attention not in BATCH_ATTENTION:
            raise ValueError(f"unknown batch_attention {batch_attention!r} ({', '.join(BATCH_ATTENTION)})")
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
        self.batch_attention = batch_attention
        self.graph_prefill_tokens = graph_prefill_tokens
        # decode_many_top reduces the rows on the device (CUDA: the host gets kB, not rows x V x 4 B
        # of logits; on a CPU the rows are in host memory already, and a tensor's reduction is
        # no cheaper than numpy's)
        self.reduces_rows = device == "cuda"
        self._banned_masks: dict[int, tuple[object, torch.Tensor]] = {}  # id(banned) -> (banned, device mask)
        self._row_indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.graphs = None  # torch_graphs.DecodeGraphs when decode runs through CUDA graphs
        self.varlen = None  # torch_graphs.VarlenDecoder: the batched step on CUDA (one kernel per layer)
        if varlen is False and cuda_graphs:
            raise ValueError("cuda_graphs replay the varlen step: they need varlen")
        if varlen is None:
            varlen = None if not chosen_attention or cuda_graphs else False
        if cuda_graphs is None:
            cuda_graphs = None if not chosen_attention else False
        if device == "cuda" and torch_graphs.varlen_supported(self) and varlen is not False:
            self.varlen = torch_graphs.VarlenDecoder(self, min(max_request_rows, max_batch_rows))
            if cuda_graphs is None or cuda_graphs:
                if skinny_triton.enabled() and not hasattr(model, "skinny_choices"):  # once per model (runtimes may share one)
                    # the graphs' few-row products: a Triton kernel per weight shape where it beats cuBLAS
                    model.skinny_choices = skinny_triton.tune_model(model)
                    for c in model.skinny_choices:
                        log.info("few-row products %s %s at %d rows: cuBLAS %.1f us, best %.1f us, %s", c.name,
                                 c.shape, c.rows, c.cublas_us, c.best_us, c.plan or "cuBLAS kept")
                chunk = 0 if model.cfg.sliding_window else fused_chunk_tokens
                self.graphs = torch_graphs.DecodeGraphs(self.varlen, max_batch_rows, chunk_tokens=chunk, top_k=TOP_K,
                                                        tail=TAIL)
                self.graphs.capture_all()  # at load, so that no keystroke pays capture or compile
        elif cuda_graphs or varlen:
            raise ValueError("cuda_graphs and varlen need device 'cuda', a float precision (fp32, bf16, fp16), "
                             "a power-of-two head size and triton")
        self.warm_up_s = self.warm_up() if device == "cuda" else 0.0

    @torch.inference_mode()
    def warm_up(self) -> float:
        """Run each kind of call once on a throwaway prompt, so that the first keystroke
        compiles no kernel: Triton specialises on whether a length is 1 or a multiple of
        16, so prefill runs with new-token counts of each kind. Returns the seconds taken."""
        import time

        t0 = time.perf_counter()
        vocab = self.config.vocab_size
        prompt = [i % vocab for i in range(7, 7 + 49)]
        state, _ = self.prefill(prompt[:29])
        for end in (30, 46, 49):  # 1, 16, then 3 new tokens
            state, _ = self.prefill(prompt[:end], state)
        for n in (1, 2, 4, 8, 16):  # the kernels' block sizes for these row counts
            branches = self.start_branches(state, n, 4)
            for _ in range(3):
                self.decode(state, branches, [1 % vocab] * n)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    @classmethod
    def from_model(cls, model: Transformer, tokenizer=None, **kwargs) -> TorchRuntime:
        """A runtime around a model built in memory (benchmarks with random weights)."""
        rt = cls(None, model=model, **kwargs)
        rt.tokenizer = tokenizer
        return rt

    def describe(self) -> dict:
        attention = self.attention if isinstance(self.attention, str) else self.attention.__name__
        return {"runtime": self.name, "device": str(self.device), "attention": attention,
                "batch_attention": self.batch_attention, "cuda_graphs": self.graphs is not None,
                "fused_chunk_tokens": self.fused_chunk_tokens,
                "few_row_products": [c.as_dict() for c in getattr(self.model, "skinny_choices", [])]}

    @property
    def fused_chunk_tokens(self) -> int:
        return self.graphs.chunk_tokens if self.graphs is not None else 0

    def weight_bytes(self) -> int:
        """Bytes held by the model's parameters and buffers (int8 weights count one byte)."""
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=self.device)

    def _rows_index(self, rows: Sequence[int]) -> torch.Tensor:
        """The device index of a few branch rows, made once per distinct list: a fresh one
        is a copy from pageable memory, which on CUDA waits for the stream (and lets go of
        the GIL), once per request-step where branches split or end."""
        key = tuple(int(r) for r in rows)
        idx = self._row_indices.get(key)
        if idx is None:
            if len(self._row_indices) >= ROW_INDICES_KEPT:
                self._row_indices.clear()
            with torch.inference_mode(False):  # a plain tensor, usable in and out of inference mode
                idx = self._row_indices[key] = torch.tensor(key, dtype=torch.long, device=self.device)
        return idx

    @torch.inference_mode()
    def prefill(self, tokens, previous=None, *, capacity_tokens=None):
        tokens = self.check_prefill(tokens)
        keep = self.reuse_split(tokens, previous)
        k_buf, v_buf = self._context_buffers(tokens, previous, keep, capacity_tokens)
        if self.graphs is not None and len(tokens) - keep <= self.graph_prefill_tokens:
            logits = self.graphs.prefill(k_buf, v_buf, keep, tokens[keep:])
        else:
            logits = self.model.prefill(self._tensor(tokens[keep:]), k_buf, v_buf, keep).float().cpu().numpy()
        state = ContextState(tokens, (k_buf, v_buf), reused_tokens=keep, new_tokens=len(tokens) - keep)
        return state, logits

    def _context_buffers(self, tokens: list[int], previous: ContextState | None, keep: int,
                         capacity_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V caches a prefill of `tokens` writes into, holding previous's first `keep`."""
        if keep and previous.kv is not None and previous.kv[0].shape[2] >= len(tokens):
            return previous.kv  # a prefix's state (a chunked prefill's last chunk): no copy
        # capacity grows in steps: a 32k-context model must not take 32k of KV per prompt
        wanted = max(len(tokens), int(capacity_tokens or 0))
        capacity = min(self.config.max_seq_len, -(-(wanted + 256) // 1024) * 1024)
        new_k, new_v = self.model.new_cache(capacity, dtype=self.dtype, device=self.device)
        if keep and previous.kv is not None:
            new_k[:, :, :keep] = previous.kv[0][:, :, :keep]
            new_v[:, :, :keep] = previous.kv[1][:, :, :keep]
        return new_k, new_v

    def _fuse(self, chunk: PrefillChunk, steps: list[DecodeStep]) -> torch_graphs.FusedChunk | None:
        """The chunk ready to ride these steps' graph replay (its state set), or None: it is
        too long for the graphs' chunk, or the steps do not take the graphs."""
        limit = self.fused_chunk_tokens
        if not limit or not self.graphs.fits(steps):
            return None
        tokens = self.check_prefill(chunk.tokens)
        keep = self.reuse_split(tokens, chunk.previous)
        if not 0 < len(tokens) - keep <= limit:
            return None
        k_buf, v_buf = self._context_buffers(tokens, chunk.previous, keep, chunk.capacity_tokens)
        chunk.state = ContextState(tokens, (k_buf, v_buf), reused_tokens=keep, new_tokens=len(tokens) - keep)
        chunk.fused = True
        return torch_graphs.FusedChunk(k_buf, v_buf, keep, tokens[keep:])

    def start_branches(self, context, n, max_new_tokens):
        c = self.config
        shape = (c.n_layers, n, c.n_kv_heads, max_new_tokens, c.head_dim)
        dec_k = torch.empty(shape, dtype=self.dtype, device=self.device)
        dec_v = torch.empty(shape, dtype=self.dtype, device=self.device)
        return BranchState(n=n, max_new_tokens=max_new_tokens, kv=(dec_k, dec_v))

    @torch.inference_mode()
    def decode(self, context, branches, next_tokens):
        if self.graphs is not None:  # one typist takes the captured step too
            return self.decode_many([DecodeStep(context, branches, next_tokens)])[0]
        self.check_decode(context, branches, next_tokens)
        logits = self._decode_step(context, branches, self._tensor(next_tokens))
        branches.step += 1
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def decode_many(self, steps, chunk: PrefillChunk | None = None):
        """All rows of all requests through the weights in one pass (one matrix product per
        projection); attention per request over its own context plus each row's own keys
        (CUDA: one varlen kernel launch per layer, replayed from a CUDA graph). chunk: a
        prefill that rides this step (Runtime.fused_chunk_tokens)."""
        return self._decode_batch(list(steps), None, chunk)

    @torch.inference_mode()
    def decode_many_top(self, steps, full, banned, k, tail, chunk: PrefillChunk | None = None):
        """decode_many with the rows reduced on the device (Runtime.decode_many_top), when
        reduces_rows; the steps with full[i] get their whole rows, copied from there."""
        steps, full = list(steps), list(full)
        if len(full) != len(steps):
            raise ValueError(f"{len(full)} full flags for {len(steps)} steps")
        if not self.reduces_rows or all(full):
            return self._decode_batch(steps, None, chunk)
        top = torch_graphs.TopSpec(self._banned_mask(banned), k, tail, self.dtype)
        out = self._decode_batch(steps, None, chunk, top)
        for rows in out:
            rows.banned = banned
        return [rows.full() if whole else rows for rows, whole in zip(out, full, strict=True)]

    def _banned_mask(self, banned) -> torch.Tensor | None:
        """The (V,) bool device mask of the banned ids (made once per banned array)."""
        if banned is None or not len(banned):
            return None
        return per_array(self._banned_masks, banned,
                         lambda: torch.tensor(_banned_mask(banned, self.config.vocab_size)).to(self.device))

    def _decode_batch(self, steps: list[DecodeStep], host, chunk: PrefillChunk | None = None,
                      top: torch_graphs.TopSpec | None = None) -> list:
        """decode_many's step; host(logits, steps): what turns the device logits (rows, V)
        float32 into each step's result (None: host arrays). top: each step's rows reduced
        instead (TopRows; by the graph replay itself where it can)."""
        if top is not None:
            def host(logits, group, top=top):
                return torch_graphs.reduce_rows(logits, group, top.banned, top.k, top.tail, top.keep_dtype)

        seen = set()
        for s in steps:
            self.check_decode(s.context, s.branches, s.next_tokens)
            if id(s.branches) in seen:
                raise ValueError("decode_many got the same branches twice in one step")
            seen.add(id(s.branches))
        fused = self._fuse(chunk, steps) if chunk is not None and steps else None
        if chunk is not None and fused is None:
            chunk.state, chunk.logits = self.prefill(chunk.tokens, chunk.previous, capacity_tokens=chunk.capacity_tokens)
        if not steps:
            return []
        if self.graphs is not None and self.graphs.fits(steps):
            out = self.graphs.run(steps, host, fused, top)
            if fused is not None:
                chunk.logits = fused.logits
        elif self.varlen is not None and self.varlen.fits(steps):
            out = self.varlen.run(steps, host=host)
        else:
            out = (host or torch_graphs.rows_to_host)(self._decode_rows_eager(steps).float(), steps)
        for s in steps:
            s.branches.step += 1
        return out

    def _decode_rows_eager(self, steps: list[DecodeStep]) -> torch.Tensor:
        """Logits (sum N_i, V) of one batched step; attention is a loop over the requests."""
        tokens = self._tensor([t for s in steps for t in s.next_tokens])
        positions = self._tensor([len(s.context.tokens) + s.branches.step for s in steps for _ in range(s.branches.n)])
        attend_one = DECODE_ATTENTION[self.attention] if isinstance(self.attention, str) else self.attention
        plain = self.batch_attention == "plain"

        def attend(i, q, k, v, scale):  # q (R, H, D), k/v (R, G, D)
            q = q.contiguous()
            out = torch.empty_like(q)
            r0 = 0
            for s in steps:
                n, step, m = s.branches.n, s.branches.step, len(s.context.tokens)
                dec_k, dec_v = s.branches.kv
                dec_k[i, :, :, step] = k[r0:r0 + n]
                dec_v[i, :, :, step] = v[r0:r0 + n]
                k_ctx, v_ctx = s.context.kv[0][i, :, :m], s.context.kv[1][i, :, :m]
                # plain: every row over the context on its own, as if it held a copy of it
                for a, b in ([(j, j + 1) for j in range(n)] if plain else [(0, n)]):
                    out[r0 + a:r0 + b] = attend_one(q[r0 + a:r0 + b], k_ctx, v_ctx, dec_k[i, a:b, :, :step + 1],
                                                    dec_v[i, a:b, :, :step + 1], scale)
                r0 += n
            return out

        return self.model.decode_rows(tokens, positions, attend)

    def _decode_step(self, context: ContextState, branches: BranchState, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (N, V) of one step; writes this step's KV into the branch caches."""
        m = len(context.tokens)
        k_buf, v_buf = context.kv
        dec_k, dec_v = branches.kv
        return self.model.decode_step(tokens, k_buf[:, :, :m], v_buf[:, :, :m], dec_k, dec_v, branches.step,
                                      self.attention)

    reuses_branches = True

    def context_prefix(self, context, n):
        if context.kv is None or not 0 < n <= len(context.tokens):
            return None
        return ContextState(list(context.tokens[:n]), context.kv)  # attention reads its first n positions

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
        idx = self._rows_index(rows)
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
        idx = self._rows_index(keep)
        dec_k, dec_v = branches.kv
        return BranchState(n=len(keep), max_new_tokens=branches.max_new_tokens, step=branches.step,
                           kv=(dec_k.index_select(1, idx), dec_v.index_select(1, idx)))
