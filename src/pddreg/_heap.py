"""Keep freed host memory for reuse during a registration (glibc only).

A registration allocates and frees the same large buffers over and over: each level's cost
volume (24 M floats at 128^3), its mask weights, the regulariser's buffers, the warped feature
maps. glibc's ``malloc`` serves every block above 32 MiB by a fresh ``mmap`` and returns it to
the system when it is freed, so each of these buffers is faulted in, page by page and zeroed by
the kernel, every time it is made. On the 2-core virtual machines we measure on that took
more time than the computation that filled the buffers: the mask weights of `mind`'s first
level at 128^3 0.11-0.55 s against 0.05 s for the same call on reused memory, the whole
registration 5.1 -> 3.6-4.1 s (``benchmarks/bench_speed3d.py``, RESULTS.md).

:func:`reuse_freed_memory` switches glibc to its heap for the duration (``M_MMAP_MAX = 0``: no
block is ``mmap``-ed; ``M_TRIM_THRESHOLD`` high: freed memory stays with the process for the
next buffer) and on leaving restores glibc's defaults and hands the free memory back
(``malloc_trim``). Elsewhere (macOS, Windows, musl, or ``PDDREG_REUSE_MEMORY=0`` in the
environment) it does nothing. It nests and is safe across threads (the outermost call sets and
restores). One side effect stays: glibc's adaptive ``mmap`` threshold is fixed at its
default after the first use (any ``mallopt`` call does that).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

__all__ = ["reuse_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on leaving
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
#: While inside: freed memory above this stays with the process (the largest int mallopt takes).
_KEEP = 2**31 - 1

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc with ``mallopt`` and ``malloc_trim``, else None."""
    global _libc
    if _libc is False:
        _libc = None
        if sys.platform.startswith("linux") and os.environ.get("PDDREG_REUSE_MEMORY", "1") != "0":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.gnu_get_libc_version  # noqa: B018 - glibc only (musl has mallopt as a stub)
                lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                lib.mallopt.restype = ctypes.c_int
                lib.malloc_trim.argtypes = [ctypes.c_size_t]
                lib.malloc_trim.restype = ctypes.c_int
                _libc = lib
            except (OSError, AttributeError):
                logger.debug("reuse_freed_memory: no glibc, left alone")
    return _libc or None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Inside the block, large host buffers come from (and return to) the process heap instead
    of fresh ``mmap`` pages; on leaving, glibc's defaults come back and the free memory is
    returned to the system. A no-op where glibc is not the C library."""
    global _depth
    lib = _glibc()
    if lib is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            lib.mallopt(_M_TRIM_THRESHOLD, _KEEP)
            lib.mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                lib.malloc_trim(0)
