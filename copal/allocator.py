"""glibc malloc settings for a process that prunes. Imports nothing heavy, so the
command line can call it before it parses its arguments."""


def limit_allocator_fragmentation() -> None:
    """Ask glibc's malloc for fewer arenas and a fixed 1 MB mmap threshold.

    Pruning frees and reallocates many multi-megabyte tensors; with glibc's
    defaults (an arena per thread, a threshold that grows with every freed
    block) the freed memory stays in the heap and peak RSS grows by about the
    model's size again (docs/DESIGN-NOTES.md, "Process-wide settings"). A no-op
    where glibc is not the allocator. Call once, early, from the entry point of
    a process that prunes (the command line's main, the bench cell task)."""
    import ctypes
    import ctypes.util

    M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass
