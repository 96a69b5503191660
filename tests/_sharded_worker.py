"""Runs the model on simulated CPU meshes in a fresh process (jax must see 8 devices before it is imported).

    python tests/_sharded_worker.py CKPT INPUTS.npz OUT.npz --mesh 2,2,2 --mesh 1,8,1
    python tests/_sharded_worker.py CKPT INPUTS.npz OUT.npz --mesh 2,2,2 --process-id I --num-processes 2 --port P

INPUTS holds `<case>/<key>` processor arrays, and `train/<key>` a batch with labels. For each mesh OUT gets, under
`<mesh>/`: the logits of every case, the loss and updated parameters of one AdamW step (`param/<path>`), the
parameter bytes on each device, and the partition spec of every parameter. With several processes, each one
starts the same program (as on a TPU pod); process 0 writes OUT, and every process writes `OUT.<id>.json` with
the bytes it read from disk while loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_bytes() -> int:
    """Bytes this process has read through read(2)/pread(2) so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--mesh", action="append", required=True, help="data,fsdp,tensor")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)

    local = 8 // a.num_processes
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if a.num_processes > 1:
        # CPU collectives across processes go through gloo; on TPU VMs initialize() needs no arguments at all.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", num_processes=a.num_processes, process_id=a.process_id,
                                   local_device_ids=list(range(local)))
    import numpy as np
    from flax import nnx

    import idefics_jax
    from idefics_jax import sharding as shd
    from train import step as train

    inputs: dict[str, dict] = {}
    with np.load(a.inputs) as z:
        for key in z.files:
            case, name = key.split("/")
            inputs.setdefault(case, {})[name] = z[key]
    out: dict[str, np.ndarray] = {}
    read: dict[str, int] = {}
    for mesh_arg in a.mesh:
        shape = tuple(int(s) for s in mesh_arg.split(","))
        mesh = shd.make_mesh(shape)
        before = _read_bytes()
        model = idefics_jax.load_pretrained(a.ckpt, mesh=mesh)
        read[mesh_arg] = _read_bytes() - before
        for case, batch in inputs.items():
            if case != "train":
                out[f"{mesh_arg}/{case}/logits"] = shd.to_host(model(**batch))
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        for path, v in flat:
            out[f"{mesh_arg}/spec/{'/'.join(map(str, path))}"] = np.array(str(v[...].sharding.spec))
        per_device = shd.param_bytes_per_device(model)
        out[f"{mesh_arg}/bytes_per_device"] = np.array(
            [per_device.get(d, 0) for d in jax.local_devices()], np.int64)
        optimizer = train.make_optimizer(model, 1e-3, weight_decay=0.1)
        loss = train.train_step(model, optimizer, train.put_batch(inputs["train"], model))
        out[f"{mesh_arg}/loss"] = shd.to_host(loss)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            name = "/".join(map(str, path))
            out[f"{mesh_arg}/param/{name}"] = shd.to_host(v[...])
            out[f"{mesh_arg}/spec_after_step/{name}"] = np.array(str(v[...].sharding.spec))
    if a.process_id == 0:
        np.savez(a.out, **out)
    with open(f"{a.out}.{a.process_id}.json", "w") as f:
        json.dump({"read_bytes": read, "devices": jax.device_count(), "processes": jax.process_count()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
