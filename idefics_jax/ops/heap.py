"""glibc malloc settings for training on the CPU, applied inside the running process.

XLA:CPU allocates a step's large temporaries and frees them again on every call. With glibc's defaults, large
blocks are mmap-ed and unmapped each time and the heap's free top is trimmed, so every step faults their pages in
afresh (about a million minor page faults per step of a SmolVLM-256M-sized model, most of the time in the kernel).
Keeping freed memory in the heap (no mmap, no trimming, one arena so every thread reuses it) removes most of them.

`mallopt` sets the same parameters as the GLIBC_TUNABLES `glibc.malloc.*` names in `SETTINGS`, without a restart,
so the training step gets them however it is started (the CLI, a script, a notebook). The cost: memory a step
freed stays with the process for the next one instead of going back to the system.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings

# mallopt parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (mallopt parameter, value, the GLIBC_TUNABLES name it stands for). A trim threshold of -1 is the largest size_t:
# the heap's free top is never given back.
SETTINGS = (
    (M_MMAP_MAX, 0, "glibc.malloc.mmap_max"),
    (M_TRIM_THRESHOLD, -1, "glibc.malloc.trim_threshold"),
    (M_ARENA_MAX, 1, "glibc.malloc.arena_max"),
)
OPT_OUT = "IDEFICS_JAX_SYSTEM_MALLOC"  # set to 1 to keep the system's malloc settings

_lock = threading.Lock()
_applied = False


def _glibc():
    """The C library when it is glibc (it has `gnu_get_libc_version`), else None (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory() -> bool:
    """Applies `SETTINGS` to this process's malloc, once; later calls do nothing. Returns whether the settings are
    in effect: False off Linux / glibc or with IDEFICS_JAX_SYSTEM_MALLOC=1.

    Call it before the work it is for. Threads that allocated before the call keep the arenas they had; measured
    on the tiny config, a step built after the model loaded still faults almost no pages (tests/test_heap.py)."""
    global _applied
    if os.environ.get(OPT_OUT) == "1":
        return False
    with _lock:
        if not _applied:
            libc = _glibc()
            if libc is None:
                return False
            failed = [name for param, value, name in SETTINGS if libc.mallopt(param, value) != 1]
            if failed:
                warnings.warn(f"glibc's mallopt refused {', '.join(failed)}: training on the CPU may be slower",
                              stacklevel=2)
                return False
            _applied = True
    return True


def for_cpu_training() -> bool:
    """`keep_freed_memory()` when JAX's default backend is the CPU (an accelerator's host keeps glibc's defaults:
    its steps do not run through malloc, and trimming gives loading's memory back). Returns whether the settings
    are in effect."""
    import jax

    return jax.default_backend() == "cpu" and keep_freed_memory()
