"""Converter and exporter: bf16, the HF round trip, strict key and shape checks, the CLI."""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import assert_same_hf_weights, hf_logits, rel_err
from flax import nnx
from transformers import AutoModelForImageTextToText

import idefics_jax
from idefics_jax.convert import _names
from idefics_jax.convert.hf_to_orbax import convert
from idefics_jax.convert.orbax_to_hf import export


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("orbax") / "tiny")
    convert(tiny_hf, dst, progress=False)
    return dst


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_bf16_conversion(tiny_hf, tmp_path, cases):
    """bf16 weights are torch's own fp32->bf16 rounding, bit for bit. bf16 logits: the bound is relative to what
    the reference itself loses in bf16 (8 mantissa bits, ~4e-3 per rounding, compounded over the layers): our
    bf16 error against the fp32 reference must stay within 2x transformers' bf16 error against it, plus 1e-2."""
    dst = str(tmp_path / "bf16")
    convert(tiny_hf, dst, dtype="bfloat16", progress=False)
    model = idefics_jax.load_pretrained(dst)
    assert model.dtype == ml_dtypes.bfloat16
    ref = AutoModelForImageTextToText.from_pretrained(tiny_hf).eval()
    ours = _flat(model)
    theirs = {k: v.to(torch.bfloat16).float().numpy() for k, v in ref.state_dict().items()}
    for key, e in _names.entries(model.config, {k: v.shape for k, v in ours.items()}).items():
        y = ours[e.path] if e.layer is None else ours[e.path][e.layer]
        np.testing.assert_array_equal(e.transform.to_hf(y).astype(np.float32), theirs[key], err_msg=key)
    for case, inputs in cases.items():
        fp32 = hf_logits(ref, inputs)
        hf_bf16 = hf_logits(AutoModelForImageTextToText.from_pretrained(tiny_hf, dtype=torch.bfloat16).eval(), inputs)
        ours_bf16 = np.asarray(model(**inputs))
        ours_err = rel_err(ours_bf16, fp32, inputs["attention_mask"])
        hf_err = rel_err(hf_bf16, fp32, inputs["attention_mask"])
        print(f"{case}: bf16 rel err ours {ours_err:.2e}, transformers {hf_err:.2e}")
        assert ours_err <= 2 * hf_err + 1e-2


def test_export_round_trip(tiny_hf, converted, tmp_path, cases):
    """Orbax -> HF: transformers loads it, with the same tensors and the same logits."""
    out = str(tmp_path / "exported")
    export(converted, out, progress=False)
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))  # no temporary left behind
    assert_same_hf_weights(out, tiny_hf)
    back = AutoModelForImageTextToText.from_pretrained(out).eval()
    model = idefics_jax.load_pretrained(converted)
    for inputs in cases.values():
        assert rel_err(np.asarray(model(**inputs)), hf_logits(back, inputs), inputs["attention_mask"]) <= 1e-4


def test_export_sharded(converted, tmp_path, monkeypatch):
    import idefics_jax.convert.orbax_to_hf as ex

    monkeypatch.setattr(ex, "SHARD_BYTES", 100_000)
    out = str(tmp_path / "sharded")
    export(converted, out, progress=False)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    AutoModelForImageTextToText.from_pretrained(out)


def test_destination_is_side_by_side(converted):
    names = set(os.listdir(converted))
    assert {"config.json", "tokenizer.json", "processor_config.json", "params", "idefics_jax.json"} <= names
    assert not any(n.endswith(".safetensors") for n in names)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_leftover_key_fails(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _copy(tiny_hf, str(tmp_path / "extra"))
    t = load_file(os.path.join(src, "model.safetensors"))
    t["model.text_model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, os.path.join(src, "model.safetensors"))
    with pytest.raises(ValueError, match="does not use.*layers.7"):
        convert(src, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == ["extra"]


def test_missing_key_fails(tiny_hf, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _copy(tiny_hf, str(tmp_path / "missing"))
    t = load_file(os.path.join(src, "model.safetensors"))
    del t["model.vision_model.encoder.layers.1.mlp.fc2.bias"]
    save_file(t, os.path.join(src, "model.safetensors"))
    with pytest.raises(ValueError, match="lacks.*fc2.bias"):
        convert(src, str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == ["missing"]


def test_shape_mismatch_fails(tiny_hf, tmp_path):
    src = _copy(tiny_hf, str(tmp_path / "shapes"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["text_config"]["intermediate_size"] = 64
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight' has shape \\(96, 48\\).*\\(64, 48\\)"):
        convert(src, str(tmp_path / "out"), progress=False)


def test_cli_convert_and_errors(tiny_hf, tmp_path):
    dst = str(tmp_path / "cli")
    run = lambda *a: subprocess.run([sys.executable, "-m", "idefics_jax.cli", *a], capture_output=True, text=True)  # noqa: E731
    r = run("convert", tiny_hf, dst)
    assert r.returncode == 0, r.stderr
    assert "converting: 100%" in r.stderr
    idefics_jax.load_pretrained(dst)
    r = run("convert", tiny_hf, dst)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "already exists" in r.stderr
    assert "Traceback" not in r.stderr
