"""glibc malloc settings for torch on the CPU: keep freed memory for reuse instead of page-faulting it in anew.

PyTorch takes CPU tensors straight from malloc. Under glibc's defaults a multi-MiB temporary (a UNF layer's pieces,
Deep Sets' per-entry activations) is often an mmap that is returned to the kernel when freed and page-faulted back,
4 KiB at a time, at the next training step: thousands of minor faults per step, which can cost as much as the
arithmetic (a 16 x 16 by 16 x 131,072 matmul: 2.2 ms into a fresh output, 0.8 ms into a reused one). glibc adapts its
mmap threshold upwards only for sizes it has seen freed, and trims the heap top whenever free memory there exceeds
twice that threshold, so the faults come and go with what ran before in the process.

`tune_allocator` fixes both thresholds once per process: blocks up to 32 MiB (glibc's maximum mmap threshold) come
from the heap, and the heap keeps up to 1 GiB of free memory at its top for the next step. The process's resident
memory then stays at its peak instead of shrinking between steps; the training commands hold that peak anyway.
The `unfzoo` commands and the zoo's Dask workers call it; Python users may call it themselves. It does nothing off
glibc (macOS, musl) and leaves the process alone when the user set `MALLOC_MMAP_THRESHOLD_` or
`MALLOC_TRIM_THRESHOLD_` (their choice wins), or set `UNFZOO_MALLOC=default`.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["tune_allocator", "allocator_report", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

MMAP_THRESHOLD = 32 << 20  # bytes: glibc's largest allowed value on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # bytes of free memory the heap top may keep
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_applied: bool | None = None


def tune_allocator() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once); True when they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    user_set = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
    if user_set or os.environ.get("UNFZOO_MALLOC", "").lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first, as setting it also turns off the adaptive one
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def allocator_report() -> str:
    """Tune the allocator as the `unfzoo` commands do and say which settings are in effect (a benchmark's first
    line: `UNFZOO_MALLOC=default` runs give glibc's)."""
    return f"allocator: {'tuned (pipeline/allocator.py)' if tune_allocator() else 'glibc defaults'}"
