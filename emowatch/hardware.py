"""What the CPU can do, for the one choice that depends on it: the inference precision."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def native_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX)? Read from
    /proc/cpuinfo; False where it cannot be read (other OSes)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(setting: str) -> str:
    """``Settings.inference_precision`` -> "fp32" or "bf16" ("auto": bf16 where the CPU has it
    natively; emulated bf16 is slower than fp32)."""
    if setting in ("fp32", "bf16"):
        return setting
    if setting != "auto":
        raise ValueError(f"inference_precision must be auto, fp32 or bf16, got {setting!r}")
    return "bf16" if native_bf16() else "fp32"


__all__ = ["native_bf16", "resolve_precision"]
