"""Facts about the host CPU that choose between equivalent CPU code paths (read once per process).

The CPU BLAS (MKL in torch's x86 wheels) dispatches its small-GEMM kernels by CPU vendor as well
as by instruction set, so which of two GEMM forms is faster can differ between an Intel and an
AMD CPU with the same AVX-512 capability (reference/moe.py ``_mm`` measures one such case).
"""
from __future__ import annotations

import functools
import platform


@functools.lru_cache(maxsize=None)
def cpuinfo() -> dict:
    """The fields of the first processor in Linux ``/proc/cpuinfo`` (``{}`` elsewhere)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # up to the first blank line: one processor, not every one's copy
                if not line.strip():
                    break
                if ":" in line:
                    k, v = line.split(":", 1)
                    fields[k.strip()] = v.strip()
    except OSError:
        return {}
    return fields


@functools.lru_cache(maxsize=None)
def vendor() -> str:
    """``"intel"``, ``"amd"`` or ``"other"`` (an unknown or non-x86 CPU)."""
    v = cpuinfo().get("vendor_id", "")
    if not v and platform.system() == "Windows":  # "Intel64 Family 6 ..." / "AMD64 Family 25 ..."
        v = platform.processor()
    v = v.lower()
    return "intel" if "intel" in v else "amd" if "amd" in v else "other"
