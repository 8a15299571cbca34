"""Process memory hygiene for model-sized buffers: free dropped models now, hand freed weights back to the OS."""

from __future__ import annotations

import ctypes
import gc


def _glibc():
    """glibc, for its allocator controls; None on other C libraries."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_large_frees_returnable() -> None:
    """Fix glibc's mmap threshold at 1 MiB, so every freed weight-sized buffer goes back to the OS at once.

    Why: glibc raises the threshold to the size of each freed mmapped block (up to 32 MiB), after which
    weight-sized buffers come from the heap and stay there when freed; PEFT's ``safe_merge`` (clone, add,
    free the original) then grows the process to 1.5x the model. With the threshold fixed the run stays
    at one copy. Process-wide and harmless elsewhere (large buffers are mmapped, as by default at first).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def release_memory() -> None:
    """Free a dropped model now: HF/PEFT models hold reference cycles, and glibc keeps freed arenas."""
    gc.collect()
    libc = _glibc()
    if libc is not None:  # not glibc: the collector alone
        libc.malloc_trim(0)
