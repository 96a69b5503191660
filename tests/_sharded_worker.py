"""Runs the model on simulated CPU devices in a fresh process (jax must see 8 devices before it is imported).

    python tests/_sharded_worker.py CKPT INPUTS.npz OUT --mesh one --mesh 2,2,2 [--read-check CKPT2] [--hf DIR]
    python tests/_sharded_worker.py CKPT INPUTS.npz OUT --mesh 1,8,1 --process-id I --num-processes 2 --port P

`--mesh one` is the plain single-device model; `D,F,T` a (data, fsdp, tensor) mesh over all 8 devices of all
processes (`sharding.make_mesh`: Auto axes); `name=size,...` a mesh made the ordinary way, `jax.make_mesh(sizes,
names)` (Explicit axes by default), with any of the axis names. INPUTS holds `<case>/<key>` processor arrays, and
`train/<key>` a batch with labels. For each mesh, OUT.npz gets under `<mesh>/`: the logits of every case, the loss
and updated parameters of one AdamW step (`param/<path>`; `param_before/<path>` for `one`), the partition spec of
every parameter before and after the step, and the parameter bytes on each device of this process; on meshes,
`prefill/` holds the text-only case's logits through a KV cache allocated on the mesh, and that cache's partition
spec; for the meshes named by `--generate`, `generate/batch8` holds the greedy tokens `generate` returns for that
case. With several processes each one starts the same program, as on a TPU pod; process 0 writes OUT.npz. Every
process writes OUT.<process>.json with the bytes it read from disk to load CKPT2 on a (1, 8, 1) mesh.

XLA's backend optimisation is off: it divides compile time by about three, and every run here shares it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def _read_bytes() -> int:
    """Bytes this process has read through read(2) and pread(2) so far (Linux)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _prefill(model, batch):
    """The prompt run through the decoder into a KV cache allocated on the model's mesh -> (logits, cache)."""
    import jax.numpy as jnp
    from flax import nnx

    from idefics_jax import KVCache
    from idefics_jax.model.idefics import positions_from_mask

    @nnx.jit
    def run(model, ids, attention_mask):
        T, S = ids.shape[1], ids.shape[1] + 4
        cache = KVCache.zeros(model.config.text, ids.shape[0], S, model.dtype, model.partitioning)
        slots = jnp.pad(attention_mask, ((0, 0), (0, S - T))).astype(bool)
        mask = (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None])[None] & slots[:, None, :]
        h, cache = model.text(model.embed(ids), positions_from_mask(attention_mask), mask, cache, 0)
        return model.lm_logits(h), cache

    return run(model, batch["input_ids"], batch["attention_mask"])


def _make_mesh(arg: str):
    import jax

    from idefics_jax.model import sharding as shd

    if arg == "one":
        return None
    if "=" in arg:
        names, sizes = zip(*(part.split("=") for part in arg.split(",")))
        return jax.make_mesh(tuple(map(int, sizes)), names)
    return shd.make_mesh(tuple(int(s) for s in arg.split(",")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("inputs")
    p.add_argument("out")
    p.add_argument("--mesh", action="append", required=True, help="'one', data,fsdp,tensor or name=size,...")
    p.add_argument("--generate", action="append", default=[], help="a --mesh to run `generate` on too")
    p.add_argument("--read-check", help="a checkpoint to load on a (1, 8, 1) mesh, counting the bytes read")
    p.add_argument("--hf", help="an HF directory to load on a (2, 2, 2) mesh (converted in memory); OUT gets "
                   "`hf/<case>/logits`")
    p.add_argument("--process-id", type=int, default=0)
    p.add_argument("--num-processes", type=int, default=1)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)

    local = DEVICES // a.num_processes
    os.environ["XLA_FLAGS"] = programs.xla_flags(local)
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, ROOT)
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if a.num_processes > 1:
        # CPU collectives between processes go through gloo. On TPU VMs `jax.distributed.initialize()` needs no
        # arguments at all; here the coordinator is on the loopback address.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{a.port}", num_processes=a.num_processes, process_id=a.process_id)
    import numpy as np
    import optax
    from flax import nnx

    import idefics_jax
    from idefics_jax.model import sharding as shd
    from idefics_jax.train import step as train

    inputs: dict[str, dict] = {}
    with np.load(a.inputs) as z:
        for key in z.files:
            case, name = key.split("/")
            inputs.setdefault(case, {})[name] = z[key]

    out: dict[str, np.ndarray] = {}
    for mesh_arg in a.mesh:
        mesh = _make_mesh(mesh_arg)
        model = idefics_jax.load_pretrained(a.ckpt, mesh=mesh)
        for case, batch in inputs.items():
            if case != "train":
                out[f"{mesh_arg}/{case}/logits"] = shd.to_host(model(**batch))
        if mesh_arg in a.generate:
            out[f"{mesh_arg}/generate/batch8"] = idefics_jax.generate(model, **inputs["batch8"], max_new_tokens=3)
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            name = "/".join(map(str, path))
            out[f"{mesh_arg}/spec/{name}"] = np.array(str(getattr(v[...].sharding, "spec", "")))
            if mesh is None:
                out[f"{mesh_arg}/param_before/{name}"] = shd.to_host(v[...])
        per_device = shd.param_bytes_per_device(model)
        out[f"{mesh_arg}/bytes_per_device"] = np.array([per_device.get(d, 0) for d in jax.local_devices()], np.int64)
        if mesh is not None:
            logits, cache = _prefill(model, inputs["text_only"])
            out[f"{mesh_arg}/prefill/logits"] = shd.to_host(logits)
            out[f"{mesh_arg}/prefill/cache_spec"] = np.array(str(cache.k.sharding.spec))
        # eps well above rounding noise: Adam divides each gradient by its own magnitude, so a parameter whose
        # gradient is exactly zero in theory (a key bias: softmax ignores a shift shared by all keys) would
        # otherwise move by a different +-lr on each layout.
        tx = optax.adamw(1e-4, weight_decay=0.1, eps=1e-6)
        parts = train.split(model)
        state = train.init_state(parts.trainable, tx)
        # Each process feeds its own rows of the global batch (as the trainer's data loader does).
        rows = len(inputs["train"]["input_ids"]) // jax.process_count()
        mine = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in inputs["train"].items()}
        batch = train.put_batch(mine, model.partitioning)
        state, metrics = train.make_train_step(parts, tx)(state, parts.frozen, batch)
        out[f"{mesh_arg}/loss"] = shd.to_host(metrics["loss"])
        for name, v in state.trainable.items():
            out[f"{mesh_arg}/param/{name}"] = shd.to_host(v)
            out[f"{mesh_arg}/spec_after_step/{name}"] = np.array(str(getattr(v.sharding, "spec", "")))
        del model, state, parts

    if a.hf:
        model = idefics_jax.load_pretrained(a.hf, mesh=shd.make_mesh((2, 2, 2)))
        for case, batch in inputs.items():
            if case != "train":
                out[f"hf/{case}/logits"] = shd.to_host(model(**batch))
    read = None
    if a.read_check:
        mesh = shd.make_mesh((1, DEVICES, 1))
        idefics_jax.load_pretrained(a.read_check, mesh=mesh)  # first load: imports and opens what loading needs
        before = _read_bytes()
        idefics_jax.load_pretrained(a.read_check, mesh=mesh)
        read = _read_bytes() - before
    if a.process_id == 0:
        np.savez(a.out + ".npz", **out)
    with open(f"{a.out}.{a.process_id}.json", "w") as f:
        json.dump({"read_bytes": read, "devices": jax.device_count(), "processes": jax.process_count()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
