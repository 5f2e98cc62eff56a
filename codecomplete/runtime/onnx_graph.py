"""Build the ONNX graph of a model from its config and numpy weights (no torch, no files).

One graph serves both prefill and the bifurcated N-branch decode step:

    embeddings (N, T, dim) float  the N branches' T new tokens, embedded (EmbeddingTable)
    positions (T,) int64          absolute positions of the T new tokens
    ctx_k.i, ctx_v.i (M, G, D)    the shared context KV of layer i, no batch dimension
    branch_k.i, branch_v.i (J, N, G, D)   each branch's own earlier tokens (J may be 0)
 -> logits (N, V)                 for the last new token of each branch
    new_k.i, new_v.i (T, N, G, D) this call's keys/values, to append to the caches

Prefill is N = 1 with J = 0 (the prompt's past is the context part), a decode step is
T = 1 with J = the step. Every new token attends to all M context keys, to its branch's
J earlier keys and causally to the new keys; one softmax runs over both parts.

The caches are token-major, (M, G, D), so that `cache[:m]` is a contiguous view that
onnxruntime reads in place; com.microsoft FusedMatMul's transBatchB reads it as
(G, M, D) without a copy. They may be float16 (half the bytes to read per step);
attention itself runs in float32. Shapes in comments: N branches, T new tokens (Tq
queries, T or 1 in the last layer), H query heads, G kv heads, P = H // G, D head dim,
M context tokens, J branch tokens, JT = J + T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from codecomplete.models.format.config import ModelConfig
from codecomplete.models.format.folder import (
    EMBED_PROJ,
    INT8_BLOCK,
    Q4_BLOCK,
    Q4_SUFFIX,
    SCALE_SUFFIX,
    Q4Weight,
    blockwise_to_per_channel,
    int8_dequantized,
    quantize_int8,
    quantize_rows_int8,
    quantize_rows_q4,
    split_int8,
    split_q4,
)

OPSET = 17
MS_DOMAIN = "com.microsoft"
INT64_MAX = np.iinfo(np.int64).max

# How a linear layer runs:
#   fp32        MatMul with dequantized weights
#   int8        DynamicQuantizeLinear (per-tensor uint8) + MatMulInteger with uint8
#               weights (int8 + 128, zero point 128) + scale multiply, which onnxruntime
#               fuses into one com.microsoft DynamicQuantizeMatMul: exact weights, and no
#               int16 saturation (uint8 x int8 saturates on AVX2 machines without VNNI)
#   int8-s8     the same with int8 weights: faster kernels where it saturates; top-1
#               agreement 0.90 on the shipped model on such a CPU (kept for measurement)
#   int8-nbits  com.microsoft MatMulNBits, 8 bits, int8 activations per block of 32:
#               the most accurate int8, but 2x slower prefill here. The one kind that runs
#               weights stored int8 blockwise (a 2-D scale: GGUF Q8_0/Q5_0 as they are)
#               exactly; the other int8 kinds re-round them to a scale per output channel
#   int8-w7     int8-s8 with the weights rounded to 7 bits (-64..63, twice the scale):
#               a uint8 x int7 pair sum fits int16, so the fast kernels are exact on
#               every CPU. The CPU default. Top-1 agreement with fp32 0.964 (int8: 0.974)
#               on the shipped model (`codecomplete bench runtime --agreement 1500`)
#   int4        com.microsoft MatMulNBits, 4 bits per weight in blocks of 32 with a float
#               scale and a 4-bit zero point each (accuracy_level 4: int8 activations per
#               block): half the weight bytes of int8 per decode step. The kind of a 4-bit
#               GGUF's 4-bit tensors; with it every other weight is made 4-bit too
# Weights stored 4-bit (folder.Q4Weight) run as int4 whatever the kind, except fp32.
LINEAR_KINDS = ("fp32", "int8", "int8-s8", "int8-nbits", "int8-w7", "int4")

# onnxruntime 1.19 to 1.31 (CPU) die with SIGFPE when com.microsoft FusedMatMul with
# transBatchB gets a B whose leading (batch-major) dimension is 0: our context scores on a
# cold prefill, whose context is empty. Seen with 1.19.2, 1.20.1, 1.30.0 and 1.31.1 on an
# AVX2 EPYC and with 1.30.0 on a Sapphire Rapids Xeon; 1.32.0 is fixed. On those versions
# the graph takes a ctx_bias input and a cold prefill passes one zero stand-in row with
# bias -inf (its softmax weight is exactly 0), so no call has an empty context.
EMPTY_CONTEXT_BUG = ((1, 19), (1, 32))  # [first, fixed)


def has_empty_context_bug(version: str) -> bool:
    """Whether this onnxruntime version dies on an empty FusedMatMul batch (see above)."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return EMPTY_CONTEXT_BUG[0] <= major_minor < EMPTY_CONTEXT_BUG[1]
NBITS_BLOCK = INT8_BLOCK  # one block size, so that a blockwise int8 weight's scales are MatMulNBits' own


@dataclass
class LinearWeight:
    """A linear layer's weight: float (out, in), int8 (out, in) with scale (out,) or, int8
    blockwise, scale (out, in / INT8_BLOCK), or 4-bit blockwise (q4, w None)."""

    w: np.ndarray | None
    scale: np.ndarray | None = None
    q4: Q4Weight | None = None

    @property
    def out_features(self) -> int:
        return self.q4.shape[0] if self.q4 is not None else self.w.shape[0]

    @property
    def storage(self) -> str:
        if self.q4 is not None:
            return "int4"
        if self.scale is None:
            return "float"
        return "int8-blockwise" if self.blockwise else "int8"

    @property
    def blockwise(self) -> bool:
        """int8 with a scale per block of INT8_BLOCK weights along each row."""
        return self.scale is not None and self.scale.ndim == 2

    def rows(self, start: int, end: int) -> LinearWeight:
        """Output rows start..end of this weight (views, no copy)."""
        if self.q4 is not None:
            q = self.q4
            return LinearWeight(None, q4=Q4Weight(q.packed[start:end], q.scales[start:end], q.zeros[start:end]))
        return LinearWeight(self.w[start:end], None if self.scale is None else self.scale[start:end])

    @property
    def in_features(self) -> int:
        return self.q4.shape[1] if self.q4 is not None else self.w.shape[1]

    def dequantized(self) -> np.ndarray:
        if self.q4 is not None:
            return self.q4.dequantized()
        if self.scale is None:
            return np.asarray(self.w, np.float32)
        return int8_dequantized(self.w, self.scale)


def stack_rows(parts: list[LinearWeight]) -> LinearWeight:
    """One linear layer from several with the same input and storage (fused q/k/v or
    gate/up); float when the storages differ (GraphBuilder.linear_stack keeps them apart)."""
    if all(p.q4 is not None for p in parts):
        return LinearWeight(None, q4=Q4Weight(*(np.concatenate([getattr(p.q4, f) for p in parts])
                                                for f in ("packed", "scales", "zeros"))))
    if all(p.scale is not None and p.q4 is None for p in parts) and len({p.blockwise for p in parts}) == 1:
        return LinearWeight(np.concatenate([p.w for p in parts]), np.concatenate([p.scale for p in parts]))
    return LinearWeight(np.concatenate([p.dequantized() for p in parts]))


EMBEDDING = "tok_embeddings.weight"  # gathered by rows: never 4-bit in the graph


class EmbeddingTable:
    """The token embedding, looked up outside the graph, with the values the graph's rules
    give it (linear_weights): int8 rows with per-row scales, 4-bit blocks or float, views of
    the model folder's mapped file where it stores them so. In the graph, onnxruntime would
    hold its own copy of the whole table (136M weights for Qwen2.5-Coder-0.5B); here only
    the pages of rows looked up are read."""

    def __init__(self, weights: dict[str, np.ndarray], linear_kind: str):
        rest, q4 = split_q4({k: v for k, v in weights.items() if k.startswith(EMBEDDING)})
        tensors, scales = split_int8(rest)
        if EMBEDDING in q4:
            table = LinearWeight(None, q4=q4[EMBEDDING])
        elif EMBEDDING in tensors:
            table = LinearWeight(tensors[EMBEDDING], scales.get(EMBEDDING))
        else:
            raise ValueError(f"the weights have no {EMBEDDING}")
        quantized = any(k.endswith((SCALE_SUFFIX, Q4_SUFFIX)) for k in weights)
        if linear_kind != "fp32" and table.q4 is not None:  # a table of 4-bit rows: gathered as int8
            table = LinearWeight(*quantize_rows_int8(table.dequantized()))
        elif linear_kind != "fp32" and not quantized:  # a float model run int8: every weight int8
            table = LinearWeight(*quantize_rows_int8(table.w))
        self.table = table  # fp32 keeps the stored kind: a row's lookup is its dequantized value
        # a factorized table's rows (r wide) times B (r, dim), here beside the lookup: small, float
        self.proj = None
        if EMBED_PROJ in weights or EMBED_PROJ + Q4_SUFFIX in weights:
            rest_p, q4_p = split_q4({k: v for k, v in weights.items() if k.startswith(EMBED_PROJ)})
            tensors_p, scales_p = split_int8(rest_p)
            proj = (LinearWeight(None, q4=q4_p[EMBED_PROJ]) if EMBED_PROJ in q4_p
                    else LinearWeight(tensors_p[EMBED_PROJ], scales_p.get(EMBED_PROJ)))
            self.proj = np.ascontiguousarray(proj.dequantized(), dtype=np.float32)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """float32 (*ids.shape, dim) rows for token ids."""
        t = self.table
        if t.q4 is not None:
            flat = ids.reshape(-1)
            rows = Q4Weight(t.q4.packed[flat], t.q4.scales[flat], t.q4.zeros[flat]).dequantized()
            rows = rows.reshape(*ids.shape, -1)
        else:
            rows = t.w[ids].astype(np.float32) if t.scale is None else int8_dequantized(t.w[ids], t.scale[ids])
        return rows if self.proj is None else rows @ self.proj


def linear_weights(weights: dict[str, np.ndarray], int8: bool, int4: bool = False
                   ) -> dict[str, LinearWeight | np.ndarray]:
    """Our weight names -> LinearWeight for 2-D tensors, float32 arrays for the rest.
    int8: int8 and 4-bit weights kept as they are, float ones quantized to int8 now when
    the model has no int8 weights at all; not int8: everything dequantized to float.
    int4: every 2-D weight but the embedding table made 4-bit (int8 for that one)."""
    rest, q4 = split_q4(weights)
    tensors, scales = split_int8(rest)
    if (int8 or int4) and not scales and not q4:
        tensors, scales = split_int8(quantize_int8(rest))
    out: dict[str, LinearWeight | np.ndarray] = {}
    for name, q in q4.items():
        out[name] = LinearWeight(None, q4=q) if int8 or int4 else LinearWeight(q.dequantized())
    for name, w in tensors.items():
        if w.ndim == 2:
            lw = LinearWeight(w, scales.get(name))
            out[name] = lw if int8 or int4 or lw.scale is None else LinearWeight(lw.dequantized())
        else:
            out[name] = np.asarray(w, np.float32)
    if int4:
        for name, lw in out.items():
            if isinstance(lw, LinearWeight) and lw.q4 is None and name not in (EMBEDDING, EMBED_PROJ) \
                    and lw.w.shape[1] % Q4_BLOCK == 0:
                out[name] = LinearWeight(None, q4=quantize_rows_q4(lw.dequantized()))
    emb = out.get(EMBEDDING)
    if isinstance(emb, LinearWeight) and emb.q4 is not None:  # a table of 4-bit rows: gathered as int8
        out[EMBEDDING] = linear_weights({EMBEDDING: emb.dequantized()}, int8=True)[EMBEDDING]
    return out


def halve_to_7_bits(w: np.ndarray, chunk_rows: int = 4096) -> np.ndarray:
    """int8 weights (out, in) halved and rounded half to even (np.rint(w / 2)), clipped to
    -64..63, and transposed to (in, out): in int16 a chunk of rows at a time, so that a
    vocabulary-sized head costs one int8 copy, not float32 ones."""
    out = np.empty(w.shape[::-1], np.int8)
    for start in range(0, w.shape[0], chunk_rows):
        x = w[start:start + chunk_rows].astype(np.int16)
        half = x >> 1  # floor(x / 2); an odd x lies between half and half + 1: take the even one
        half += (x & 1) & (half & 1)
        out[:, start:start + chunk_rows] = np.clip(half, -64, 63).T
    return out


def pack_q4_zeros(zeros: np.ndarray) -> np.ndarray:
    """Zero points (N, n_blocks) 0..15 as MatMulNBits wants them: two a byte (low nibble
    first), each row padded to whole bytes, flattened."""
    rows, n_blocks = zeros.shape
    padded = np.full((rows, n_blocks + n_blocks % 2), 8, np.uint8)
    padded[:, :n_blocks] = zeros
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)


# onnxruntime copies each external weight into its own memory and frees the copy once it
# has packed it: a linear layer bigger than this is built as pieces of output rows, so that
# the copy in flight is one piece, not a vocabulary-sized head (Qwen2.5-Coder-0.5B's: 136M)
LINEAR_PIECE_MAX_WEIGHTS = 32 << 20
EXTERNAL_MIN_BYTES = 1 << 16  # tensors this big travel beside the protobuf when asked (every weight matrix)


class GraphBuilder:
    """Collects nodes and initializers with unique names; small helpers for common ops."""

    def __init__(self, linear_kind: str, external: dict[str, np.ndarray] | None = None):
        if linear_kind not in LINEAR_KINDS:
            raise ValueError(f"unknown linear kind {linear_kind!r}; choose one of {', '.join(LINEAR_KINDS)}")
        self.linear_kind = linear_kind
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.external = external  # name -> array for tensors kept out of the protobuf

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           **attrs) -> str | list[str]:
        outs = [self._fresh(name or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self._fresh(f"n_{outs[0]}"),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, array: np.ndarray, name: str) -> str:
        name = self._fresh(name)
        array = np.ascontiguousarray(array)
        if self.external is not None and array.nbytes >= EXTERNAL_MIN_BYTES:
            self.initializers.append(external_tensor(name, array))
            self.external[name] = array
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant, shared by value."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(arr, "c")
        return self._consts[key]

    def shape(self, *dims) -> str:
        """A 1-D int64 shape from ints and 1-element int64 tensor names (built once per dims)."""
        key = ("shape", *dims)
        if key not in self._consts:
            parts = [self.const([d]) if isinstance(d, int) else d for d in dims]
            self._consts[key] = self.op("Concat", parts, axis=0, name="shape")
        return self._consts[key]

    def reshape(self, x: str, *dims) -> str:
        """Static dims may use 0 (copy) and -1; with any dynamic dim (a tensor name), all
        dims are taken literally, so a dynamic size of 0 stays 0 (allowzero)."""
        if all(isinstance(d, int) for d in dims):
            return self.op("Reshape", [x, self.const(list(dims))])
        if any(isinstance(d, int) and d <= 0 for d in dims):
            raise ValueError("a reshape with dynamic dims takes them all literally")
        return self.op("Reshape", [x, self.shape(*dims)], allowzero=1)

    def transpose(self, x: str, perm: list[int]) -> str:
        return self.op("Transpose", [x], perm=perm)

    def slice(self, x: str, start, end, axis: int) -> str:
        """x[start:end] along axis; start/end are ints or 1-element int64 tensor names."""
        s = self.const([start]) if isinstance(start, int) else start
        e = self.const([end]) if isinstance(end, int) else end
        return self.op("Slice", [x, s, e, self.const([axis])])

    def linear_stack(self, x: str, parts: list[LinearWeight], bias: np.ndarray | None, name: str) -> str:
        """x (..., in) -> (..., sum of outs): several linear layers with the same input as
        one where their storage is the same, else one per run of equal storage, concatenated
        (a Q4_K_M file mixes 4-bit, int8 and float weights within a layer)."""
        runs: list[list[LinearWeight]] = []
        for p in parts:
            if runs and runs[-1][0].storage == p.storage:
                runs[-1].append(p)
            else:
                runs.append([p])
        if len(runs) == 1:
            return self.linear(x, stack_rows(parts), bias, name)
        y = self.op("Concat", [self.linear(x, stack_rows(run), None, f"{name}.part{i}") for i, run in enumerate(runs)],
                    axis=-1, name=name)
        if bias is not None:
            y = self.op("Add", [y, self.init(np.asarray(bias, np.float32), name + ".bias")])
        return y

    def linear(self, x: str, weight: LinearWeight, bias: np.ndarray | None, name: str) -> str:
        """x (..., in) -> (..., out) with the builder's linear kind (4-bit weights: int4);
        over LINEAR_PIECE_MAX_WEIGHTS, as pieces of output rows concatenated."""
        piece_rows = max(1, LINEAR_PIECE_MAX_WEIGHTS // weight.in_features)
        if weight.out_features > piece_rows:
            starts = range(0, weight.out_features, piece_rows)
            pieces = [self.linear(x, weight.rows(a, a + piece_rows), None if bias is None else bias[a:a + piece_rows],
                                  f"{name}.rows{a}") for a in starts]
            return self.op("Concat", pieces, axis=-1, name=name)
        kind = self.linear_kind if weight.scale is not None else "fp32"
        if weight.q4 is not None:
            kind = "fp32" if self.linear_kind == "fp32" else "int4"
        elif kind == "int4":  # an int8 weight kept so (the embedding table as the head): the exact int8 kernels
            kind = "int8"
        if weight.blockwise and kind not in ("fp32", "int8-nbits"):  # only MatMulNBits takes a scale per block
            weight = LinearWeight(*blockwise_to_per_channel(weight.w, weight.scale))
        if kind == "int4":
            q4 = weight.q4
            n, n_blocks = q4.scales.shape
            y = self.op("MatMulNBits", [x, self.init(q4.packed, name + ".q4"),
                                        self.init(q4.scales.reshape(-1).astype(np.float32), name + ".q4_scales"),
                                        self.init(pack_q4_zeros(q4.zeros), name + ".q4_zeros")],
                        domain=MS_DOMAIN, name=name, K=n_blocks * Q4_BLOCK, N=n, bits=4, block_size=Q4_BLOCK,
                        accuracy_level=4)
        elif kind == "fp32":
            y = self.op("MatMul", [x, self.init(weight.dequantized().T, name + ".weight")], name=name)
        elif kind in ("int8", "int8-s8", "int8-w7"):
            w_scale = weight.scale
            if kind == "int8-w7":  # 7-bit weights (-64..63): uint8 x int8 pair sums stay within int16 on AVX2
                wt, w_scale = halve_to_7_bits(weight.w), weight.scale * 2  # (in, out)
            else:
                wt = np.ascontiguousarray(weight.w.T)  # (in, out)
            xq, xs, xz = self.op("DynamicQuantizeLinear", [x], n_out=3, name=name + ".xq")
            if kind == "int8":
                w_u8 = wt.view(np.uint8) ^ np.uint8(0x80)  # int8 + 128 as uint8
                yi = self.op("MatMulInteger", [xq, self.init(w_u8, name + ".weight_u8"), xz,
                                               self.const(128, np.uint8)], name=name + ".i32")
            else:
                yi = self.op("MatMulInteger", [xq, self.init(wt, name + ".weight_s8"), xz], name=name + ".i32")
            yf = self.op("Cast", [yi], to=TensorProto.FLOAT)
            scale = self.op("Mul", [xs, self.init(w_scale.astype(np.float32), name + ".scale")])
            y = self.op("Mul", [yf, scale], name=name)
        else:  # int8-nbits: uint8 codes int8 + 128 and MatMulNBits' default zero point, 128
            k = weight.w.shape[1]
            block = NBITS_BLOCK
            n_blocks = (k + block - 1) // block
            q = np.full((weight.out_features, n_blocks * block), 128, np.uint8)
            q[:, :k] = weight.w.view(np.uint8) ^ np.uint8(0x80)
            if weight.blockwise:
                scales = np.ascontiguousarray(weight.scale, dtype=np.float32).reshape(-1)
            else:
                scales = np.repeat(weight.scale.astype(np.float32), n_blocks)
            y = self.op("MatMulNBits", [x, self.init(q.reshape(weight.out_features, n_blocks, block), name + ".nbits"),
                                        self.init(scales, name + ".nbits_scale")], domain=MS_DOMAIN, name=name,
                        K=k, N=weight.out_features, bits=8, block_size=block, accuracy_level=4)
        if bias is not None:
            y = self.op("Add", [y, self.init(np.asarray(bias, np.float32), name + ".bias")])
        return y

    def rms_norm(self, x: str, weight: np.ndarray, eps: float, name: str) -> str:
        # onnxruntime registers SimplifiedLayerNormalization (RMSNorm) in the ONNX domain
        return self.op("SimplifiedLayerNormalization", [x, self.init(weight, name + ".weight")],
                       axis=-1, epsilon=eps, stash_type=1, name=name)

    def norm(self, x: str, cfg: ModelConfig, weights: dict, name: str) -> str:
        """The architecture's norm of x over its last axis (ModelConfig.norm_kind)."""
        if cfg.norm_kind == "layer":
            return self.op("LayerNormalization", [x, self.init(weights[name + ".weight"], name + ".weight"),
                                                  self.init(weights[name + ".bias"], name + ".bias")],
                           axis=-1, epsilon=cfg.norm_eps, stash_type=1, name=name)
        return self.rms_norm(x, weights[name + ".weight"], cfg.norm_eps, name)

    def activation(self, x: str, kind: str) -> str:
        """The MLP's activation (ModelConfig.activation): com.microsoft FastGelu is the tanh
        approximation and Gelu the exact one (ONNX's own Gelu needs opset 20)."""
        if kind == "silu":
            return self.op("Mul", [x, self.op("Sigmoid", [x])])
        if kind == "gelu_tanh":
            return self.op("FastGelu", [x], domain=MS_DOMAIN)
        if kind == "gelu":
            return self.op("Gelu", [x], domain=MS_DOMAIN)
        raise ValueError(f"unknown activation {kind!r}")

    def model(self, inputs, outputs, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 8
        return model


def rope_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq_len, D/2) float32, computed as models/model.py computes them."""
    half = cfg.head_dim // 2
    exponent = np.arange(0, half, dtype=np.float32) / np.float32(half)
    inv_freq = (np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)
    if cfg.rope_linear_factor != 1.0:
        inv_freq = (inv_freq / np.float32(cfg.rope_linear_factor)).astype(np.float32)
    angles = np.arange(cfg.max_seq_len, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclass
class Dims:
    """Dynamic sizes as 1-element int64 tensors: branches, context tokens, branch tokens
    with the new ones, branches * kv heads, and the query tokens (T, or 1 in the last layer)."""

    n: str
    m: str
    jt: str
    ng: str
    tq: str


def attention(b: GraphBuilder, cfg: ModelConfig, q: str, ctx_k: str, ctx_v: str, br_k: str, br_v: str,
              mask: str | None, dims: Dims, ctx_bias: str | None = None, ctx_mask: str | None = None) -> str:
    """q (N, Tq, H, D); ctx (M, G, D); branch keys (JT, N, G, D) -> (N, Tq, H*D). mask
    (Tq, 1, JT) and ctx_mask (Tq, 1, M) are added to the branch and context scores."""
    g, hd = cfg.n_kv_heads, cfg.head_dim
    p = cfg.n_heads // g
    scale = cfg.attention_scale or 1.0 / math.sqrt(hd)
    n, m, jt, ng, tq = dims.n, dims.m, dims.jt, dims.ng, dims.tq
    rows = b.op("Mul", [b.op("Mul", [n, tq]), b.const([p])])  # N * Tq * P
    q5 = b.reshape(q, 0, 0, g, p, hd)  # (N, Tq, G, P, D)
    # the shared context: all N * Tq * P queries of a kv head against its M keys at once
    qc = b.reshape(b.transpose(q5, [2, 0, 1, 3, 4]), g, -1, hd)  # (G, N*Tq*P, D)
    s_ctx = b.op("FusedMatMul", [qc, ctx_k], domain=MS_DOMAIN, transB=1, transBatchB=1, alpha=scale)
    s_ctx = b.reshape(s_ctx, g, n, tq, p, m)  # (G, N, Tq, P, M)
    if ctx_bias is not None:  # 0 for real context rows, -inf for the stand-in row (EMPTY_CONTEXT_BUG)
        s_ctx = b.op("Add", [s_ctx, ctx_bias])
    if ctx_mask is not None:  # the sliding window
        s_ctx = b.op("Add", [s_ctx, ctx_mask])
    # each branch's own keys
    qb = b.reshape(b.transpose(q5, [0, 2, 1, 3, 4]), ng, b.op("Mul", [tq, b.const([p])]), hd)  # (N*G, Tq*P, D)
    kb = b.reshape(br_k, 0, -1, hd)  # (JT, N*G, D)
    s_br = b.op("FusedMatMul", [qb, kb], domain=MS_DOMAIN, transB=1, transBatchB=1, alpha=scale)
    s_br = b.transpose(b.reshape(s_br, n, g, tq, p, jt), [1, 0, 2, 3, 4])  # (G, N, Tq, P, JT)
    if mask is not None:
        s_br = b.op("Add", [s_br, mask])
    w = b.op("Softmax", [b.op("Concat", [s_ctx, s_br], axis=-1)], axis=-1)  # one softmax over both
    w_ctx = b.reshape(b.slice(w, 0, m, axis=-1), g, rows, m)  # (G, N*Tq*P, M)
    o_ctx = b.op("FusedMatMul", [w_ctx, ctx_v], domain=MS_DOMAIN, transBatchB=1)  # (G, N*Tq*P, D)
    o_ctx = b.transpose(b.reshape(o_ctx, g, n, tq, p, hd), [1, 2, 0, 3, 4])  # (N, Tq, G, P, D)
    w_br = b.transpose(b.slice(w, m, INT64_MAX, axis=-1), [1, 0, 2, 3, 4])  # (N, G, Tq, P, JT)
    w_br = b.reshape(w_br, ng, b.op("Mul", [tq, b.const([p])]), jt)
    vb = b.reshape(br_v, 0, -1, hd)  # (JT, N*G, D)
    o_br = b.op("FusedMatMul", [w_br, vb], domain=MS_DOMAIN, transBatchB=1)  # (N*G, Tq*P, D)
    o_br = b.transpose(b.reshape(o_br, n, g, tq, p, hd), [0, 2, 1, 3, 4])  # (N, Tq, G, P, D)
    return b.reshape(b.op("Add", [o_ctx, o_br]), 0, 0, cfg.n_heads * hd)


def _scalar(b: GraphBuilder, x: str) -> str:
    return b.op("Squeeze", [x, b.const([0])])


def _as_mask(b: GraphBuilder, hidden: str) -> str:
    """(T, K) bool -> (T, 1, K) float: -inf where hidden, else 0."""
    mask = b.op("Where", [hidden, b.const(-np.inf, np.float32), b.const(0.0, np.float32)])
    return b.op("Unsqueeze", [mask, b.const([1])])


def causal_mask(b: GraphBuilder, t: str, j: str, jt: str, window: int = 0) -> str:
    """(T, 1, JT) float: 0 where key k <= J + t (earlier branch tokens and itself), -inf
    after; with a sliding window also -inf where J + t - k >= window (the branch's tokens
    are consecutive positions, so index differences are position differences)."""
    zero, one = _scalar(b, b.const(0)), _scalar(b, b.const(1))
    keys = b.op("Range", [zero, _scalar(b, jt), one])  # (JT,)
    last_visible = b.op("Unsqueeze", [b.op("Add", [b.op("Range", [zero, _scalar(b, t), one]), _scalar(b, j)]),
                                      b.const([1])])  # (T, 1)
    hidden = b.op("Greater", [keys, last_visible])  # (T, JT)
    if window:
        too_old = b.op("Greater", [b.op("Sub", [last_visible, keys]), b.const(window - 1)])
        hidden = b.op("Or", [hidden, too_old])
    return _as_mask(b, hidden)


def context_window_mask(b: GraphBuilder, positions: str, m: str, window: int) -> str:
    """(T, 1, M) float: -inf for the context keys (positions 0..M-1) that lie `window` or more
    positions before the query at `positions` (T,), else 0."""
    keys = b.op("Range", [_scalar(b, b.const(0)), _scalar(b, m), _scalar(b, b.const(1))])  # (M,)
    age = b.op("Sub", [b.op("Unsqueeze", [positions, b.const([1])]), keys])  # (T, M)
    return _as_mask(b, b.op("Greater", [age, b.const(window - 1)]))


KV_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


def external_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer that names its data but does not hold it: onnxruntime takes the data
    from SessionOptions.add_external_initializers. Keeps a protobuf under its 2 GiB limit
    (a 0.5B-parameter model in float32 is 2.0 GB) and the weights out of a serialised copy."""
    t = helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
    tensor = onnx.TensorProto(name=name, data_type=t.type.tensor_type.elem_type, dims=list(array.shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"memory:{name}"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def build_model(cfg: ModelConfig, weights: dict[str, np.ndarray], linear_kind: str = "int8",
                kv_dtype: str = "float32", external: dict[str, np.ndarray] | None = None,
                ctx_bias: bool = False) -> onnx.ModelProto:
    """The prefill/decode graph of a model (see the module docstring for its inputs).
    kv_dtype float16 stores the caches in half the bytes; attention still runs in float32.
    external: a dict to receive the tensors of EXTERNAL_MIN_BYTES or more, which the graph
    then only names (see external_tensor); None keeps everything inside the protobuf. ctx_bias adds an input `ctx_bias` (M,) float
    added to the context scores, so that a cold prefill can pass one masked stand-in row
    instead of an empty context (EMPTY_CONTEXT_BUG)."""
    b = GraphBuilder(linear_kind, external)
    lw = linear_weights(weights, int8=linear_kind != "fp32", int4=linear_kind == "int4")
    g, hd, h = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    f32, kv_type = TensorProto.FLOAT, KV_DTYPES[kv_dtype]
    inputs = [helper.make_tensor_value_info("embeddings", f32, ["N", "T", cfg.dim]),
              helper.make_tensor_value_info("positions", TensorProto.INT64, ["T"])]
    outputs = [helper.make_tensor_value_info("logits", f32, ["N", cfg.vocab_size])]
    for i in range(cfg.n_layers):
        inputs += [helper.make_tensor_value_info(f"ctx_k.{i}", kv_type, ["M", g, hd]),
                   helper.make_tensor_value_info(f"ctx_v.{i}", kv_type, ["M", g, hd])]
    if ctx_bias:
        inputs.append(helper.make_tensor_value_info("ctx_bias", f32, ["M"]))
    for i in range(cfg.n_layers):
        inputs += [helper.make_tensor_value_info(f"branch_k.{i}", kv_type, ["J", "N", g, hd]),
                   helper.make_tensor_value_info(f"branch_v.{i}", kv_type, ["J", "N", g, hd])]
    for i in range(cfg.n_layers):
        outputs += [helper.make_tensor_value_info(f"new_k.{i}", kv_type, ["T", "N", g, hd]),
                    helper.make_tensor_value_info(f"new_v.{i}", kv_type, ["T", "N", g, hd])]
    as_f32 = (lambda x: x) if kv_type == f32 else (lambda x: b.op("Cast", [x], to=f32))  # noqa: E731

    def residual(y: str) -> str:
        """A block's attention or MLP output as added to the residual stream (Granite scales it)."""
        return y if cfg.residual_scale == 1.0 else b.op("Mul", [y, b.const(cfg.residual_scale, np.float32)])

    def kv_output(x: str, name: str) -> str:
        """x (N, T, G, D) as the graph output `name`, (T, N, G, D) in the cache dtype; the
        node that makes it names it (no Identity node between)."""
        if kv_type == f32:
            out = b.op("Transpose", [x], perm=[1, 0, 2, 3], name=name)
        else:
            out = b.op("Cast", [b.transpose(x, [1, 0, 2, 3])], to=kv_type, name=name)
        assert out == name, "graph output names must be free"
        return out

    n = b.op("Shape", ["embeddings"], start=0, end=1, name="N")
    t = b.op("Shape", ["embeddings"], start=1, end=2, name="T")
    m = b.op("Shape", ["ctx_k.0"], start=0, end=1, name="M")
    j = b.op("Shape", ["branch_k.0"], start=0, end=1, name="J")
    dims = Dims(n=n, m=m, jt=b.op("Add", [j, t], name="JT"), ng=b.op("Mul", [n, b.const([g])], name="NG"), tq=t)
    window = cfg.sliding_window
    mask = causal_mask(b, t, j, dims.jt, window)
    # the last layer computes only the last token, which sees every key unless a window hides some
    last_mask = b.slice(mask, -1, INT64_MAX, axis=0) if window else None
    ctx_mask = last_ctx_mask = None
    if window:
        ctx_mask = context_window_mask(b, "positions", m, window)
        last_ctx_mask = b.slice(ctx_mask, -1, INT64_MAX, axis=0)

    cos, sin = rope_tables(cfg)
    rope_cos, rope_sin = b.init(cos, "rope.cos"), b.init(sin, "rope.sin")
    position_ids = b.op("Expand", [b.op("Unsqueeze", ["positions", b.const([0])]), b.shape(n, t)])  # (N, T)

    x = "embeddings"  # (N, T, dim): gathered outside the graph (EmbeddingTable)
    if cfg.embedding_scale != 1.0:  # Gemma's sqrt(dim)
        x = b.op("Mul", [x, b.const(cfg.embedding_scale, np.float32)], name="embed_scale")

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        last = i == cfg.n_layers - 1
        xn = b.norm(x, cfg, lw, p + "attention_norm")
        qkv_w = [lw[p + "attention.wq.weight"], lw[p + "attention.wk.weight"], lw[p + "attention.wv.weight"]]
        qkv_b = None
        if cfg.qkv_bias:
            qkv_b = np.concatenate([lw[p + "attention.wq.bias"], lw[p + "attention.wk.bias"], lw[p + "attention.wv.bias"]])
        qkv = b.reshape(b.linear_stack(xn, qkv_w, qkv_b, p + "attention.wqkv"), 0, 0, h + 2 * g, hd)  # (N, T, H+2G, D)
        qk = b.reshape(b.slice(qkv, 0, h + g, axis=2), 0, 0, (h + g) * hd)  # (N, T, (H+G)*D)
        qk = b.op("RotaryEmbedding", [qk, position_ids, rope_cos, rope_sin], domain=MS_DOMAIN,
                  interleaved=0, num_heads=h + g)  # half-split layout, as models/model.py
        qk = b.reshape(qk, 0, 0, h + g, hd)
        q = b.slice(qk, 0, h, axis=2)  # (N, T, H, D)
        k = kv_output(b.slice(qk, h, h + g, axis=2), f"new_k.{i}")  # (T, N, G, D)
        v = kv_output(b.slice(qkv, h + g, h + 2 * g, axis=2), f"new_v.{i}")
        # the new keys as stored (rounded to the cache dtype), so later steps see the same
        br_k = as_f32(b.op("Concat", [f"branch_k.{i}", k], axis=0))  # (JT, N, G, D)
        br_v = as_f32(b.op("Concat", [f"branch_v.{i}", v], axis=0))
        if last:  # only the last token's output is needed, and it sees every key
            q = b.slice(q, -1, INT64_MAX, axis=1)
            x = b.slice(x, -1, INT64_MAX, axis=1)
        layer_dims = replace(dims, tq=b.const([1])) if last else dims
        a = attention(b, cfg, q, as_f32(f"ctx_k.{i}"), as_f32(f"ctx_v.{i}"), br_k, br_v, last_mask if last else mask,
                      layer_dims, "ctx_bias" if ctx_bias else None, last_ctx_mask if last else ctx_mask)
        x = b.op("Add", [x, residual(b.linear(a, lw[p + "attention.wo.weight"], lw.get(p + "attention.wo.bias"),
                                              p + "attention.wo"))])
        xn = b.norm(x, cfg, lw, p + "ffn_norm")
        ffn_in = ["w1", "w3"] if cfg.mlp_gated else ["w3"]  # gate and up, or up alone
        ffn_bias = np.concatenate([lw[f"{p}feed_forward.{w}.bias"] for w in ffn_in]) if cfg.mlp_bias else None
        gate_up = b.linear_stack(xn, [lw[f"{p}feed_forward.{w}.weight"] for w in ffn_in], ffn_bias,
                                 p + "feed_forward.w13")
        if cfg.mlp_gated:
            gate = b.slice(gate_up, 0, cfg.ffn_dim, axis=-1)
            up = b.slice(gate_up, cfg.ffn_dim, INT64_MAX, axis=-1)
            act = b.op("Mul", [b.activation(gate, cfg.activation), up])
        else:
            act = b.activation(gate_up, cfg.activation)
        x = b.op("Add", [x, residual(b.linear(act, lw[p + "feed_forward.w2.weight"],
                                              lw.get(p + "feed_forward.w2.bias"), p + "feed_forward.w2"))])

    xn = b.norm(b.reshape(x, -1, cfg.dim), cfg, lw, "norm")  # (N, dim)
    if cfg.embed_rank:  # logits = h·Bᵀ·Aᵀ: two int8 products, (N, r) in between
        xn = b.linear(xn, lw[EMBED_PROJ], None, "head_proj")
    head = lw["tok_embeddings.weight"] if cfg.tie_embeddings else lw["output.weight"]
    logits = b.linear(xn, head, None, "output")
    if cfg.logits_divisor != 1.0:
        logits = b.op("Div", [logits, b.const(cfg.logits_divisor, np.float32)])
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    return b.model(inputs, outputs, f"codecomplete-{linear_kind}-kv-{kv_dtype}")
