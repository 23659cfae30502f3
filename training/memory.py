"""The allocator setting training runs with: freed activation memory kept for the next step."""

from __future__ import annotations

import os
import sys


def reuse_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS (Linux only).

    A training step allocates and frees gigabytes of activations. By default glibc hands blocks over
    32 MB straight back to the OS, and the next step faults every page in again, which on virtual
    machines costs seconds per step. Keeping them makes later steps reuse warm memory at the price
    of fragmentation: freed blocks stay resident between live ones, ~1.5 GB at Qwen2.5-0.5B's
    4 x 512 step (docs/performance.md). Both limits go as high as mallopt's int allows: blocks up to
    2 GB come from the heap (a 4 x 512 step's full fp32 logits are 1.25 GB), and the top of the heap
    is never trimmed (-1), since a step that frees over 2 GB at once would otherwise hand all of it
    back and fault it in again next step. A user who set glibc's malloc tunables chose otherwise
    (for the leanest peak: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=4194304`)
    and is left alone. Returns whether the setting took effect.
    """
    if sys.platform != "linux" or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]  # an int: a larger value would wrap silently
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        INT_MAX, NEVER = 2**31 - 1, -1  # mallopt(3): a trim threshold of -1 disables trimming
        return bool(libc.mallopt(M_MMAP_THRESHOLD, INT_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, NEVER))
    except (OSError, AttributeError):
        return False  # not glibc (musl, macOS): nothing to do


