"""Multi-host start-up: `jax.distributed` initialised by the program itself when it runs on several hosts, so the
same `idefics-jax train` / `generate` command runs on one host and on every worker of a pod slice.

Detected, in order (before anything touches a jax backend):
  - IDEFICS_JAX_DISTRIBUTED=0: never; =1: always, letting jax detect the cluster (what scripts/tpu-vm sets);
  - explicit coordinator variables: JAX_COORDINATOR_ADDRESS (host:port), JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  - SLURM with more than one task (SLURM_NTASKS > 1; scripts/gpu/slurm.sbatch);
  - a TPU pod slice: TPU_WORKER_HOSTNAMES naming more than one host, or MEGASCALE_NUM_SLICES (multislice).
"""

from __future__ import annotations

import os


def wanted(env=os.environ) -> str | None:
    """Why this process should join a multi-host run ("coordinator", "slurm", "tpu", "forced"), or None."""
    flag = env.get("IDEFICS_JAX_DISTRIBUTED", "").strip().lower()
    if flag in {"0", "false", "no", "off"}:
        return None
    if flag in {"1", "true", "yes", "on"}:
        return "forced"
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
        return "coordinator"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
        return "tpu"
    return None


def initialize(env=os.environ) -> bool:
    """Calls `jax.distributed.initialize` when `wanted` says so (once); returns whether this is a multi-host run."""
    import jax

    why = wanted(env)
    if why is None:
        return False
    if jax.distributed.is_initialized():
        return True
    if why == "coordinator":
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()  # jax reads the SLURM / Cloud TPU environment itself
    return True


def is_main() -> bool:
    """Whether this process prints and writes run-level files (process 0)."""
    import jax

    return jax.process_index() == 0
