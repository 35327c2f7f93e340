"""The host allocator's large-block policy for a training process on CPU (glibc malloc).

glibc serves a block of at least ``M_MMAP_THRESHOLD`` bytes with its own ``mmap`` and returns it to
the system on ``free``. By default that threshold is dynamic: each freed mmapped block raises it to
the block's size (up to 32 MiB on 64-bit), so after the first step's freed gradients, buckets and
activations, every later block below 32 MiB comes from the heap, where freed memory stays resident
and fragments. Measured on the bench model of ``bench/scale_memory.py`` (pp2 x dp2 x ep2, 1F1B): the
busiest rank's peak resident set was 0.07 GiB higher than with the threshold fixed at 4 MiB, and
the one-process step time is the same (BENCHMARKS.md, "per-rank memory: the unplanned bytes").
A fixed threshold of 128 KiB saves a little more but costs about 25 % of the step time in page faults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (malloc.h).
M_MMAP_THRESHOLD = -3
#: The fixed threshold: blocks of 4 MiB and more are mmapped and given back when freed.
MMAP_THRESHOLD_BYTES = 4 << 20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``nbytes`` (which also turns its dynamic raising off).

    Returns True when it was set; False where the C library is not glibc (nothing is changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
