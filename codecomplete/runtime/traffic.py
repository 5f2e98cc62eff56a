"""The memory-traffic floor of a decode step: the fewest bytes it must move (no torch here).

A decode step of a few rows is bandwidth-bound: every weight is read once whatever the
row count, each request's context K/V once (bifurcated) or once per row (plain, as if
each row held its own copy), each row's own branch K/V once, this step's K/V written
once per row, and the logits written out. Dividing by a measured copy bandwidth gives
the time no implementation can beat; benchmarks state their steps as multiples of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from codecomplete.models.format.config import ModelConfig

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}


def dtype_bytes(dtype) -> int:
    """Bytes per element of a precision name ("bf16", "fp32", ...) or a torch/numpy dtype."""
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {dtype!r} ({', '.join(DTYPE_BYTES)})")
        return DTYPE_BYTES[key]
    size = getattr(dtype, "itemsize", None)
    if not isinstance(size, int):
        raise ValueError(f"unknown dtype {dtype!r}")
    return size


def weight_bytes_read(config: ModelConfig, elem: int) -> int:
    """Weights one step reads: every layer, the final norm, the output projection (the tied
    embedding read whole for the logits; an untied input embedding only its few rows)."""
    c = config
    params = c.n_params()
    if not c.tie_embeddings:
        params -= c.vocab_size * c.dim  # the input table: only R of its rows are read
    return params * elem


def step_traffic_bytes(config: ModelConfig, dtype, contexts: Sequence[int], rows: int | Sequence[int],
                       bifurcated: bool = True, decoded: int | Sequence[int] = 0, logits_bytes: int = 4) -> int:
    """The fewest bytes one decode step moves for requests with these context lengths
    (tokens), `rows` rows each (one int for all, or one per request) and `decoded` tokens
    already in each row's branch cache. bifurcated: each context is read once; plain: once
    per row. logits_bytes: bytes per logit written (float32 out)."""
    contexts = [int(m) for m in contexts]
    per_rows = [int(rows)] * len(contexts) if isinstance(rows, int) else [int(r) for r in rows]
    per_dec = [int(decoded)] * len(contexts) if isinstance(decoded, int) else [int(d) for d in decoded]
    if not (len(per_rows) == len(contexts) == len(per_dec)):
        raise ValueError(f"{len(contexts)} contexts, {len(per_rows)} row counts, {len(per_dec)} decoded counts")
    if any(m < 0 for m in contexts) or any(r < 1 for r in per_rows) or any(d < 0 for d in per_dec):
        raise ValueError("context lengths and decoded counts must be >= 0, row counts >= 1")
    c = config
    elem = dtype_bytes(dtype)
    kv_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * elem  # one token's K and V, all layers
    total_rows = sum(per_rows)
    context_reads = sum(m * (1 if bifurcated else r) for m, r in zip(contexts, per_rows, strict=True))
    branch_reads = sum(r * d for r, d in zip(per_rows, per_dec, strict=True))
    kv = (context_reads + branch_reads + total_rows) * kv_token  # + this step's K/V, written once
    return weight_bytes_read(c, elem) + kv + total_rows * c.vocab_size * logits_bytes


def floor_ms(traffic_bytes: int, copy_gbps: float) -> float:
    """The traffic at a copy bandwidth (GB/s, bytes read + written per second), in ms."""
    return traffic_bytes / (copy_gbps * 1e9) * 1e3
