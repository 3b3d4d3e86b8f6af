"""The bf16 note: said exactly when a CPU run would autocast to bf16 without native bf16 instructions."""

from __future__ import annotations

from pathlib import Path

from visgen.hardware import cpu_flags, slow_cpu_bf16_note

ICELAKE = frozenset({"fpu", "avx2", "avx512f", "avx512bw", "avx512_vnni"})
SAPPHIRE_RAPIDS = ICELAKE | {"avx512_bf16", "amx_bf16", "amx_tile"}


def test_note_only_for_bf16_on_a_cpu_without_native_bf16() -> None:
    note = slow_cpu_bf16_note("cpu", True, ICELAKE)
    assert note is not None and "trainer.precision=32-true" in note and "precision=fp32" in note
    assert slow_cpu_bf16_note("cpu", True, SAPPHIRE_RAPIDS) is None
    assert slow_cpu_bf16_note("cpu", True, frozenset({"fp", "asimd", "bf16"})) is None  # arm64 with bf16
    assert slow_cpu_bf16_note("cpu", False, ICELAKE) is None  # fp32 run
    assert slow_cpu_bf16_note("cuda", True, ICELAKE) is None  # GPUs decide for themselves


def test_cpu_flags_reads_the_first_processor_and_unknown_machines_get_no_note(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu amx_bf16\n")
    assert cpu_flags(str(info)) == frozenset({"fpu", "avx2", "avx512f"})
    assert cpu_flags(str(tmp_path / "missing")) is None
    assert slow_cpu_bf16_note("cpu", True, cpu_flags(str(info))) is not None
