"""The notebooks run top to bottom on the CPU, offline, with the shipped model (as CI and a fresh clone do):
IDEFICS_JAX_MODEL=tiny-shapes, HF_HUB_OFFLINE=1 (their install and hub-push cells skip themselves)."""

import json
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(name, tmp_path, monkeypatch, env) -> list[str]:
    monkeypatch.setenv("IDEFICS_JAX_MODEL", "tiny-shapes")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for k, v in env.items():  # the kernel inherits them
        monkeypatch.setenv(k, v)
    nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return ["".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stdout"]


def test_quickstart(tmp_path, monkeypatch, program_env):
    out = "\n".join(run("quickstart", tmp_path, monkeypatch, program_env))
    assert "install skipped" in out and "CpuDevice" in out and "float32" in out
    assert "square" in out  # the streamed answer about shapes-1.png
    assert "shapes-3.png: What color is the triangle? -> green" in out  # the batch
    assert "prefill:" in out and "decode:" in out and "smolvlm-256m" in out


def test_finetune(tmp_path, monkeypatch, program_env):
    out = "\n".join(run("finetune", tmp_path, monkeypatch, program_env))
    assert "step 20/20 loss" in out and "exact match on 32 held-out questions: before" in out
    assert "hub push skipped" in out
    work = tmp_path / "finetune-work"
    assert len([json.loads(x) for x in open(work / "run" / "metrics.jsonl")]) == 20
    assert (work / "exported" / "model.safetensors").exists() and (work / "exported" / "config.json").exists()


def test_notebooks_follow_colab_conventions():
    for name in ("quickstart", "finetune"):
        nb = nbformat.read(os.path.join(ROOT, "notebooks", f"{name}.ipynb"), as_version=4)
        assert "colab.research.google.com/github/" in nb.cells[0].source and name in nb.cells[0].source
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        for needed in ("jax.devices()", "make_mesh", "IDEFICS_JAX_MODEL", "HuggingFaceTB/SmolVLM-256M-Instruct",
                       "jnp.bfloat16", "jax=="):
            assert needed in src, (name, needed)
