"""What a newcomer runs first: every Python snippet of the README, and every bench/ script at its smallest setting.

The README's snippets run in order in one fresh interpreter (a later snippet uses what an earlier one made, as in
a notebook), on 8 simulated devices (the sharding snippet builds an FSDP + tensor-parallel mesh), in a scratch
folder where the names the README uses for real checkpoints and photos stand for small real files:

| README name | what the test puts there |
| --- | --- |
| `idefics3-8b-orbax` | the shipped tiny-shapes model converted to Orbax with `idefics-jax convert` |
| `statue.jpg`, `skyline.jpg`, `a.jpg`, `b.jpg` | the shipped example images `shapes-1/2/3.png`, saved as JPEG |

Nothing else is changed: the snippets' text runs as printed.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
CHECKPOINTS = ["idefics3-8b-orbax"]
PHOTOS = {"statue.jpg": "shapes-1.png", "skyline.jpg": "shapes-2.png", "a.jpg": "shapes-3.png", "b.jpg": "shapes-1.png"}
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"


def readme_snippets() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder holding the stand-ins of the substitution table above."""
    import PIL.Image

    from idefics_jax.checkpoints.registry import resolve
    from idefics_jax.convert.hf_to_orbax import convert

    d = tmp_path_factory.mktemp("readme")
    shipped = resolve("tiny-shapes")
    for name in CHECKPOINTS:
        convert(shipped, str(d / name), progress=False)
    for name, example in PHOTOS.items():
        PIL.Image.open(os.path.join(shipped, "examples", example)).convert("RGB").save(d / name, quality=95)
    return d


def test_readme_snippets_run(scratch):
    snippets = readme_snippets()
    assert len(snippets) >= 5
    # Every file name the snippets open is in the substitution table.
    named = set(re.findall(r'"([\w.-]+\.(?:jpg|png))"', "".join(snippets)))
    assert named <= set(PHOTOS) | {"shapes-2.png", "shapes-3.png"}, named
    script = scratch / "readme.py"
    script.write_text("\n".join(f"# --- snippet {i}\n{s}" for i, s in enumerate(snippets)))
    r = subprocess.run([sys.executable, str(script)], cwd=scratch, capture_output=True, text=True, timeout=600,
                       env=_env(XLA_FLAGS=EIGHT_DEVICES))
    assert r.returncode == 0, r.stderr[-3000:]
    # The tiny-shapes snippet prints what its comments say.
    assert r.stdout.splitlines()[:2] == ["4", "green"], r.stdout


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
                       text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert expected in r.stdout, r.stdout[-3000:]
