"""The int8 kernel choice follows the CPU: full 8-bit weights only where they are exact."""

from pathlib import Path

from codecomplete.runtime.cpu import probe

SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx_vnni amx_tile amx_int8 avx512_bf16
"""
EPYC_AVX2 = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse2 fma avx2 ht
"""
ARM = """processor\t: 0
Features\t: fp asimd asimddp i8mm
"""


def _topology(tmp_path: Path, cores: int, threads_per_core: int) -> Path:
    for cpu in range(cores * threads_per_core):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{cpu // threads_per_core}\n")
    return tmp_path


def test_vnni_cpus_run_full_8bit_weights(tmp_path):
    cpu = probe(SAPPHIRE_RAPIDS, _topology(tmp_path, 16, 1), machine="x86_64")
    kind, why = cpu.int8_linear_kind()
    assert kind == "int8-s8" and "avx512_vnni" in why
    assert cpu.physical_cores == 16 and "amx_int8" in cpu.describe()["simd"]


def test_avx2_cpus_without_vnni_keep_7bit_weights(tmp_path):
    cpu = probe(EPYC_AVX2, _topology(tmp_path, 2, 1), machine="x86_64")
    assert cpu.int8_linear_kind()[0] == "int8-w7"
    assert cpu.describe()["cpu"] == "AMD EPYC"


def test_hyperthreads_count_once(tmp_path):
    assert probe(EPYC_AVX2, _topology(tmp_path, 4, 2), machine="x86_64").physical_cores == 4


def test_unverified_architectures_keep_the_weights_that_are_exact_everywhere(tmp_path):
    cpu = probe(ARM, tmp_path, machine="aarch64")
    kind, why = cpu.int8_linear_kind()
    assert kind == "int8-w7" and "aarch64" in why
    assert cpu.physical_cores >= 1
