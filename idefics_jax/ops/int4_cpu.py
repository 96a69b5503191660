"""The int4 decode matmul's CPU kernel (`int4_cpu.cc`, an XLA FFI custom call): x (R, C) @ int4 w -> (R, O).

XLA has no packed-int4 matmul; its best form unpacks every weight's nibbles into a byte array at every decode step,
which costs more than the multiplication. The kernel reads each packed byte once and unpacks it in registers.

It is compiled on first use with the host's C++ compiler (for the host's vector width) into a per-user cache, keyed
by the source and the CPU; where no compiler works, `available()` is False and callers keep XLA's path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp

_SOURCE = Path(__file__).with_name("int4_cpu.cc")
_TARGET = "idefics_jax_int4_matmul"


def _cache_dir() -> Path:
    root = os.environ.get("IDEFICS_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "idefics_jax")
    return Path(root) / "kernels"


def _cpu_key() -> str:
    """The build's key: source, compiler flags' target (the CPU's features), jaxlib's FFI headers."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    h = hashlib.sha256(_SOURCE.read_bytes())
    for part in (flags, platform.machine(), jax.ffi.include_dir(), jax.__version__):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _build() -> Path | None:
    out = _cache_dir() / f"int4-{_cpu_key()}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed whole: concurrent builds race safely.
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno",
               f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", str(so)]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return None
        os.replace(so, out)
    return out


_LOCK = threading.Lock()


def available() -> bool:
    """Whether the kernel is built and registered (once per process); False where it cannot be built."""
    with _LOCK:  # first traces on two threads (an engine beside a notebook): one build, one registration
        return _load()


@functools.cache
def _load() -> bool:
    try:
        path = _build()
        if path is None:
            return False
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.IdeficsInt4Matmul), platform="cpu")
        return True
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError):
        return False


def matmul(x_RC, values_khO, scales_kO):
    """x (R, C) float32 @ the int4 weight (values (k, g/2, O) uint8, scales (k, O) float32) -> (R, O) float32."""
    R, O = x_RC.shape[0], values_khO.shape[-1]
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((R, O), jnp.float32))
    return call(x_RC.astype(jnp.float32), values_khO, scales_kO.astype(jnp.float32))
