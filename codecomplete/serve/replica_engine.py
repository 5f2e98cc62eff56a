"""The Engine a team server's replica runs, built from plain values: in the replica's own
process (without batching), or by name in the child process the replica runs it in (with
batching: isolation.ProcessEngine). Apart from app.py so that the child imports neither
Ray nor FastAPI (2 s and ~90 MB more per start and restart)."""

from __future__ import annotations

from typing import Any

RANDOM_7B = "random-7b"  # --model: Qwen2.5-Coder-7B-shaped, random weights made on the replica's GPU
# the prompt fills what the decode leaves of the context: ~2k-token prompts (issue 24's), as
# bench serve --device builds for --context-tokens 2048
RANDOM_7B_MAX_SEQ_LEN = 2048 + 128
# prompt KV states a replica without batching keeps, one per typist (the shipped model's
# onnx state holds its whole 2k context: ~32 MB each)
UNBATCHED_CACHED_DOCUMENTS = 16


def random_7b_runtime(runtime: str, device: str, precision: str):
    """A torch runtime of a 7B-shaped model with random weights (models/testing), built where
    it runs: the scaling runs need the shape's cost, not its answers, and a 15 GB folder per
    machine."""
    if runtime != "torch":
        raise ValueError(f"--model {RANDOM_7B} runs on the torch runtime (--runtime torch), not {runtime}")
    from codecomplete.models.testing import (
        qwen7b_shape_config,
        random_torch_model,
        standin_tokenizer,
    )
    from codecomplete.runtime.torch import TorchRuntime

    precision = precision if precision != "auto" else "bf16" if device == "cuda" else "fp32"
    # suffix first (SPM), as bench serve --device builds it: a keystroke prefills a token or two
    cfg = qwen7b_shape_config(max_seq_len=RANDOM_7B_MAX_SEQ_LEN, fim_order="spm")
    return TorchRuntime.from_model(random_torch_model(cfg, device, precision), standin_tokenizer(cfg), device=device,
                                   precision=precision)


def build_replica_engine(model: str | None, runtime: str, device: str, precision: str, threads: int | None,
                         batching: str = "off", exact_new_tokens: int | None = None,
                         rerank_workers: int | None = None) -> Any:
    """The replica's Engine: model RANDOM_7B or a folder (None: the shipped model)."""
    from codecomplete.engine import Engine

    # a replica serves many typists: each keeps its own prompt KV (without batching the
    # engine's default is a laptop's two, which a new document may take from another)
    cached = None if batching == "on" else UNBATCHED_CACHED_DOCUMENTS
    if model == RANDOM_7B:
        engine = Engine(random_7b_runtime(runtime, device, precision), batching=batching, cached_documents=cached,
                        rerank_workers=rerank_workers)
    else:
        engine = Engine.load(model, runtime=runtime, device=device, precision=precision, threads=threads,
                             batching=batching, cached_documents=cached, rerank_workers=rerank_workers)
    if exact_new_tokens:
        # benchmarks only (bench serve --device --url): each keystroke does the work the
        # in-process benchmark's does, so the two compare
        engine.exact_new_tokens = exact_new_tokens
        engine.reuse_keystrokes = False
    return engine
