"""Bad checkpoints and faults during conversion and loading: one clear line, nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import idefics_jax
from idefics_jax.convert._safetensors import write_file
from idefics_jax import cli
import reference as testing
from idefics_jax.convert import hf_files


def run_cli(capsys, *args):
    code = cli.main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def assert_nothing_written(parent, keep):
    assert sorted(os.listdir(parent)) == sorted(keep), os.listdir(parent)


@pytest.fixture
def src(tiny_hf, tmp_path):
    return shutil.copytree(tiny_hf, str(tmp_path / "src"))


@pytest.fixture
def sharded_src(tiny_hf_sharded, tmp_path):
    return shutil.copytree(tiny_hf_sharded, str(tmp_path / "src"))


def _truncate(path):
    f = os.path.join(path, "model.safetensors")
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)


def _garbage_header(path):
    with open(os.path.join(path, "model.safetensors"), "r+b") as fh:
        fh.seek(8)
        fh.write(b"\x00garbage{{{")


def _edit_config(**changes):
    def edit(path):
        f = os.path.join(path, "config.json")
        d = json.load(open(f))
        for k, v in changes.items():
            target, key = (d["text_config"], k[5:]) if k.startswith("text_") else (d, k)
            target[key] = v
        json.dump(d, open(f, "w"))
    return edit


CASES = {
    "truncated shard": (_truncate, "model.safetensors: truncated"),
    "garbage header": (_garbage_header, "model.safetensors: corrupt header"),
    "missing config.json": (lambda p: os.remove(os.path.join(p, "config.json")), "config.json: missing"),
    "malformed config.json": (lambda p: open(os.path.join(p, "config.json"), "w").write("{\"model_type\": "),
                              "config.json: not valid JSON"),
    "shapes disagree": (_edit_config(text_hidden_size=64),
                        "proj.weight' has shape (48, 128), config.json implies (64, 128)"),
    "unsupported model_type": (_edit_config(model_type="llava"), "model_type 'llava' is not supported"),
    "missing tokenizer": (lambda p: os.remove(os.path.join(p, "tokenizer.json")), "no tokenizer files"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_source(case, src, tmp_path, capsys):
    damage, message = CASES[case]
    damage(src)
    code, line = run_cli(capsys, "convert", src, str(tmp_path / "dst"))
    assert code == 1
    assert line.startswith("idefics-jax convert: error: ") and message in line, line
    assert_nothing_written(tmp_path, ["src"])


def test_missing_shard(sharded_src, tmp_path, capsys):
    shard = sorted(f for f in os.listdir(sharded_src) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(sharded_src, shard))
    code, line = run_cli(capsys, "convert", sharded_src, str(tmp_path / "dst"))
    assert code == 1 and f"{shard}: missing shard" in line, line
    assert_nothing_written(tmp_path, ["src"])


def test_destination_exists(src, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "precious.txt").write_text("keep me")
    code, line = run_cli(capsys, "convert", src, str(tmp_path / "dst"))
    assert code == 1 and "destination already exists" in line
    assert os.listdir(tmp_path / "dst") == ["precious.txt"]


def test_debug_shows_traceback(src, tmp_path):
    _truncate(src)
    with pytest.raises(ValueError, match="truncated"):
        cli.main(["--debug", "convert", src, str(tmp_path / "dst")])


def test_full_disk(src, tmp_path, capsys):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code, line = run_cli(capsys, "convert", src, str(disk / "dst"))
        assert code == 1 and "no space left on device" in line, line
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)])


def test_sigkill_halfway_leaves_nothing_loadable(tmp_path):
    """Killed mid-write: the destination never appears, the partial directory is refused, a rerun succeeds."""
    src = str(tmp_path / "big")
    cfg = testing.tiny_config()
    big = cfg.replace(text=__import__("dataclasses").replace(cfg.text, vocab_size=400_000))
    _write_random_checkpoint(src, big)
    dst = str(tmp_path / "dst")
    proc = subprocess.Popen([sys.executable, "-m", "idefics_jax.cli", "convert", src, dst],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "converting:" in line:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(dst)
    partial = [p for p in os.listdir(tmp_path) if ".partial-" in p]
    assert partial, os.listdir(tmp_path)
    with pytest.raises(idefics_jax.CheckpointError):
        idefics_jax.load_pretrained(str(tmp_path / partial[0]))
    r = subprocess.run([sys.executable, "-m", "idefics_jax.cli", "convert", src, dst], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert idefics_jax.load_pretrained(dst).config.text.vocab_size == 400_000


def _write_random_checkpoint(path, config):
    from idefics_jax.convert import _names
    from idefics_jax.checkpoints.checkpoint import param_shapes

    os.makedirs(path)
    hf_files.write_config(path, idefics_jax.to_hf_dict(config))
    testing.char_tokenizer().save_pretrained(path)
    rng = np.random.default_rng(0)
    tensors = {e.hf_key: rng.standard_normal(e.hf_shape, dtype=np.float32)
               for e in _names.entries(config, param_shapes(config)).values()}
    write_file(os.path.join(path, "model.safetensors"), tensors)


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
    from idefics_jax.convert.hf_to_orbax import convert

    dst = str(tmp_path_factory.mktemp("orbax") / "tiny")
    convert(tiny_hf, dst, progress=False)
    return dst


def test_load_incomplete_checkpoint(converted, tmp_path):
    d = shutil.copytree(converted, str(tmp_path / "incomplete"))
    os.remove(os.path.join(d, "idefics_jax.json"))
    with pytest.raises(idefics_jax.CheckpointError, match="incomplete checkpoint"):
        idefics_jax.load_pretrained(d)


def test_load_checkpoint_of_another_model(converted, tmp_path):
    d = shutil.copytree(converted, str(tmp_path / "other"))
    _edit_config(text_intermediate_size=64)(d)
    with pytest.raises(idefics_jax.CheckpointError, match="parameters do not match config.json"):
        idefics_jax.load_pretrained(d)


def test_load_checkpoint_with_missing_arrays(converted, tmp_path):
    d = shutil.copytree(converted, str(tmp_path / "gutted"))
    state = os.path.join(d, "params", "state")
    for name in os.listdir(state):
        if name.startswith("ocdbt") or name == "d":
            shutil.rmtree(os.path.join(state, name))
    with pytest.raises(idefics_jax.CheckpointError, match="parameters missing or damaged"):
        idefics_jax.load_pretrained(d)


def test_load_not_a_checkpoint(tmp_path):
    with pytest.raises(idefics_jax.CheckpointError, match="neither an idefics-jax checkpoint"):
        idefics_jax.load_pretrained(str(tmp_path))
