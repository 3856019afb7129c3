"""The bf16 matmul kernels a report names: from the CPU's flags and oneDNN's ISA cap."""

import pytest

from mardini import cpu_kernels

AMX_CPU = frozenset({"fpu", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
AVX512_BF16_CPU = frozenset({"fpu", "avx512f", "avx512_bf16"})
AVX2_CPU = frozenset({"fpu", "avx2", "fma"})


@pytest.mark.parametrize("flags, env, expected", [
    (AMX_CPU, {}, "AMX"),
    (AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "ALL"}, "AMX"),
    (AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "avx10_1_512_amx"}, "AMX"),
    (AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AMX"),
    (AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, "AVX-512 BF16"),
    (AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX10_1_512"}, "AVX-512 BF16"),
    (AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "float32 (no native bf16)"),
    (AVX512_BF16_CPU, {}, "AVX-512 BF16"),
    (AVX512_BF16_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, "AVX-512 BF16"),  # a cap adds nothing
    (AVX512_BF16_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, "float32 (no native bf16)"),
    (AVX2_CPU, {}, "float32 (no native bf16)"),
    (frozenset(), {}, "unknown"),
])
def test_kernels_follow_the_flags_and_the_cap(flags, env, expected):
    assert cpu_kernels.bf16_matmul_kernels(flags, env) == expected


def test_describe_names_the_cap_when_one_is_set():
    assert cpu_kernels.describe(AMX_CPU, {}) == "bf16 matmul on AMX"
    capped = cpu_kernels.describe(AMX_CPU, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    assert capped == "bf16 matmul on AVX-512 BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)"


def test_flags_are_read_from_the_cpuinfo_flags_line(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_kernels.cpu_flags(str(info)) == {"fpu", "avx512f", "avx512_bf16", "amx_bf16"}
    assert cpu_kernels.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_the_demo_reports_the_kernels_and_the_cap(monkeypatch):
    from mardini.demo.main import machine_line

    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda path="/proc/cpuinfo": AMX_CPU)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.setenv("MARDINI_DEMO_WAIT_POLICY", "OpenMP default wait policy")
    line = machine_line()
    assert "bf16 matmul on AVX-512 BF16 (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)" in line
    assert line.endswith(", OpenMP default wait policy")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert "bf16 matmul on AMX," in machine_line()


def test_run_info_quotes_the_command_and_names_the_kernels():
    from mardini.run_info import command_line, machine_line

    assert command_line(["python", "evaluate.py"], ["--cache-dir", "", "--out", "a b"]) == (
        "python evaluate.py --cache-dir '' --out 'a b'")
    assert cpu_kernels.describe() in machine_line()  # every report's machine line names the bf16 kernels
