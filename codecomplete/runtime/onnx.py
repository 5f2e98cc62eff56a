"""The onnxruntime runtime: the laptop path, int8 weights, no torch at run time.

The graph is built at load time from the model folder's config and weights
(onnx_graph.py); one session serves prefill and the bifurcated decode step. The context
KV lives in numpy buffers (L, capacity, G, D), token-major, so `buf[i, :m]` is a
contiguous view that onnxruntime reads in place: prefill appends only the tokens after
the common prefix with the previous prompt, and decode steps copy nothing of the context.
With onnxruntime-gpu the CUDA provider runs the same graph in fp32, but the KV still
lives in host memory and crosses to the GPU on every call: it works, it is not the fast
GPU path (the torch runtime is).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import tempfile
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from codecomplete.models.format.folder import (
    Q4_SUFFIX,
    dropping_mapped_pages,
    mapped_file,
    mapped_files,
)
from codecomplete.models.format.source import ModelSource

from . import DEVICES
from .base import BranchState, ContextState, Runtime
from .cpu import this_cpu
from .cpuload import CpuLoad
from .onnx_graph import LINEAR_KINDS, EmbeddingTable, build_model, has_empty_context_bug

log = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 256  # long prompts run in chunks: bounded score matrices, no upper triangle
# The one-thread session for a busy CPU packs its own copy of every weight (onnxruntime's
# Python API cannot share packed weights between sessions): worth it for a small model,
# not for Qwen2.5-Coder-0.5B, whose second copy took its peak from 1.0 to 2.3 GB
SINGLE_THREAD_SESSION_MAX_WEIGHT_BYTES = 128 << 20  # bigger weights: one session, workers not spinning


def physical_cores() -> int:
    """Physical CPU cores of this machine (hyper-threads do not help the int8 GEMMs)."""
    return this_cpu().physical_cores


def pick_providers(device: str) -> list[str]:
    """CUDA when asked for (or 'auto') and onnxruntime-gpu is installed, else CPU."""
    available = ort.get_available_providers()
    if device not in (*DEVICES, "auto"):
        raise ValueError(f"unknown device {device!r}; choose {', '.join(DEVICES)} or auto")
    if device in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError("device 'cuda' asked for, but onnxruntime has no CUDAExecutionProvider "
                           "(install onnxruntime-gpu)")
    return ["CPUExecutionProvider"]


def release_free_memory() -> None:
    """Hand the graph build's freed buffers back to the OS (glibc keeps them otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class SpilledArrays(dict):
    """The graph's external weights, each written to an unlinked file as the builder makes
    it and read back as a view of that file mapped once (`finish`). onnxruntime packs its
    own copy of every weight at session start but needs ours alive; file-backed, ours can
    leave memory (drop_mapped_pages) instead of doubling it. Arrays that are views of a
    mapped file already (a model folder's 4-bit weights) are kept as they are."""

    ALIGN = 64

    def __init__(self, directory: str | None = None):
        super().__init__()
        try:
            self._file = tempfile.TemporaryFile(dir=directory)
        except OSError:
            self._file = tempfile.TemporaryFile()
        self._records: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self._size = 0
        self._map: mmap.mmap | None = None

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        if mapped_file(array) is not None or array.nbytes == 0:
            super().__setitem__(name, array)
            return
        offset = -self._size % self.ALIGN + self._size
        self._file.seek(offset)
        self._file.write(memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B"))
        self._size = offset + array.nbytes
        self._records[name] = (offset, array.dtype, array.shape)
        super().__setitem__(name, None)  # keeps the order; the view comes with finish()

    def finish(self) -> SpilledArrays:
        self._file.flush()
        if self._records:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            for name, (offset, dtype, shape) in self._records.items():
                count = int(np.prod(shape))
                super().__setitem__(name, np.frombuffer(self._map, dtype, count, offset).reshape(shape))
        self._file.close()  # the mapping keeps the unlinked file's pages
        return self


def lazily_resident(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array whose pages become resident only where it is written: an anonymous
    mapping kept off transparent huge pages. numpy asks for huge pages for big arrays, and
    the context KV (L, capacity, G, D) is written a few rows per layer: each layer's rows
    then cost 2 MB pages, 190 MB for Qwen2.5-Coder-0.5B at a 1300-token prompt."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buf = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    try:
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages here: nothing to keep off
        pass
    return np.frombuffer(buf, dtype, count).reshape(shape)


def is_int8(source: ModelSource) -> bool:
    return source.quantization.startswith("int8") or any(k.endswith("_scale") for k in source.weights)


def is_gguf(source: ModelSource) -> bool:
    """Whether the weights were converted from a GGUF file (whose precision the run keeps)."""
    return source.path.lower().endswith(".gguf")


def is_int4(source: ModelSource) -> bool:
    """Some weights are stored 4-bit (a 4-bit GGUF's, folder.Q4Weight)."""
    return source.quantization.startswith("int4") or any(k.endswith(Q4_SUFFIX) for k in source.weights)


@dataclass
class ContextKV:
    """The context KV: k, v (L, capacity, G, D), filled up to the context length."""

    k: np.ndarray
    v: np.ndarray

    @property
    def capacity(self) -> int:
        return self.k.shape[1]


@dataclass
class BranchKV:
    """Per-branch decode KV: k, v (L, max_new_tokens, N, G, D), in the cache dtype."""

    k: np.ndarray
    v: np.ndarray


class OnnxRuntime(Runtime):
    name = "onnx"

    def __init__(self, source: ModelSource, device: str = "cpu", precision: str = "auto",
                 threads: int | None = None, linear_kind: str | None = None,
                 prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS, kv_dtype: str | None = None,
                 spin: bool | None = None, empty_context_guard: bool | None = None):
        self.providers = pick_providers(device)
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.precision_reason = f"precision {precision} asked for"
        if precision == "auto":
            # onnxruntime's CUDA kernels have no uint8-weight MatMulInteger: fp32 there. On a
            # CPU, int8 weights take the fast uint8 x int8 kernels: full 8-bit weights where
            # VNNI/AMX make them exact, 7-bit ones where AVX2 would saturate (runtime/cpu.py),
            # except a GGUF's, which keep their 8 bits on the exact uint8-weight kernels
            quantized = is_int8(source) or is_int4(source)
            if quantized and self.device == "cpu":
                precision, self.precision_reason = this_cpu().int8_linear_kind(keep_8_bits=is_gguf(source))
                if is_int4(source):  # the 4-bit weights run as they are stored, the int8 ones by this CPU's kind
                    linear_kind = linear_kind or precision
                    precision, self.precision_reason = "int4", (
                        f"4-bit weights as stored (MatMulNBits); int8 ones as {precision}: {self.precision_reason}")
            else:
                precision = "fp32"
                self.precision_reason = ("float weights" if not quantized else
                                         "onnxruntime's CUDA kernels have no uint8 x int8 MatMulInteger")
        if precision == "int4" and linear_kind is None:  # asked for: every linear weight 4-bit
            linear_kind = "int4"
        if precision in LINEAR_KINDS:  # a linear kind names its precision: int8-w7 is int8
            linear_kind, precision = linear_kind or precision, precision.split("-")[0]
        if precision not in ("fp32", "int8", "int4"):
            raise ValueError(f"unknown precision {precision!r} for onnx (auto, {', '.join(LINEAR_KINDS)})")
        linear_kind = linear_kind or precision
        if linear_kind not in LINEAR_KINDS or (precision == "fp32") != (linear_kind == "fp32"):
            raise ValueError(f"linear kind {linear_kind!r} does not fit precision {precision!r}")
        self.config = source.config
        self.tokenizer = source.tokenizer
        self.precision = precision
        self.linear_kind = linear_kind
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._threads_asked = bool(threads)
        self.threads = threads or physical_cores()
        # threads=None: all physical cores while the machine is otherwise idle, one thread
        # while other programs keep it busy (cpuload.py) if the weights are small enough for a
        # second session (SINGLE_THREAD_SESSION_MAX_WEIGHT_BYTES); an explicit count is kept as given
        self.adaptive = threads is None and spin is None and self.threads > 1 and self.device == "cpu"
        self.spin = self.threads > 1 if spin is None else spin
        self.name = f"onnx-{precision}"

        # int8 and int4 runs keep the KV in float16: attention reads half the bytes
        self.kv_dtype = kv_dtype or ("float16" if precision in ("int8", "int4") else "float32")
        self._np_kv = np.dtype(self.kv_dtype)
        from codecomplete.hub import cache_root

        external = SpilledArrays(str(cache_root()) if cache_root().is_dir() else None)
        # None: where this onnxruntime has the empty-context bug (onnx_graph.EMPTY_CONTEXT_BUG)
        self.empty_context_guard = (has_empty_context_bug(ort.__version__) if empty_context_guard is None
                                    else empty_context_guard)
        self.embed = EmbeddingTable(source.weights, linear_kind)
        with dropping_mapped_pages(mapped_files(source.weights)):  # read once to build the graph's copies
            model = build_model(self.config, source.weights, linear_kind, self.kv_dtype, external=external,
                                ctx_bias=self.empty_context_guard)
        if self.empty_context_guard:
            c = self.config
            self._ctx_bias_zeros = np.zeros(c.max_seq_len, np.float32)
            self._ctx_bias_empty = np.array([-np.inf], np.float32)
            self._stand_in_row = np.zeros((1, c.n_kv_heads, c.head_dim), self._np_kv)
        # the big tensors go in beside the protobuf: no 2 GiB limit, no serialised copy
        external.finish()
        self._external_names = list(external)
        self._model_bytes = model.SerializeToString()  # small: the weights are external
        # what the session packs: the external weights and the small ones inside the protobuf
        self.weight_bytes = sum(a.nbytes for a in external.values()) + len(self._model_bytes)
        if self.adaptive and self.weight_bytes > SINGLE_THREAD_SESSION_MAX_WEIGHT_BYTES:
            # no one-thread session to fall back on: workers that sleep between ops instead, which
            # kept Qwen2.5-Coder-0.5B's decode step at 0.60x of spinning ones on a busy 2-core machine
            self.adaptive, self.spin = False, False
        self._external = [ort.OrtValue.ortvalue_from_numpy(a) for a in external.values()]
        spilled = dict(external)
        del model, external
        # the graph holds its own copies of most weights (transposed int8), and the session
        # its packed ones: the mapped pages of the folder and of the spill file need not stay resident
        with dropping_mapped_pages(mapped_files({**source.weights, **spilled})):  # OrtValues keep the spill mapped
            self.session = self._new_session(self.threads, self.spin)
        self._single: ort.InferenceSession | None = None  # one thread: made when first needed
        self._load = CpuLoad() if self.adaptive else None
        self._active = self.session  # the session serving the current request
        release_free_memory()
        log.info("onnx runtime: %s on %s (%s linear layers, %s KV cache, %d threads%s)", self.name,
                 self.session.get_providers()[0], linear_kind, self.kv_dtype, self.threads,
                 ", 1 while the CPU is busy" if self.adaptive else "")
        c = self.config
        self._kv_shape = (c.n_kv_heads, c.head_dim)
        self._output_names = ["logits"] + [f"new_{kv}.{i}" for i in range(c.n_layers) for kv in "kv"]

    def _new_session(self, threads: int, spin: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        if self._external:
            options.add_external_initializers(self._external_names, self._external)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # several threads: workers spin between the ops of a call (a sleeping worker costs a
        # wake-up per op) and stop spinning when the call returns, so an editor backend burns
        # no CPU between keystrokes
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin and threads > 1 else "0")
        options.add_session_config_entry("session.force_spinning_stop", "1")
        options.log_severity_level = 3  # errors only: onnxruntime's warnings are not ours to show
        return ort.InferenceSession(self._model_bytes, options, providers=self.providers)

    def _pick_session(self) -> ort.InferenceSession:
        """All cores on an idle machine; one thread while other processes keep it busy."""
        if self._load is None or not self._load.busy():
            return self.session
        if self._single is None:
            log.info("onnx runtime: the CPU is busy (%.0f%% used by other processes): one thread until it is not",
                     100 * self._load.share)
            self._single = self._new_session(1, False)
        return self._single

    def describe(self) -> dict:
        cpu = this_cpu()
        return {"runtime": self.name, "device": self.device, "provider": self.session.get_providers()[0],
                "onnxruntime": ort.__version__, "linear": self.linear_kind, "linear_reason": self.precision_reason,
                "kv_dtype": self.kv_dtype, "threads": self.threads,
                "threads_reason": "as asked" if self._threads_asked else f"one per physical core of {cpu.model}",
                "cpu_simd": cpu.describe()["simd"], "spin": self.spin,
                "threads_when_busy": 1 if self.adaptive else self.threads,
                "empty_context_guard": self.empty_context_guard}

    def _run(self, tokens: np.ndarray, positions: np.ndarray, ctx: ContextKV, m: int,
             branch_k: np.ndarray, branch_v: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """One graph call for tokens (N, T). branch_k/v (L, J, N, G, D). Returns logits (N, V)
        and the new k, v per layer, interleaved: [k0, v0, k1, v1, ...], each (T, N, G, D)."""
        feeds = {"embeddings": self.embed(tokens), "positions": positions}
        stand_in = self.empty_context_guard and m == 0
        if self.empty_context_guard:
            feeds["ctx_bias"] = self._ctx_bias_empty if stand_in else self._ctx_bias_zeros[:m]
        for i in range(self.config.n_layers):
            feeds[f"ctx_k.{i}"] = self._stand_in_row if stand_in else ctx.k[i, :m]
            feeds[f"ctx_v.{i}"] = self._stand_in_row if stand_in else ctx.v[i, :m]
            feeds[f"branch_k.{i}"] = branch_k[i]
            feeds[f"branch_v.{i}"] = branch_v[i]
        out = self._active.run(self._output_names, feeds)
        return out[0], out[1:]

    def new_context_kv(self) -> ContextKV:
        c = self.config
        shape = (c.n_layers, c.max_seq_len, *self._kv_shape)
        return ContextKV(lazily_resident(shape, self._np_kv), lazily_resident(shape, self._np_kv))

    def prefill(self, tokens, previous=None, *, capacity_tokens=None):  # its cache always holds max_seq_len
        tokens = self.check_prefill(tokens)
        self._active = self._pick_session()  # for this prefill and the decode steps after it
        keep = self.reuse_split(tokens, previous)
        if keep and isinstance(previous.kv, ContextKV) and previous.kv.capacity >= len(tokens):
            kv = previous.kv  # consumed: its tokens after `keep` are overwritten
        else:
            keep = 0
            kv = self.new_context_kv()
        c = self.config
        no_branch = np.zeros((c.n_layers, 0, 1, *self._kv_shape), self._np_kv)
        ids = np.asarray(tokens, dtype=np.int64)
        start = keep
        while start < len(tokens):
            end = min(len(tokens), start + self.prefill_chunk_tokens)
            logits, new_kv = self._run(ids[None, start:end], np.arange(start, end, dtype=np.int64), kv, start,
                                       no_branch, no_branch)
            for i in range(c.n_layers):
                kv.k[i, start:end] = new_kv[2 * i][:, 0]
                kv.v[i, start:end] = new_kv[2 * i + 1][:, 0]
            start = end
        state = ContextState(tokens, kv, reused_tokens=keep, new_tokens=len(tokens) - keep)
        return state, logits[0]

    def _empty_branches(self, n: int, max_new_tokens: int, step: int = 0) -> BranchState:
        shape = (self.config.n_layers, max_new_tokens, n, *self._kv_shape)
        return BranchState(n=n, max_new_tokens=max_new_tokens, step=step,
                           kv=BranchKV(np.empty(shape, self._np_kv), np.empty(shape, self._np_kv)))

    def start_branches(self, context, n, max_new_tokens):
        return self._empty_branches(n, max_new_tokens)

    def decode(self, context, branches, next_tokens):
        self.check_decode(context, branches, next_tokens)
        m, step = len(context.tokens), branches.step
        bkv: BranchKV = branches.kv
        ids = np.asarray(next_tokens, dtype=np.int64)[:, None]
        logits, new_kv = self._run(ids, np.array([m + step], dtype=np.int64), context.kv, m,
                                   bkv.k[:, :step], bkv.v[:, :step])
        for i in range(self.config.n_layers):
            bkv.k[i, step] = new_kv[2 * i][0]
            bkv.v[i, step] = new_kv[2 * i + 1][0]
        branches.step += 1
        return logits

    reuses_branches = True

    def context_prefix(self, context, n):
        if not isinstance(context.kv, ContextKV) or not 0 < n <= len(context.tokens):
            return None
        return ContextState(list(context.tokens[:n]), context.kv)  # a step reads its first n positions

    def adopt(self, context, branches, row, tokens, start=0):
        m, k = len(context.tokens), len(tokens)
        ctx, bkv = context.kv, branches.kv
        if not isinstance(ctx, ContextKV) or not 0 < k <= branches.step - start or m + k > ctx.capacity:
            return None
        ctx.k[:, m:m + k] = bkv.k[:, start:start + k, row]  # (L, k, G, D) both, token-major
        ctx.v[:, m:m + k] = bkv.v[:, start:start + k, row]
        return ContextState(list(context.tokens) + [int(t) for t in tokens], ctx, reused_tokens=m, adopted_tokens=k)

    def branch_from(self, context, branches, rows, start, steps, max_new_tokens):
        if steps > branches.step - start or steps > max_new_tokens:
            return None
        idx = np.asarray(list(rows), dtype=np.int64)
        bkv: BranchKV = branches.kv
        out = self._empty_branches(len(idx), max_new_tokens, steps)
        out.kv.k[:, :steps] = bkv.k[:, start:start + steps][:, :, idx]
        out.kv.v[:, :steps] = bkv.v[:, start:start + steps][:, :, idx]
        return out

    def select_branches(self, branches, keep):
        idx = np.asarray(list(keep), dtype=np.int64)
        bkv: BranchKV = branches.kv
        step = branches.step
        out = self._empty_branches(len(idx), branches.max_new_tokens, step)
        out.kv.k[:, :step] = bkv.k[:, :step, idx]  # only the filled steps: rows may repeat
        out.kv.v[:, :step] = bkv.v[:, :step, idx]
        return out
