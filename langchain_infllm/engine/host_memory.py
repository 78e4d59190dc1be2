"""Keep host memory proportional to what the engine holds (glibc heap fragmentation).

Sealed blocks are many long-lived allocations of tens of KiB; each execution chunk also
allocates and frees buffers of several MiB. glibc serves large buffers with mmap, but
after the first such buffer is freed it raises its mmap threshold (up to 32 MiB), so
later chunk buffers come from the heap, interleave with the blocks, and the freed space
between blocks can never be returned: measured on a tiny model, process RSS grew ~5x
faster than the bytes of the blocks (and to 17 GB at 524K tokens). Fixing the threshold
keeps large transient buffers on mmap, so RSS tracks the blocks again.

This is a process-wide glibc setting (the same one `MALLOC_MMAP_THRESHOLD_` sets); set
`LANGCHAIN_INFLLM_MALLOC_TUNING=0` to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial default, made fixed
_done: bool | None = None
_lock = threading.Lock()


def limit_heap_fragmentation() -> bool:
    """Fix glibc's mmap threshold once per process; True when it is in effect."""
    global _done
    with _lock:
        if _done is not None:
            return _done
        _done = False
        if os.environ.get("LANGCHAIN_INFLLM_MALLOC_TUNING", "1") == "0":
            logger.debug("malloc tuning disabled by LANGCHAIN_INFLLM_MALLOC_TUNING=0")
            return False
        if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
            return False
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
        logger.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, _done)
        return _done
