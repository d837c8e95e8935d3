"""What this machine's CPU computes natively: read by training (`precision: auto`) and decoding
(which form of a bf16 product is fastest)."""

from __future__ import annotations

import functools
import os
from typing import Optional

from gpt2tune.errors import UserError


@functools.cache
def cpu_flags() -> frozenset:
    """The feature flags of this machine's CPU (`/proc/cpuinfo`, read once; empty where it cannot
    be read)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; "" where /proc/cpuinfo cannot be
    read; read once)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith("vendor_id")), "")
    return line.partition(":")[2].strip()


BF16_ENV = "GPT2TUNE_CPU_BF16"


def cpu_has_bf16(flags: Optional[frozenset] = None) -> bool:
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX). Elsewhere bf16 is emulated
    through fp32 and slower than fp32 itself.

    Without explicit `flags`, `GPT2TUNE_CPU_BF16=1` / `0` overrides what /proc/cpuinfo says (virtual
    machines may hide flags; it also runs the bf16 paths of `precision: auto` on any CPU)."""
    if flags is None:
        forced = os.environ.get(BF16_ENV, "").strip()
        if forced in ("0", "1"):
            return forced == "1"
        if forced:
            raise UserError(f"{BF16_ENV} must be 0 or 1, not {forced!r}")
        flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags
