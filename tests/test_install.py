"""The built wheel, installed as a user installs it, in a project folder of a user's own.

`pip wheel . --no-deps` must hold one top-level package, `idefics_jax`. Installed (not editable) into a fresh
virtual environment, it must work from a folder that has its own `configs/` package, `train.py` and `convert.py`
(most ML projects do): the package must not import any of them, nor need the repository.
"""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The user's own modules: importing any of them instead of the package's fails loudly.
USER_FILES = {
    "configs/__init__.py": "raise ImportError('the user project configs package was imported')\n",
    "train.py": "raise ImportError('the user project train.py was imported')\n",
    "convert.py": "raise ImportError('the user project convert.py was imported')\n",
}
SKIP = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "out", ".pytest_cache", ".venv")


def _run(cmd, cwd, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**env, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """`pip wheel . --no-deps`, built from a copy of the repository (a build writes into the source tree)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp / "dist")], cwd=tmp)
    (path,) = (tmp / "dist").glob("*.whl")
    return str(path)


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel installed, not editable; dependencies come from the
    interpreter running the tests (its system site-packages, and its own site-packages listed after the venv's)."""
    v = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(v)], cwd=v.parent)
    python = str(v / "bin" / "python")
    venv_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=v).strip()
    # Path lines only: .pth files in these folders (an editable install's finder) are not run.
    runner_sites = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if p != venv_site]
    with open(os.path.join(venv_site, "zz_test_runner_site.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(runner_sites)) + "\n")
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", wheel], cwd=v.parent)
    return v


@pytest.fixture(scope="module")
def project(venv, tmp_path_factory):
    d = tmp_path_factory.mktemp("user-project")
    for name, text in USER_FILES.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


def test_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert z.read(top_level).decode().split() == ["idefics_jax"]
    dist_info = {n.split("/")[0] for n in names if ".dist-info/" in n}
    assert {n.split("/")[0] for n in names} - dist_info == {"idefics_jax"}
    # The shipped configs and model travel with it.
    assert {"idefics_jax/configs/tiny.yaml", "idefics_jax/models/tiny-shapes/model.safetensors",
            "idefics_jax/models/tiny-shapes/examples/shapes-1.png", "idefics_jax/train/trainer.py",
            "idefics_jax/convert/hf_to_orbax.py", "idefics_jax/ops/int4_cpu.cc"} <= set(names)


def test_import_and_load_from_a_user_project(venv, project):
    code = ("import sys, idefics_jax\n"
            f"assert idefics_jax.__file__.startswith({str(venv)!r}), idefics_jax.__file__\n"
            "model = idefics_jax.load_pretrained('tiny-shapes')\n"
            "assert not {'configs', 'train', 'convert'} & set(sys.modules), 'a user module was imported'\n"
            "print(type(model).__name__, model.config.text.num_layers)\n")
    out = _run([str(venv / "bin" / "python"), "-c", code], cwd=project)
    assert out.split() == ["IdeficsModel", "4"]


def test_cli_generate_from_a_user_project(venv, project):
    examples = _run([str(venv / "bin" / "python"), "-c",
                     "import idefics_jax; print(idefics_jax.resolve('tiny-shapes'))"], cwd=project).strip()
    examples = os.path.join(examples, "examples")
    assert examples.startswith(str(venv))
    with open(os.path.join(examples, "questions.json")) as f:
        ex = json.load(f)[0]
    question, answer = ex["questions"][0]["text"], ex["questions"][0]["answer"]
    out = _run([str(venv / "bin" / "idefics-jax"), "generate", "--image", os.path.join(examples, ex["image"]),
                "--prompt", question], cwd=project)
    assert out.strip() == answer


def test_cli_train_a_shipped_config_from_a_user_project(venv, project):
    out = _run([str(venv / "bin" / "idefics-jax"), "train", "tiny", "workdir=W", "steps=3"], cwd=project)
    rows = [json.loads(line) for line in open(project / "W" / "metrics.jsonl")]
    assert max(r["step"] for r in rows) == 3, (out, rows)


# Imported only where the package compares itself with transformers' PyTorch models (testing, demo,
# shapes_eval's agreement rate): the test extra brings it.
TEST_ONLY = {"torch"}
# Imported lazily, where a feature needs them, and declared in the optional extra of that name.
OPTIONAL = {"wandb"}


def test_every_import_is_a_declared_dependency():
    import ast
    import re
    import tomllib
    from importlib.metadata import packages_distributions

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    declared = {norm(re.match(r"[\w.-]+", d).group()) for d in project["dependencies"]}
    imported = set()
    for folder in ("idefics_jax", "convert", "train", "configs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    tree = ast.parse(open(os.path.join(dirpath, name)).read())
                    imported |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                                 for a in n.names}
                    imported |= {n.module.split(".")[0] for n in ast.walk(tree)
                                 if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
    third_party = imported - set(sys.stdlib_module_names) - {"idefics_jax"} - TEST_ONLY - OPTIONAL
    for m in OPTIONAL:
        assert any(norm(d).startswith(m) for d in project["optional-dependencies"][m]), m
    dists = packages_distributions()
    undeclared = {m: dists.get(m) for m in third_party if not {norm(d) for d in dists.get(m, [])} & declared}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    assert "pyyaml" in declared and "jinja2" in declared  # yaml configs; chat templates (imported by transformers)
