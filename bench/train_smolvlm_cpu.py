"""Step time and MFU of `configs/smolvlm-256m-gpu.yaml` on this machine: a random SmolVLM-256M-shaped model
(config, char tokenizer and processor written offline), the config's own settings, synthetic shapes data.

    python bench/train_smolvlm_cpu.py [--steps 6] [--batch 2]
    python bench/train_smolvlm_cpu.py --preset tiny --steps 2 --batch 1   # smallest: the same program, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))  # reference.py

import reference as testing  # noqa: E402
from idefics_jax import PRESETS  # noqa: E402
from idefics_jax.convert import hf_files  # noqa: E402
from idefics_jax.train import config as config_lib, trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/bench-train-smolvlm")
    p.add_argument("--preset", default="smolvlm-256m", help="the model shape (tiny: a check of the script)")
    a = p.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    base = os.path.join(a.workdir, "base")
    os.makedirs(base)
    config = PRESETS[a.preset].replace(image_token_id=testing.IMAGE_TOKEN_ID)
    hf_files.write_model_files(base, config, testing.processor(config, tiles_per_side=2))
    cfg = config_lib.load("smolvlm-256m-gpu", [
        f"model={base}", f"workdir={a.workdir}/run", "data.train=shapes", "data.eval=", "eval_every=0",
        "data.num_records=64", f"data.batch_size={a.batch}", f"steps={a.steps}", "log_every=1", f"save_every={a.steps}",
        "data.length_buckets=[512,1024]",
        f"data.longest_edge={2 * config.vision.image_size}"])  # 2 x 2 tiles, as the processor above
    t = time.time()
    trainer.train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(a.workdir, "run", "metrics.jsonl"))]
    steady = rows[2:] or rows
    tps = sum(r["tokens_per_second"] for r in steady) / len(steady)
    print(f"{a.preset} model, SmolVLM-256M config on {os.cpu_count()} CPU cores: batch {a.batch}, "
          f"compute {cfg.compute_dtype}, remat {cfg.remat}")
    for r in rows:
        print(f"  step {r['step']}: loss {r['loss']:.3f}  {r['tokens_per_second']:8.1f} tok/s  MFU {r['mfu']:.2%}")
    print(f"steady state: {tps:.1f} tok/s, MFU {sum(r['mfu'] for r in steady) / len(steady):.2%}; "
          f"wall {time.time() - t:.0f} s for {a.steps} steps incl. compile")


if __name__ == "__main__":
    main()
