"""glibc's allocator, set up for a process that runs a model.

:func:`keep_freed_memory` makes glibc reuse freed memory (no ``mmap`` for large blocks, no
trimming of the heap's top below 2 GiB), so a model's large scratch buffers are not faulted in
again every step; the process keeps its peak for the next job. Only the main thread's arena is
tuned (the pipeline runs there); elsewhere than glibc it does nothing. Why: docs/performance.md.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Tune glibc's malloc for a model process (call before the model allocates); False elsewhere."""
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1)
    if not done:
        logger.warning("could not tune glibc's allocator; large CPU jobs may run slower")
    return done


def release_free_memory() -> None:
    """Hand the heap's free pages back to the kernel (after loading a model: its staging copies)."""
    if (libc := _glibc()) is not None:
        libc.malloc_trim(0)
