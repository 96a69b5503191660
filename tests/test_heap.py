"""The CPU heap settings: applied inside the process, so a training step started from Python faults as few pages
as one started by `idefics-jax train`."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from idefics_jax.ops import heap

HERE = pathlib.Path(__file__).parent
glibc_only = pytest.mark.skipif(heap._glibc() is None, reason="glibc malloc settings: Linux with glibc only")

# A block over glibc's largest dynamic mmap threshold (32 MiB): with the defaults it is mmap-ed, and freeing it
# gives its pages back, so using it again faults every page in afresh.
_REUSE = """
import ctypes, json, resource, sys
from idefics_jax.ops import heap
applied = heap.keep_freed_memory()
again = heap.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
n = 64 << 20
faults = []
for _ in range(3):
    p = libc.malloc(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 1, n)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(ctypes.c_void_p(p))
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""


def _reuse(**env) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", heap.OPT_OUT)} | env
    out = subprocess.run([sys.executable, "-c", _REUSE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_settings_keep_a_freed_block_for_the_next_use():
    """In-process mallopt: a 64 MiB block freed and taken again is not faulted in again; IDEFICS_JAX_SYSTEM_MALLOC=1
    keeps glibc's defaults, where it is."""
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    kept = _reuse()
    assert kept["applied"] and kept["again"]
    assert max(kept["faults"][1:]) < pages / 20, kept
    system = _reuse(**{heap.OPT_OUT: "1"})
    assert not system["applied"]
    assert min(system["faults"]) > pages / 2, system


def test_settings_are_glibc_parameters():
    """Each setting is the mallopt parameter of its GLIBC_TUNABLES name (glibc's malloc.h numbers)."""
    numbers = {"glibc.malloc.trim_threshold": -1, "glibc.malloc.mmap_max": -4, "glibc.malloc.arena_max": -8}
    assert {name: param for param, _, name in heap.SETTINGS} == numbers


def _faults_per_step(mode: str, tmp_path, env: dict, steps: int = 8) -> float:
    """Median minor page faults of the steps after the first three (compiling, then the heap growing to its size)."""
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, str(HERE / "_heap_worker.py"), mode, str(out), str(tmp_path / mode), str(steps),
           "data.length_buckets=[192]"]  # one shape: one compile, every step alike
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    return float(np.median(json.loads(out.read_text())[3:]))


@glibc_only
def test_python_training_step_faults_as_few_pages_as_the_cli(tmp_path, program_env):
    """The tiny config's step, in a plain Python process (no GLIBC_TUNABLES, no restart) and under
    `idefics-jax train`: the plain process faults at most twice the pages per step. glibc's defaults fault about
    13,500 per step here; with the settings a step faults almost none (a floor of 1,000 keeps noise out)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", heap.OPT_OUT)} | program_env
    plain = _faults_per_step("python", tmp_path, env)  # first: it fills the compilation cache the CLI run reads
    cli = _faults_per_step("cli", tmp_path, env)
    print(f"minor page faults per step: plain Python process {plain:.0f}, idefics-jax train {cli:.0f}")
    assert plain <= 2 * max(cli, 1000), (plain, cli)
