"""glibc malloc settings for training on the CPU.

XLA:CPU allocates a step's large temporaries and frees them again on every call. With glibc's defaults, blocks
over 32 MiB are mmap-ed and unmapped each time, so every step faults all their pages in afresh (about a million
minor page faults per step of a SmolVLM-256M-sized model, most of the time in the kernel). Keeping freed memory
in the heap (no mmap for large blocks, no trimming, one arena so every thread reuses it) removes most of them.
glibc reads these settings only at process start: `reexec_with_tunables` restarts the program with them.
"""

from __future__ import annotations

import os
import sys

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
OPT_OUT = "IDEFICS_JAX_SYSTEM_MALLOC"  # set to 1 to keep the system's malloc settings


def reexec_with_tunables() -> None:
    """Restarts this Python program, as it was started (`sys.orig_argv`: interpreter options, `-m module` or the
    script, its arguments), with `TUNABLES` unless they are set already, or opted out of, or this is not Linux.
    Returns only when no restart happens. Call it from a program's entry point only: it replaces the process."""
    if not sys.platform.startswith("linux") or os.environ.get(OPT_OUT) == "1":
        return
    if TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    current = os.environ.get("GLIBC_TUNABLES")
    env = {**os.environ, "GLIBC_TUNABLES": f"{current}:{TUNABLES}" if current else TUNABLES}
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
