"""How the C allocator treats a training step's large CPU buffers: kept in the process for the next step.

Every step makes the same large buffers afresh: the fused loss's [rows, vocab] float32 chunks (48 MiB at 256 x
49,152), their gradients, the student's activations. glibc's malloc serves a buffer above its mmap threshold (at
most 32 MiB, and 128 KiB until the first large free) with fresh pages from the kernel and unmaps them on free, so
every step the kernel maps and zeroes them again: ~400k page faults and ~1 s of kernel CPU per reference step on 2
cores (docs/BENCHMARKS.md, bench/step_pairs.py). While training or writing a teacher cache, malloc is asked to serve
every buffer from its heap and to keep what is freed there, so the next step reuses the same memory without the
kernel; afterwards glibc's defaults come back and the freed memory is returned to the system. Other C libraries
(macOS, musl) are left as they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

# mallopt parameters and glibc's defaults for them (malloc.h, malloc/malloc.c).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
# Free memory at the top of the heap is given back only above this (mallopt takes a C int): in practice never.
KEPT_TRIM_THRESHOLD = 2**31 - 1


@functools.cache  # find_library runs `ldconfig -p`: once per process is enough
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has `gnu_get_libc_version`), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if all(hasattr(libc, symbol) for symbol in ("gnu_get_libc_version", "mallopt", "malloc_trim")) \
        else None


_active = 0  # contexts open now: only the outermost sets malloc's parameters and gives them back


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True) -> Iterator[bool]:
    """Within: large buffers come from malloc's heap and freed memory stays there for reuse (`training.
    keep_freed_memory`). Yields whether that is in force (False: disabled, or the C library is not glibc). Contexts
    nest (a cache written inside a run): the defaults come back when the outermost one closes."""
    global _active
    libc = _glibc() if enabled else None
    if libc is None:
        yield _active > 0
        return
    if _active == 0:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, KEPT_TRIM_THRESHOLD)
    _active += 1
    try:
        yield True
    finally:
        _active -= 1
        if _active == 0:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)  # what the run freed goes back to the system, not only the heap's top
