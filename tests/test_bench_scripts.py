"""Every bench/ script runs at its smallest setting, from a folder of its own (as a newcomer runs it from a clone),
and prints the line its table is built from. The numbers of these settings mean nothing; the scripts run."""

import os
import subprocess
import sys

import pytest

import programs

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")

# Each script with the arguments of its smallest setting and a line its output must hold.
SMALLEST = {
    "compile_time.py": (["--preset", "tiny", "--images", "1", "--tokens", "32"], "2 + 2 layers"),
    "convert_memory.py": (["--preset", "tiny", "--shards", "2", "--workdir", "{tmp}"], "converter peak RSS"),
    "eval.py": (["--smoke", "--workdir", "{tmp}"], "transformers generate loop"),
    "eval_tiny_shapes.py": (["--images", "2"], "transformers agrees on"),
    "generate.py": (["--smoke", "--workdir", "{tmp}"], "jax / best hf"),
    "memory_plan.py": (["--smoke"], "| 8 simulated devices (8 × 16 GiB) | fine-tune, fp32 params + AdamW | (1, 8, 1)"),
    "packing.py": (["--smoke"], "packed / bucketed real tokens/s:"),
    "quantize.py": (["speed", "--smoke", "--workdir", "{tmp}"], "logits rel err"),
    "serve.py": (["--smoke"], "requests, answers"),
    "structured.py": (["--smoke", "--workdir", "{tmp}"], "valid (parsed and validated with jsonschema): 5/5"),
    "tpu_plan.py": (["--smoke"], "sharding checks passed: no weight all-gather"),
    "train_step.py": (["--smoke"], "ours / torch speed:"),
    "train_smolvlm_cpu.py": (["--preset", "tiny", "--steps", "2", "--batch", "1", "--workdir", "{tmp}"],
                             "steady state:"),
}


def test_every_bench_script_has_a_smallest_setting():
    assert sorted(f for f in os.listdir(BENCH) if f.endswith(".py")) == sorted(SMALLEST)


@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_bench_script_runs(script, tmp_path):
    args, expected = SMALLEST[script]
    args = [a.replace("{tmp}", str(tmp_path / "work")) for a in args]
    # From a folder of its own, as a newcomer runs it from a clone; nothing is written into the repository.
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=programs.env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert expected in r.stdout, r.stdout[-3000:]
