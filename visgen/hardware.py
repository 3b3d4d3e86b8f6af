"""What the machine's CPU does fast: bf16 autocast only pays on CPUs with native bf16 instructions.

Measured with the digits demo (demo_sit, 400 steps of batch 32, 2 cores; README "What the demo reaches"):
on a CPU with AMX / AVX512-BF16, bf16 autocast and fp32 run at the same speed for these small nets; with
oneDNN capped to AVX512 without bf16 (`ONEDNN_MAX_CPU_ISA=AVX512_CORE`, as on older Xeons and most AMD
parts before Zen 4) bf16 autocast is emulated and takes 2.3× as long as fp32 (114 s against 50 s). A run then
says so once.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX / AVX512-BF16; arm64 lists "bf16"


@cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU feature flags of the first processor in /proc/cpuinfo; None where there is no such file (macOS)."""
    path = Path(cpuinfo)
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):  # x86 / arm64
            return frozenset(line.split(":", 1)[1].split())
    return None


def slow_cpu_bf16_note(device_type: str, bf16: bool, flags: frozenset[str] | None = None) -> str | None:
    """A one-line note when bf16 autocast will run emulated on this CPU (no native bf16), else None."""
    if device_type != "cpu" or not bf16:
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or any(flag in flags for flag in NATIVE_BF16_FLAGS):
        return None
    return ("this CPU has no native bf16 instructions (no amx_bf16 / avx512_bf16 in /proc/cpuinfo): bf16 autocast "
            "runs emulated, about 2x slower than fp32 for small nets; fp32 is faster here "
            "(train.py trainer.precision=32-true, evaluate.py precision=fp32)")
