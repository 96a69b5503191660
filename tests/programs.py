"""How the tests run jax, in their own processes and in the programs they start (the CLI, servers, scripts, the
docs' interpreters): on the CPU, with XLA's quick CPU backend (LLVM optimisation off, the loop emitters rather than
the fusion emitters). It computes the same numbers and compiles in a fraction of the time (the tiny training step:
2.3 s against 6.6 s), and the tests compile far more than they run. XLA:CPU's non-concurrent scheduler, faster to
compile still, is not used: two processes then order their collectives differently (tests/test_multihost.py).
Every process gets the same flags, so one compilation cache serves all of them (conftest's `compilation_cache`).

Importable without conftest: the docs' runner runs as a script.
"""

from __future__ import annotations

import os

QUICK_XLA = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")


def xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a process with `devices` simulated CPU devices."""
    return QUICK_XLA if devices == 1 else f"--xla_force_host_platform_device_count={devices} {QUICK_XLA}"


def env(devices: int = 1, **extra) -> dict:
    """The environment of a program a test starts: this one's, on the CPU, offline, the tests' XLA flags."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "XLA_FLAGS": xla_flags(devices), **extra}
