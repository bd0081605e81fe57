"""Process-wide heap policy for the server (``--heap``): what glibc keeps of the memory a request frees.

glibc's defaults suit short programs, not a server whose threads each decode multi-megabyte requests:
every thread may get its own heap arena (up to 8 per core), and the mmap threshold *rises* to the largest
block freed, so later 12 MB tensors come from arenas that fragment and never shrink. Measured on the load
benchmark (50 streaming clients, 4 096-image requests): peak RSS 2.25× idle with the defaults.

``lean`` (the default): two arenas; blocks of 4 MiB and more are mapped and go back to the OS when freed, and at
most 32 MiB stays free at the top of each arena. A forward chunk of 256 MNIST-sized images (800 KB of input, the
non-robust CNN's 3.2 MB and 1.6 MB activations, a stream's parsed messages) is then served from memory the previous
pass freed, while a 4 096-image request (12.8 MB) or a search workspace is mapped and unmapped. Measured on the load
benchmark (`benchmarks/results/load_admission.md`, phases streams / f2i / heavy key, 30 s each): peak RSS 1.68× /
1.80× / 1.70× idle, the CNN streams phase 64.7k images/s and the heavy key's 4 096-image calls 62.5k (on the
grpc.aio server; 1.78× / 1.86× / 1.49× at 60.6k and 55.6k on the thread-pool one). The previous lean policy (blocks of 1 MiB and more mapped, glibc's 128 KiB trim) gave 1.71× / 1.76× / 1.59× at 28.2k and 42.7k
images/s: each activation a fresh mmap whose pages the kernel zeroes on first touch, and the heap's top given back
after every pass. In-process, one torch thread, 256-image CNN passes ran at 15-19k images/s under the old policy's
settings and 52-59k under these.

``fast``: two arenas, blocks of 32 MiB and more mapped, and up to 64 MiB kept free at the heap's top: also the
activations of large chunks of a bigger encoder come from the arenas; but freed blocks stay there, and concurrent
F2I searches on the CNN peaked at 2.32-2.35× idle (bench-load's F2I phase). For a replica that serves features of a
heavy encoder and has memory to spare.

The environment variables MALLOC_ARENA_MAX / MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ still win when set
(we leave them alone then).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
ARENA_MAX = 2
# per policy: (mmap threshold, trim threshold); None leaves glibc's value
HEAP_POLICIES: dict[str, tuple[int, int | None]] = {
    "lean": (4 << 20, 32 << 20),  # a 256-image chunk's blocks reused; a 4 096-image request's mapped
    "fast": (32 << 20, 64 << 20),  # glibc's own ceiling for its rising threshold; the top kept for the next pass
}


def _libc():
    path = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(path) if path else None
    except OSError:
        return None


_LIBC = _libc()


def limit_heap_growth(policy: str = "lean") -> bool:
    """Apply a policy above (HEAP_POLICIES) with mallopt; False (and nothing done) where the C library is not
    glibc."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        log.debug("no glibc mallopt: heap policy left at the platform default")
        return False
    if "MALLOC_ARENA_MAX" not in os.environ:
        mallopt(_M_ARENA_MAX, ARENA_MAX)
    mmap_threshold, trim_threshold = HEAP_POLICIES[policy]
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ and trim_threshold is not None:
        mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    return True


def freeze_startup_heap() -> int:
    """Move every object alive after start-up (torch, the encoder, gRPC's and the ledger's state) out of the
    cyclic garbage collector's reach, and return how many there are.

    Why: a full collection traverses every tracked object while holding the GIL, and with the start-up heap in it
    such a pass stalled every thread, health checks too: with 64 small clients of 64 keys, health p99 was 136-142 ms
    over 30-s phases (benchmarks.load, `--phases small --seconds 30`), 17.6 ms with this call (17.9 ms with the
    collector off). Objects created later are still collected; the frozen ones live as long as the server does anyway."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
