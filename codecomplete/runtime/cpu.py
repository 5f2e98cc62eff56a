"""What this CPU can do for the int8 kernels, and the choices that follow from it.

onnxruntime's uint8 x int8 GEMMs (MatMulInteger with int8 weights) run on AVX2 with
`vpmaddubsw`, which adds pairs of products into int16 and saturates: full 8-bit weights
then lose precision, so those machines get weights rounded to 7 bits (exact there). With
VNNI (`vpdpbusd`, AVX-512 or AVX-VNNI) or AMX the products accumulate in int32: full
8-bit weights are exact and take the same fast kernels. Threads: one per physical core
(a hyper-thread shares its core's vector units, which the GEMMs already fill).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# flags in /proc/cpuinfo whose presence makes uint8 x int8 dot products accumulate in int32
EXACT_U8S8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cpus: int
    flags: frozenset[str]
    machine: str

    @property
    def exact_u8s8(self) -> bool:
        """uint8 x int8 products accumulate without int16 saturation (VNNI or AMX). Other
        machines (x86 without them, and Arm, whose kernels were not verified here) keep
        the 7-bit weights that are exact everywhere."""
        return self.is_x86 and any(f in self.flags for f in EXACT_U8S8_FLAGS)

    @property
    def is_x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    def int8_linear_kind(self, keep_8_bits: bool = False) -> tuple[str, str]:
        """The onnx linear kind for int8 weights on this CPU, and why. keep_8_bits (a GGUF's
        8-bit tensors, which Qwen2.5-Coder loses more to 7 bits than the shipped model does):
        the exact uint8-weight kernels where the fast ones would need 7-bit weights."""
        if self.exact_u8s8:
            have = [f for f in EXACT_U8S8_FLAGS if f in self.flags]
            return "int8-s8", f"full 8-bit weights: {'/'.join(have)} accumulates uint8 x int8 in int32 (exact)"
        if keep_8_bits:
            return "int8", "full 8-bit weights as the file has them: the uint8 x uint8 kernels (exact, no VNNI needed)"
        if not self.is_x86:
            return "int8-w7", f"7-bit weights: exact with every kernel (full 8-bit not verified on {self.machine})"
        return "int8-w7", "7-bit weights: no VNNI, the AVX2 kernels add uint8 x int8 pairs in int16 (saturates at 8 bits)"

    def describe(self) -> dict:
        kind, why = self.int8_linear_kind()
        simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
                if f in self.flags]
        return {"cpu": self.model, "physical_cores": self.physical_cores, "logical_cpus": self.logical_cpus,
                "simd": simd, "int8_kind": kind, "int8_kind_reason": why}


def _read_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, frozenset(flags)


def _physical_cores(sys_cpu: Path) -> int | None:
    cores = set()
    for topo in sys_cpu.glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or None


def probe(cpuinfo: str | None = None, sys_cpu: Path = Path("/sys/devices/system/cpu"),
          machine: str | None = None) -> CpuInfo:
    """Read this machine's CPU (or the given /proc/cpuinfo text, for tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    model, flags = _read_cpuinfo(cpuinfo)
    logical = os.cpu_count() or 1
    physical = _physical_cores(sys_cpu) or max(1, logical // 2)  # no topology: assume 2 threads a core
    return CpuInfo(model or platform.processor() or "unknown", physical, logical, flags,
                   machine or platform.machine())


@lru_cache(maxsize=1)
def this_cpu() -> CpuInfo:
    return probe()


__all__ = ["CpuInfo", "EXACT_U8S8_FLAGS", "probe", "this_cpu"]
