"""Process-wide heap policy for the server: memory freed after a large request goes back to the OS.

glibc's defaults suit short programs, not a server whose handler threads each decode multi-megabyte requests:
every thread may get its own heap arena (up to 8 per core), and the mmap threshold *rises* to the largest
block freed, so later 12 MB tensors come from arenas that fragment and never shrink. Measured on the load
benchmark (50 streaming clients, 4 096-image requests): peak RSS 2.25× idle with the defaults, 1.82× with two
arenas and a fixed 1 MiB threshold.

But a threshold that low made every activation of a forward pass a fresh mmap whose pages the kernel zeroes on
first touch, and the trim threshold (128 KiB by default once a threshold is set) gave the heap's top back after
every pass: the non-robust CNN's forward cost 12 ms of CPU per 256 images in the server against 3.9 ms in a bare
process. Two arenas, blocks of 32 MiB and more mapped, and a 64 MiB trim threshold: 3.9-4.5 ms, StreamFeatures
of 4 096-image requests 54 000 against 20 000 images/s, peak RSS 1.75× idle (`make bench-load`, streams phase).
The environment variables MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ still win when set
(we leave them alone then).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its rising threshold; larger blocks come from mmap
TRIM_THRESHOLD_BYTES = 64 << 20  # free memory at the heap's top kept for the next forward pass, at most


def limit_heap_growth() -> bool:
    """Apply the policy above with mallopt; False (and nothing done) where the C library is not glibc."""
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("no glibc mallopt: heap policy left at the platform default")
        return False
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, ARENA_MAX)
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return True
