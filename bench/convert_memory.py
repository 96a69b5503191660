"""Converter peak memory: a random fp32 checkpoint of a real shape (>= 1 GB), converted by the CLI under
`/usr/bin/time -v`; prints peak RSS next to the output size.

    python bench/convert_memory.py [--preset smolvlm-256m] [--shards 3] [--workdir /tmp/convert-bench]
    python bench/convert_memory.py --preset tiny --shards 2 --workdir /tmp/smoke    # smallest: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from idefics_jax.convert.hf_to_orbax import hf_tensor_shapes
from idefics_jax.convert.orbax_to_hf import write_safetensors
from idefics_jax import PRESETS, to_hf_dict
from idefics_jax.convert.hf_files import char_tokenizer


def write_random_checkpoint(path: str, preset: str, shards: int) -> int:
    """HF-layout checkpoint with random fp32 weights, written shard by shard (never the whole model in memory)."""
    config = PRESETS[preset]
    os.makedirs(path)
    d = to_hf_dict(config)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    char_tokenizer().save_pretrained(path)  # the converter insists on tokenizer files
    entries = list(hf_tensor_shapes(config).items())
    rng = np.random.default_rng(0)
    per = -(-len(entries) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: rng.standard_normal(shape, dtype=np.float32) * 0.02 for k, shape in entries[s * per:(s + 1) * per]}
        write_safetensors(os.path.join(path, name), part)
        weight_map.update({k: name for k in part})
        total += sum(v.nbytes for v in part.values())
        del part
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="smolvlm-256m")
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--workdir", default="/tmp/convert-bench")
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    src, dst = os.path.join(a.workdir, "hf"), os.path.join(a.workdir, "orbax")
    size = write_random_checkpoint(src, a.preset, a.shards)
    t0 = time.time()
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "idefics_jax.cli", "convert", src, dst,
                        "--dtype", a.dtype], capture_output=True, text=True)
    secs = time.time() - t0
    if r.returncode:
        sys.exit(r.stderr)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    out = du(os.path.join(dst, "params"))
    # The interpreter with jax, flax and orbax imported, doing nothing: the fixed part of the peak.
    base = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", "import idefics_jax.convert.hf_to_orbax"],
                          capture_output=True, text=True)
    base_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", base.stderr).group(1)) * 1024
    gb = 1e9
    print(f"preset {a.preset}, {a.shards} shards, {a.dtype} output")
    print(f"input safetensors     {size / gb:8.3f} GB")
    print(f"output orbax params   {out / gb:8.3f} GB")
    print(f"converter peak RSS    {rss / gb:8.3f} GB  = {rss / out:.2f} x output")
    print(f"  of which imports    {base_rss / gb:8.3f} GB  (peak minus imports: {(rss - base_rss) / out:.2f} x output)")
    print(f"wall time             {secs:8.1f} s")


if __name__ == "__main__":
    main()
