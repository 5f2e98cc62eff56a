"""Runtimes behind one small interface (see base.py). `load_runtime` picks one."""

from __future__ import annotations

from .base import BranchState, ContextState, DecodeStep, Runtime, TopRows, common_prefix_len

__all__ = ["DEVICES", "RUNTIMES", "BranchState", "ContextState", "DecodeStep", "Runtime", "TopRows", "common_prefix_len", "load_runtime"]

# the one list of choices: the CLI, the benchmarks and the language server's settings use these
RUNTIMES = ("onnx", "torch")
DEVICES = ("cpu", "cuda")


def load_runtime(model: str | None = None, runtime: str = "onnx", device: str = "cpu",
                 precision: str = "auto", source=None, threads: int | None = None) -> Runtime:
    """Load a model (None: the shipped default) into the named runtime.
    threads: CPU threads for its kernels (None: the runtime's choice, all physical cores)."""
    from codecomplete.models.format.source import load_model_source

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    source = source or load_model_source(model, precision=precision)  # a GGUF is converted to suit
    if runtime == "torch":
        try:
            from .torch import TorchRuntime
        except ImportError as e:
            raise RuntimeError("the torch runtime needs torch: pip install 'codecomplete[torch]'") from e
        return TorchRuntime(source, device=device, precision=precision, threads=threads)
    from .onnx import OnnxRuntime

    return OnnxRuntime(source, device=device, precision=precision, threads=threads)
