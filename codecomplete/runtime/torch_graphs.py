"""The torch runtime's batched decode step on CUDA.

- VarlenDecoder: all rows of all requests through the weights in one pass, attention as
  one varlen bifurcated kernel launch per layer (models/varlen_triton.py), whose
  per-request facts (context and branch addresses, lengths, steps, tokens, positions)
  are one int64 tensor `meta`.
- DecodeGraphs: that step captured as a CUDA graph per bucket of rows (1, 2, 4, ... up
  to max_batch_rows), at load, so that a step costs one host-to-device copy of `meta`,
  one replay and one copy of the logits back, not hundreds of kernel launches from
  Python. A batch is padded up to its bucket; the padding rows write into a scratch
  branch and are never read. Contexts need no length bucket: each kernel program reads
  its request's length from `meta`.

The KV stays in the tensors prefill and start_branches allocate (no pool to copy into):
a step addresses them through `meta`, and the caching allocator keeps their memory once
the first keystrokes have run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch

from codecomplete.models import varlen_triton
from codecomplete.models.varlen_triton import (
    CHUNK_FIELDS,
    CHUNK_LEN,
    CHUNK_START,
    FIELDS,
    POSITION,
    TOKEN,
    VarlenRequest,
    fill_chunk_meta,
    fill_meta,
)

from .base import DecodeStep, TopRows

log = logging.getLogger(__name__)


def varlen_supported(rt) -> bool:
    """Whether the runtime's model can take the varlen step: CUDA, Triton, plain float
    linear layers (bitsandbytes int8 keeps the eager loop), a power-of-two head size."""
    d = rt.config.head_dim
    return (varlen_triton.AVAILABLE and rt.device.type == "cuda" and rt.precision in ("fp32", "bf16", "fp16")
            and d >= 16 and not d & (d - 1))


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... below max_rows, then max_rows itself."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return out + [max_rows]


class VarlenDecoder:
    """The batched decode step over a runtime's model (eager: launched from Python)."""

    def __init__(self, rt, max_request_rows: int, pad_rows: bool = False):
        """pad_rows: run() pads each batch to a power of two of rows, as the graphs do."""
        c = rt.config
        self.rt = rt
        self.max_request_rows = max_request_rows
        self.pad_rows = pad_rows
        cuda = rt.device.type == "cuda"  # elsewhere: Triton's interpreter, which the tests run it through
        self.sm_count = torch.cuda.get_device_properties(rt.device).multi_processor_count if cuda else 4
        shape = (c.n_layers, 1, c.n_kv_heads, 1, c.head_dim)  # where padding rows write their keys
        self.scratch_k = torch.zeros(shape, dtype=rt.dtype, device=rt.device)
        self.scratch_v = torch.zeros(shape, dtype=rt.dtype, device=rt.device)
        self._plans: dict[int, varlen_triton.VarlenPlan] = {}

    def plan(self, slots: int) -> varlen_triton.VarlenPlan:
        if slots not in self._plans:
            c = self.rt.config
            self._plans[slots] = varlen_triton.plan_varlen(slots, self.max_request_rows, c.n_heads, c.n_kv_heads,
                                                           self.sm_count)
        return self._plans[slots]

    def fits(self, steps: Sequence[DecodeStep]) -> bool:
        """Requests of at most max_request_rows rows (fill_meta checks that their caches are
        contiguous, as the runtime allocates them)."""
        limit = self.max_request_rows
        return all(s.branches.n <= limit for s in steps)

    def requests(self, steps: Sequence[DecodeStep]) -> list[VarlenRequest]:
        return [VarlenRequest(s.context.kv[0], s.context.kv[1], len(s.context.tokens), s.branches.kv[0],
                              s.branches.kv[1], s.branches.step, s.next_tokens) for s in steps]

    def step(self, meta: torch.Tensor, plan: varlen_triton.VarlenPlan, cmeta: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Logits (slots, V) float32 of one step described by meta (FIELDS, slots) on the device.
        cmeta (CHUNK_FIELDS + C,): a prefill chunk of up to C tokens rides the step, its rows
        after the slots' in every matrix product (the weights are read once for both); the
        logits then have one more row, the chunk's last token's."""
        if cmeta is None:
            def attend(i, q, k, v, scale):
                return varlen_triton.varlen_bifurcated_attention(q, k, v, meta, i, plan, scale)

            return self.rt.model.decode_rows(meta[TOKEN], meta[POSITION], attend).float()
        slots, c = plan.slots, cmeta.shape[0] - CHUNK_FIELDS
        arange = torch.arange(max(slots, c), device=meta.device)
        tokens = torch.cat([meta[TOKEN], cmeta[CHUNK_FIELDS:]])
        positions = torch.cat([meta[POSITION], cmeta[CHUNK_START] + arange[:c]])
        select = torch.cat([arange[:slots], (slots - 1 + cmeta[CHUNK_LEN]).view(1)])

        def attend_both(i, q, k, v, scale):
            rows = varlen_triton.varlen_bifurcated_attention(q[:slots], k[:slots], v[:slots], meta, i, plan, scale)
            chunk = varlen_triton.chunk_attention(q[slots:], k[slots:], v[slots:], cmeta, i, scale)
            return torch.cat([rows, chunk])

        return self.rt.model.decode_rows(tokens, positions, attend_both, select).float()

    def run(self, steps: Sequence[DecodeStep], slots: int | None = None, host=None) -> list:
        """One step for all requests, launched eagerly; slots: pad the rows to this many
        (as a graph's bucket does); host(logits, steps): what turns the (rows, V) device
        logits into each step's result (default rows_to_host)."""
        rows = sum(s.branches.n for s in steps)
        slots = slots or (1 << (rows - 1).bit_length() if self.pad_rows else rows)
        meta = np.zeros((FIELDS, slots), dtype=np.int64)
        fill_meta(meta, self.requests(steps), self.scratch_k, self.scratch_v, self.rt.batch_attention == "plain")
        logits = self.step(torch.from_numpy(meta).to(self.rt.device), self.plan(slots))
        return (host or rows_to_host)(logits[:rows], steps)


def logits_to_host(logits: torch.Tensor) -> np.ndarray:
    """A step's (rows, V) float32 logits in host memory of their own. On CUDA the buffer
    comes from torch's caching pinned allocator: a fresh numpy array of a 7B vocabulary's
    rows (78 MB at 128 rows) costs more in page faults and copies than the step itself."""
    if not logits.is_cuda:
        return logits.numpy()
    host = torch.empty(logits.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(logits, non_blocking=True)
    torch.cuda.current_stream(logits.device).synchronize()
    return host.numpy()  # the array keeps the pinned block alive; freed, it returns to the cache


def rows_to_host(logits: torch.Tensor, steps: Sequence[DecodeStep]) -> list[np.ndarray]:
    """Each step's (N_i, V) float32 rows in host memory (views of one buffer of this step's own)."""
    return split_rows(logits_to_host(logits), steps)


def reduce_packed(logits: torch.Tensor, banned: torch.Tensor | None, k: int, tail: float) -> torch.Tensor:
    """(rows, 2k + 1) float64 on the device: per row its k best allowed token ids
    (ascending), their logits, then the log-sum-exp over the allowed logits within `tail`
    of the best. banned: a (V,) bool mask (None: nothing banned). Ids < 2^53 and float32
    values survive float64 exactly, so one tensor carries all three to the host."""
    allowed = logits.masked_fill(banned, float("-inf")) if banned is not None else logits
    values, ids = torch.topk(allowed, min(k, allowed.shape[1]), dim=1)
    ids, order = ids.sort(dim=1)
    values = values.gather(1, order)
    best = values.max(dim=1, keepdim=True).values
    near = torch.where(allowed >= best - tail, torch.exp(allowed - best), torch.zeros((), device=allowed.device))
    lse = best[:, 0] + torch.log(near.sum(dim=1))
    return torch.cat([ids.to(torch.float64), values.double(), lse.double()[:, None]], dim=1)


def reduce_rows(logits: torch.Tensor, steps: Sequence[DecodeStep], banned: torch.Tensor | None, k: int,
                tail: float, keep_dtype: torch.dtype, packed: Callable[[], np.ndarray] | None = None
                ) -> list[TopRows]:
    """A step's (rows, V) float32 logits reduced on their device, per step a TopRows (its
    rows' k best allowed tokens, their log-sum-exp over those within `tail` of the best):
    a few kB to the host instead of rows x V x 4 bytes. Each step's rows stay on the device
    in keep_dtype (the model's: no rounding), a copy of their own (a graph's output buffer
    is overwritten by its next replay; a decode trace keeps one request's rows, not the
    batch's), for the rows a sampler needs whole. packed: what gives reduce_packed's answer
    for these rows in host memory, once the copies above are queued (the graphs compute it
    inside the step; it synchronises)."""
    kept, r0 = [], 0
    for s in steps:
        kept.append(logits[r0:r0 + s.branches.n].to(keep_dtype, copy=True))
        r0 += s.branches.n
    gathered = queue_gathers(logits, steps)  # copied by the same sync
    host = reduce_packed(logits, banned, k, tail).cpu().numpy() if packed is None else packed()  # one sync
    gathered = gathered() if gathered is not None else [None] * len(steps)
    width = (host.shape[1] - 1) // 2
    all_ids = host[:, :width].astype(np.int64)
    all_values = host[:, width:2 * width].astype(np.float32)
    all_lse = host[:, -1].astype(np.float32)
    out, r0 = [], 0
    for rows in kept:
        n = len(rows)

        def fetch(index: np.ndarray, rows: torch.Tensor = rows) -> np.ndarray:
            return rows[torch.as_tensor(index, device=rows.device)].float().cpu().numpy()

        def gather(r: int, ids: np.ndarray, rows: torch.Tensor = rows) -> np.ndarray:
            return rows[r][torch.as_tensor(np.asarray(ids, dtype=np.int64), device=rows.device)].float().cpu().numpy()

        out.append(TopRows(all_ids[r0:r0 + n], all_values[r0:r0 + n], all_lse[r0:r0 + n], fetch, gather=gather,
                           vocab=logits.shape[1], gathered=gathered[len(out)]))
        r0 += n
    return out


def queue_gathers(logits: torch.Tensor, steps: Sequence[DecodeStep]
                  ) -> Callable[[], list[dict[int, tuple[np.ndarray, np.ndarray]] | None]] | None:
    """The logits each step's DecodeStep.gather asks for, read from the steps' (rows, V)
    device logits in one indexing launch and queued to pinned host memory (None: none
    asked). The callable, once the stream is synchronised, splits them per step into
    TopRows' `gathered` ({row: (ids, float32 logits)}). One launch and no round trip of
    their own, where each pick's TopRows.gather costs two (its ids in, its logits out)."""
    wants, flat, r0 = [], [], 0
    vocab = logits.shape[1]
    for i, s in enumerate(steps):
        for row, ids in (s.gather or {}).items():
            ids = np.asarray(ids, dtype=np.int64)
            if 0 <= row < s.branches.n and len(ids) and ids.min() >= 0 and ids.max() < vocab:  # else: TopRows.gather's
                wants.append((i, row, ids))
                flat.append((r0 + row) * vocab + ids)
        r0 += s.branches.n
    if not wants:
        return None
    index = torch.from_numpy(np.concatenate(flat))
    if logits.is_cuda:
        index = index.pin_memory().to(logits.device, non_blocking=True)
    values = logits.reshape(-1).index_select(0, index).float()
    host = torch.empty(values.shape, dtype=torch.float32, pin_memory=logits.is_cuda)
    host.copy_(values, non_blocking=logits.is_cuda)

    def split() -> list[dict[int, tuple[np.ndarray, np.ndarray]] | None]:
        got = host.numpy()
        out: list[dict | None] = [None] * len(steps)
        start = 0
        for i, row, ids in wants:
            out[i] = out[i] or {}
            out[i][row] = (ids, got[start:start + len(ids)].copy())
            start += len(ids)
        return out

    return split


# Buckets of at most this many rows reduce their rows inside the replay. Measured on an
# H200: the shipped model's one-typist step replays in about 0.37 ms, less than the eager
# reduction's ~18 launches take to queue, so they lengthen every step; on the 7B shape, in the
# replay against after it, 0.99x at 4 rows, 1.00x at 39, 1.03x at 144 (a replay reduces its
# whole padded bucket, while the eager launches overlap a 5 ms replay anyway).
REDUCE_IN_REPLAY_ROWS = 16


class TopSpec:
    """What decode_many_top asks of a step's rows: the banned mask ((V,) bool on the
    device, or None), k best tokens, the log-sum-exp's tail, the dtype rows are kept in."""

    def __init__(self, banned: torch.Tensor | None, k: int, tail: float, keep_dtype: torch.dtype):
        self.banned, self.k, self.tail, self.keep_dtype = banned, k, tail, keep_dtype


def split_rows(logits, steps: Sequence[DecodeStep]) -> list:
    """Each request's (N_i, V) rows of a batch's logits (views of a buffer of this step's own)."""
    out, r0 = [], 0
    for s in steps:
        out.append(logits[r0:r0 + s.branches.n])
        r0 += s.branches.n
    return out


class _Captured:
    """One bucket's graph (its replay) and its static tensors (cmeta: a chunk bucket's)."""

    def __init__(self, replay, meta_host, meta_dev, logits_dev, cmeta_host=None, cmeta_dev=None, packed_dev=None):
        self.replay, self.meta_host, self.meta_dev, self.logits_dev = replay, meta_host, meta_dev, logits_dev
        self.meta_np = meta_host.numpy()  # the pinned buffer, written in place each step
        self.cmeta_host, self.cmeta_dev = cmeta_host, cmeta_dev
        self.cmeta_np = cmeta_host.numpy() if cmeta_host is not None else None
        self.packed_dev = packed_dev  # reduce_packed of the logits, computed by the replay (None: not captured)
        self.packed_host = (torch.empty(packed_dev.shape, dtype=packed_dev.dtype, pin_memory=packed_dev.is_cuda)
                            if packed_dev is not None else None)


class FusedChunk:
    """A prefill chunk for DecodeGraphs.run: `tokens` (at most the graphs' chunk_tokens) at
    `start` of a context cache (L, G, cap, D); `logits` (V,) float32 once the step ran."""

    def __init__(self, context_k: torch.Tensor, context_v: torch.Tensor, start: int, tokens: Sequence[int]):
        self.context_k, self.context_v, self.start, self.tokens = context_k, context_v, start, list(tokens)
        self.logits: np.ndarray | None = None


class DecodeGraphs:
    """VarlenDecoder.step captured per bucket of rows; run() replays them."""

    def __init__(self, varlen: VarlenDecoder, max_batch_rows: int, emulate: bool = False, chunk_tokens: int = 0,
                 top_k: int = 0, tail: float = 0.0, top_max_rows: int | None = None):
        """emulate: no CUDA graph, the step re-run eagerly into the same static tensors at
        each replay (the tests run everything else of this class on CPU with it).
        chunk_tokens: also capture each bucket with a prefill chunk of up to this many
        tokens riding the step (0: none). top_k, tail: each replay also reduces its rows
        (reduce_packed: the top_k best allowed tokens, the log-sum-exp within tail), so that
        decode_many_top's reduction costs no launches of its own (0: not captured); the
        banned ids are a static mask (use_banned). top_max_rows: only buckets of at most
        this many rows reduce in the replay (default REDUCE_IN_REPLAY_ROWS; larger ones
        reduce after it, eagerly)."""
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        if chunk_tokens < 0:
            raise ValueError("chunk_tokens must be 0 (none) or more")
        if top_k < 0:
            raise ValueError("top_k must be 0 (no reduction in the graphs) or more")
        self.top_k, self.tail = top_k, float(tail)
        self.top_max_rows = REDUCE_IN_REPLAY_ROWS if top_max_rows is None else top_max_rows
        rt = varlen.rt
        self.banned_dev = torch.zeros(rt.config.vocab_size, dtype=torch.bool, device=rt.device) if top_k else None
        self._banned_src: torch.Tensor | None = None  # the mask banned_dev holds a copy of (None: nothing banned)
        self.varlen = varlen
        self.max_rows = max_batch_rows
        self.buckets = row_buckets(max_batch_rows)
        self.chunk_tokens = chunk_tokens
        self.captured: dict[tuple[int, int], _Captured] = {}  # (rows, chunk tokens) -> graph
        self.emulate = emulate
        self.cuda = varlen.rt.device.type == "cuda"
        # time_replays: each replay between two CUDA events, their time added to replay_ms
        # once the step's answer has synchronised (what the device took, launch gaps within
        # it included); the benchmarks read it, a step otherwise records no events
        self.time_replays = False
        self.replay_ms = 0.0
        self.pool = None
        self.capture_s = 0.0  # how long capture_all took (compile, warm-up and capture)

    def capture_all(self) -> None:
        """Capture every bucket, largest first (the smaller ones reuse its memory pool)."""
        import time

        t0 = time.perf_counter()
        if not self.emulate:
            self.pool = torch.cuda.graph_pool_handle()
        for slots in reversed(self.buckets):
            self.capture(slots)
            if self.chunk_tokens:
                self.capture(slots, self.chunk_tokens)
        if self.cuda:
            torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        log.info("captured decode graphs for %s rows in %.2f s", self.buckets, self.capture_s)

    @torch.inference_mode()
    def capture(self, slots: int, chunk: int = 0) -> None:
        varlen = self.varlen
        device = varlen.rt.device
        plan = varlen.plan(slots)
        meta_host = torch.zeros((FIELDS, slots), dtype=torch.int64, pin_memory=self.cuda)
        fill_meta(meta_host.numpy(), [], varlen.scratch_k, varlen.scratch_v)  # every row padding
        meta_dev = meta_host.to(device, copy=True)
        cmeta_host = cmeta_dev = None
        if chunk:
            cmeta_host = torch.zeros(CHUNK_FIELDS + chunk, dtype=torch.int64, pin_memory=self.cuda)
            fill_chunk_meta(cmeta_host.numpy(), varlen.scratch_k, varlen.scratch_v, 0, [])  # an empty chunk
            cmeta_dev = cmeta_host.to(device, copy=True)

        reduce_here = self.top_k > 0 and slots <= self.top_max_rows

        def step():
            logits = varlen.step(meta_dev, plan, cmeta_dev)
            packed = reduce_packed(logits, self.banned_dev, self.top_k, self.tail) if reduce_here else None
            return logits, packed

        if self.emulate:
            logits_dev, packed_dev = step()

            def rerun():
                logits, packed = step()
                logits_dev.copy_(logits)
                if packed is not None:
                    packed_dev.copy_(packed)

            self.captured[slots, chunk] = _Captured(rerun, meta_host, meta_dev, logits_dev, cmeta_host, cmeta_dev,
                                                    packed_dev)
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # compile the kernels and set up cuBLAS outside the capture
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits_dev, packed_dev = step()
        self.captured[slots, chunk] = _Captured(graph.replay, meta_host, meta_dev, logits_dev, cmeta_host, cmeta_dev,
                                                packed_dev)

    def fits(self, steps: Sequence[DecodeStep]) -> bool:
        return self.varlen.fits(steps) and all(s.branches.n <= self.max_rows for s in steps)

    def groups(self, steps: Sequence[DecodeStep]) -> list[list[DecodeStep]]:
        """Consecutive requests packed into batches of at most max_rows rows."""
        out, rows = [[]], 0
        for s in steps:
            if rows + s.branches.n > self.max_rows and out[-1]:
                out.append([])
                rows = 0
            out[-1].append(s)
            rows += s.branches.n
        return out

    def reduces(self, top: TopSpec) -> bool:
        """Whether the replays compute this reduction (captured with its k and tail)."""
        return self.top_k > 0 and top.k == self.top_k and top.tail == self.tail

    def use_banned(self, mask: torch.Tensor | None) -> None:
        """The banned ids the replays' reduction masks: (V,) bool on the device, or None."""
        if mask is self._banned_src:
            return
        if mask is None:
            self.banned_dev.zero_()
        else:
            self.banned_dev.copy_(mask)
        self._banned_src = mask

    def run(self, steps: Sequence[DecodeStep], host=None, chunk: FusedChunk | None = None,
            top: TopSpec | None = None) -> list:
        """host(logits, steps): as VarlenDecoder.run's. chunk: rides the first group's step
        (its logits are set on it). top: each step's rows reduced (reduce_rows' TopRows; in
        the replay when the graphs were captured with its k and tail), instead of host."""
        out = []
        host = host or rows_to_host
        in_graph = top is not None and self.reduces(top)
        if in_graph:
            self.use_banned(top.banned)
        for group in self.groups(steps):
            if top is None:
                def result(logits, packed, group=group):
                    return host(logits, group)
            else:
                def result(logits, packed, group=group):
                    return reduce_rows(logits, group, top.banned, top.k, top.tail, top.keep_dtype, packed)
            out.extend(self.replay(self.varlen.requests(group), sum(s.branches.n for s in group), result, chunk,
                                   packed=in_graph))
            chunk = None
        return out

    def prefill(self, context_k: torch.Tensor, context_v: torch.Tensor, start: int, tokens: Sequence[int]
                ) -> np.ndarray:
        """Extend a context at `start` by a few tokens, one single-row replay each (the
        row's branch is the context itself); the last token's logits (V,)."""
        for t, token in enumerate(tokens):
            logits = self.replay([VarlenRequest(context_k, context_v, start, None, None, t, [int(token)])], 1)
        return logits[0]

    def replay(self, requests: Sequence[VarlenRequest], rows: int, host=None, chunk: FusedChunk | None = None,
               packed: bool = False):
        """One step of these requests' rows through their bucket's graph: the logits
        (rows, V) in host memory of their own (or what host(device rows, packed) makes of
        them; it must synchronise). chunk: through the bucket's chunk graph, its logits set
        on it. packed: host gets the replay's reduce_packed rows in host memory (else None)."""
        slots = next(b for b in self.buckets if b >= rows)
        cap = self.captured[slots, self.chunk_tokens if chunk is not None else 0]
        fill_meta(cap.meta_np, requests, self.varlen.scratch_k, self.varlen.scratch_v,
                  self.varlen.rt.batch_attention == "plain")
        if chunk is not None:
            fill_chunk_meta(cap.cmeta_np, chunk.context_k, chunk.context_v, chunk.start, chunk.tokens)
            cap.cmeta_dev.copy_(cap.cmeta_host, non_blocking=True)
        cap.meta_dev.copy_(cap.meta_host, non_blocking=True)
        timed = self.time_replays and self.cuda and not self.emulate
        if timed:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        cap.replay()
        if timed:
            end.record()
        last = cap.logits_dev[slots].clone() if chunk is not None else None  # before the next replay overwrites it
        # emulated (CPU): the rows of a copy of their own, as the device's come to host memory;
        # the static buffer's own would be the next replay's of this bucket (a step split into
        # groups replays one bucket several times)
        logits = cap.logits_dev[:rows].clone() if self.emulate else cap.logits_dev[:rows]
        if host is None:
            out = logits_to_host(logits)  # synchronises: meta_host is free again after this
        elif not packed or cap.packed_dev is None:  # (a bucket too large to reduce in its replay)
            out = host(logits, None)
        else:  # a few kB through the pinned buffer, read once host has queued its own copies
            cap.packed_host[:rows].copy_(cap.packed_dev[:rows], non_blocking=True)

            def packed_rows() -> np.ndarray:
                if self.cuda:
                    torch.cuda.current_stream(cap.packed_dev.device).synchronize()
                return cap.packed_host[:rows].numpy()  # until the next replay: the caller copies

            out = host(logits, packed_rows)
        if timed:
            end.synchronize()  # (host synchronised already)
            self.replay_ms += begin.elapsed_time(end)
        if chunk is not None:
            chunk.logits = last.cpu().numpy()
        return out
