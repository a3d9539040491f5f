"""Giving memory back after a burst.

Under load the poller, the event loop and the output writer each allocate from their own
glibc arena, and glibc raises its mmap threshold to the size of the largest block freed
so far (up to 32 MiB), so the SSE runs of a burst (up to 512 KiB each) end up in the
heaps, which keep the freed space: the agent's RSS stayed well above idle after a
full-load minute (bench/RESULTS.md, "Figures the code cites"). A fixed mmap threshold
keeps large blocks in their own mappings (returned on free), and malloc_trim() once the
hub has been idle returns what the heaps hold free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's default, made fixed (no dynamic raise)


@lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt  # noqa: B018 (glibc only)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def tune_malloc() -> None:
    """Fixed mmap threshold (glibc); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """Return the heaps' free pages to the kernel (glibc malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
