"""Quantized weights: codes and matmuls against numpy, checkpoints round-trip bit-exact and know their format,
sharded loads, the logits' error, QLoRA, export, and one-line errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import idefics_jax
from idefics_jax import cli
from idefics_jax.ops import int4_cpu as _int4_cpu
from idefics_jax.ops.matmul import matmul
from idefics_jax.checkpoints.checkpoint import META_FILE, quantized_format
from idefics_jax.convert.hf_to_orbax import convert
from idefics_jax.ops.quantize import QuantizedWeight, QuantizeError, group_size, quantize
from idefics_jax.train import config as config_lib
from idefics_jax.train import step as step_lib

import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_dequantize(q: QuantizedWeight) -> np.ndarray:
    """The documented layouts, decoded with numpy alone (no code shared with the package)."""
    values, scales = np.asarray(q.values), np.asarray(q.scales, np.float64)
    n_in = len(q.in_shape)
    if q.bits == 8:
        return values.astype(np.float64) * scales.reshape(*(1,) * n_in, *scales.shape)
    lo = (values & 15).astype(np.float64) - 8
    hi = (values >> 4).astype(np.float64) - 8
    w = np.concatenate([lo * scales, hi * scales], axis=1)  # (C/g, g, *out): low nibbles first in each group
    return w.reshape(*q.in_shape, *values.shape[2:])


@pytest.mark.parametrize("rows", [1, 6, 40])  # the integer path (decode, on the CPU) up to INT_ROWS, then dequantized
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-xla"])  # int4: the CPU kernel; int4-xla: XLA's group path
def test_matmul_matches_numpy_reference(fmt, rows, monkeypatch):
    if fmt == "int4":  # this machine has a C++ compiler: the kernel must build here, not fall back unnoticed
        assert _int4_cpu.available()
    else:
        monkeypatch.setattr(_int4_cpu, "available", lambda: False)
    fmt = fmt.removesuffix("-xla")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 16, 40)).astype(np.float32)  # (N, H, D): two contracted dims, as `o`
    x = rng.standard_normal((rows, 1, 6, 16)).astype(np.float32)
    q = quantize(w, 2, fmt, group=32 if fmt == "int4" else None)
    assert q.values.dtype == (np.int8 if fmt == "int8" else np.uint8)
    assert q.values.nbytes == w.size // (1 if fmt == "int8" else 2)
    deq = np_dequantize(q)
    # Round to nearest: every weight within half a step of its code (int8: per output channel over the whole
    # contraction; int4: per group of 32 contraction rows).
    if fmt == "int8":
        step = np.abs(w).max(axis=(0, 1)) / 127
    else:
        step = np.repeat(np.abs(w.reshape(3, 32, 40)).max(axis=1) / 7, 32, axis=0).reshape(6, 16, 40)
    assert np.all(np.abs(deq - w) <= step / 2 + 1e-6)
    np.testing.assert_allclose(np.asarray(q.dequantize()), deq, rtol=1e-6, atol=1e-7)
    want = np.einsum("BTNH,NHD->BTD", x.astype(np.float64), deq)
    got = np.asarray(matmul("BTNH,NHD->BTD", jnp.asarray(x), q))
    # fp32's own rounding, whichever path: the integer path's digits of x lose no more than that.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # bf16 inputs (two digits on the integer path; bf16 weights on the dequantized one): within bf16's rounding.
    xb = jnp.asarray(x, jnp.bfloat16)
    want_b = np.einsum("BTNH,NHD->BTD", np.asarray(xb, np.float64), deq)
    np.testing.assert_allclose(np.asarray(matmul("BTNH,NHD->BTD", xb, q), np.float64), want_b, rtol=0,
                               atol=2 ** -6 * np.abs(want_b).max())
    # Gradients (QLoRA trains through frozen quantized weights): those of the dequantized product.
    g = rng.standard_normal(want.shape).astype(np.float32)
    dx = jax.grad(lambda x: jnp.sum(matmul("BTNH,NHD->BTD", x, q) * g))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(dx), np.einsum("BTD,NHD->BTNH", g.astype(np.float64), deq), rtol=0,
                               atol=2e-6 * np.abs(dx).max())
    # A head-sized weight: the same numbers (the dequantized path multiplies it in column blocks).
    big = rng.standard_normal((64, 20000)).astype(np.float32)
    qb = quantize(big, 1, fmt, group=64 if fmt == "int4" else None)
    xb = rng.standard_normal((rows, 64)).astype(np.float32)
    want = xb.astype(np.float64) @ np_dequantize(qb)
    np.testing.assert_allclose(np.asarray(matmul("BD,DV->BV", jnp.asarray(xb), qb)), want, rtol=0,
                               atol=2e-6 * np.abs(want).max())


def test_group_sizes():
    assert group_size(576) == 64 and group_size(96) == 32 and group_size(4096) == 128 and group_size(48) == 16
    assert group_size(576, 192) == 192
    for bad in (100, 7, 0):
        with pytest.raises(QuantizeError, match=f"group size {bad} does not divide the contraction width 576"):
            group_size(576, bad, "w")


@pytest.fixture(scope="module")
def converted(tiny_hf, tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    out = {}
    for fmt in ("int8", "int4"):
        convert(tiny_hf, str(d / fmt), quantize=fmt, progress=False)
        out[fmt] = str(d / fmt)
    convert(tiny_hf, str(d / "fp32"), progress=False)
    out["fp32"] = str(d / "fp32")
    return out


def _params(model) -> dict:
    return {"/".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_checkpoint_round_trip_is_bit_exact_and_knows_its_format(tiny_hf, converted, fmt):
    with open(os.path.join(converted[fmt], META_FILE)) as f:
        assert json.load(f)["quantize"]["format"] == fmt
    stored = idefics_jax.load_pretrained(converted[fmt])  # no quantize= needed
    assert quantized_format(stored) == fmt
    for source in (tiny_hf, converted["fp32"]):  # quantized while loading: HF safetensors, Orbax
        fresh = idefics_jax.load_pretrained(source, quantize=fmt)
        a, b = _params(stored), _params(fresh)
        assert a.keys() == b.keys()
        n_quantized = 0
        for k in a:
            assert type(a[k]) is type(b[k]), k
            for x, y in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k])):
                assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), k
            n_quantized += isinstance(a[k], QuantizedWeight)
        # Every matmul weight but the patch embedding: decoder, vision, connector, head.
        assert n_quantized == 7 + 6 + 1 + 1
    assert isinstance(_params(stored)["text/layers/gate"], QuantizedWeight)
    assert not isinstance(_params(stored)["vision/patch_embed"], QuantizedWeight)


def test_logits_error_is_bounded_and_generation_runs(tiny_hf, converted, cases):
    """Relative error of the logits against fp32 (max |diff| / max |logit|, real tokens only)."""
    ref_model = idefics_jax.load_pretrained(converted["fp32"])
    inputs = cases["one_image_split_padded"]
    ref = np.asarray(ref_model(**inputs))
    errors = {}
    for fmt, bound in (("int8", 0.03), ("int4", 0.3)):
        model = idefics_jax.load_pretrained(converted[fmt])
        errors[fmt] = float(np.abs(np.asarray(model(**inputs)) - ref).max() / np.abs(ref).max())
        assert 0 < errors[fmt] < bound, (fmt, errors[fmt])
        # The decode loop (the CPU fast path included) gives the same first token as the model's own logits.
        out = idefics_jax.generate(model, **inputs, max_new_tokens=2, eos_token_id=[])
        first = np.asarray(model(**inputs))[0, -1].argmax()
        assert out[0, inputs["input_ids"].shape[1]] == first
    assert errors["int8"] < errors["int4"]
    print("logits rel err", errors)


def test_export_writes_dequantized_weights(converted, tmp_path, capfd, cases):
    dst = str(tmp_path / "hf")
    assert cli.main(["export", converted["int8"], dst]) == 0
    assert "int8 weights; writing them dequantized" in capfd.readouterr().err
    inputs = cases["text_only"]
    q = np.asarray(idefics_jax.load_pretrained(converted["int8"])(**inputs))
    back = np.asarray(idefics_jax.load_pretrained(dst)(**inputs))
    np.testing.assert_allclose(back, q, rtol=1e-4, atol=1e-4 * np.abs(q).max())


def test_bad_requests_get_one_line_errors(tiny_hf, tmp_path, capfd):
    dst = str(tmp_path / "out")
    for args, msg in ((["--quantize", "int3"], "quantize must be one of int8, int4; got 'int3'"),
                      (["--quantize", "int4", "--group-size", "10"], "group size 10 does not divide"),
                      (["--quantize", "int8", "--group-size", "16"], "a group size applies to int4 only")):
        assert cli.main(["convert", tiny_hf, dst, *args]) == 1
        err = capfd.readouterr().err.strip()
        assert err.startswith("idefics-jax convert: error: ") and msg in err and "\n" not in err, err
        assert not os.path.exists(dst) and not any(n.startswith(".out") for n in os.listdir(tmp_path))
    # generate and serve check the format before loading anything (the model named here does not exist).
    for cmd in (["generate", "--prompt", "hi"], ["serve"]):
        assert cli.main([*cmd, "--model", str(tmp_path / "absent"), "--quantize", "int3"]) == 1
        err = capfd.readouterr().err.strip()
        assert err == f"idefics-jax {cmd[0]}: error: quantize must be one of int8, int4; got 'int3'", err
    with pytest.raises(QuantizeError, match="quantize must be one of int8, int4; got 'fp8'"):
        idefics_jax.load_pretrained(tiny_hf, quantize="fp8")
    with pytest.raises(config_lib.ConfigError, match="quantize: 'int2'"):
        config_lib.load("tiny", ["quantize=int2"])


def test_qlora_trains_adapters_only(tiny_hf):
    from idefics_jax.train import collate, records
    from idefics_jax.shapes import task as shapes

    collator = collate.Collator.from_pretrained(tiny_hf, collate.CollateConfig(length_buckets=(256, 512), max_images=1))
    batch = collator.collate([collator.encode(records.from_dict(r))
                              for r in shapes.records(3, seed=5, questions_per_image=2)])
    model = idefics_jax.load_pretrained(tiny_hf, quantize="int4")
    lora = config_lib.LoraConfig(rank=4, alpha=8.0, targets=("text/layers/q", "text/layers/v", "text/layers/gate"))
    parts = step_lib.split(model, lora=lora, key=jax.random.key(1))
    assert set(parts.trainable) == set(lora.targets)
    assert isinstance(parts.frozen["text/layers/q"], QuantizedWeight)
    tx = optax.adam(1e-2)
    state = step_lib.init_state(parts.trainable, tx)
    before = jax.tree.map(np.asarray, state.trainable)
    frozen_before = jax.tree.map(lambda a: np.asarray(a).copy(), parts.frozen)
    step = step_lib.make_train_step(parts, tx, lora=lora)
    losses = []
    for _ in range(4):
        state, m = step(state, parts.frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0], losses
    for k in before:
        assert not np.array_equal(before[k]["b"], np.asarray(state.trainable[k]["b"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, parts.frozen), frozen_before)
    # Export merges the adapters into dequantized weights: the same logits as the adapted quantized model.
    from idefics_jax.train import lora as lora_lib

    inputs = {k: batch[k] for k in step_lib.MODEL_INPUTS}
    adapted = step_lib.merge(parts, lora_lib.apply(parts.frozen, state.trainable, lora)).forward(**inputs)
    merged = step_lib.merge(parts, lora_lib.apply(parts.frozen, state.trainable, lora, merge=True)).forward(**inputs)
    assert not isinstance(lora_lib.apply(parts.frozen, state.trainable, lora, merge=True)["text/layers/q"],
                          QuantizedWeight)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), rtol=1e-4,
                               atol=1e-4 * float(np.abs(np.asarray(adapted)).max()))
    # Without LoRA the quantized weights stay frozen and the rest (norms, embeddings, biases) trains.
    plain = step_lib.split(model)
    assert not any(isinstance(v, QuantizedWeight) for v in plain.trainable.values())
    assert "text/layers/attn_norm" in plain.trainable and isinstance(plain.frozen["text/layers/down"], QuantizedWeight)


SHARDED = r"""
import sys, json, numpy as np
from idefics_jax import load_pretrained
from idefics_jax.model import sharding
from idefics_jax.ops.quantize import QuantizedWeight
from flax import nnx
ckpt, fp32, out = sys.argv[1:4]
inputs = dict(np.load(sys.argv[4]))
res = {}
mesh = sharding.make_mesh((1, 2, 4))
for name, model in (("one", load_pretrained(ckpt)), ("mesh", load_pretrained(ckpt, mesh=mesh)),
                    ("mesh_quantize_on_load", load_pretrained(fp32, mesh=mesh, quantize="int4"))):
    res[name] = np.asarray(sharding.to_host(model(**inputs)))
    q = model.text.layers.gate.get_value()
    res[name + "_spec"] = np.array([str(getattr(a.sharding, "spec", "")) for a in (q.values, q.scales)])
np.savez(out, **res)
"""


def test_sharded_quantized_load_equals_one_device(converted, cases, tmp_path):
    inputs = cases["batch_1_and_2_images"]
    np.savez(tmp_path / "in.npz", **inputs)
    env = programs.env(8)
    subprocess.run([sys.executable, "-c", SHARDED, converted["int4"], converted["fp32"], str(tmp_path / "out.npz"),
                    str(tmp_path / "in.npz")], check=True, env=env, cwd=ROOT, timeout=600)
    r = np.load(tmp_path / "out.npz")
    one = r["one"]
    for name in ("mesh", "mesh_quantize_on_load"):
        np.testing.assert_allclose(r[name], one, rtol=1e-5, atol=1e-5 * np.abs(one).max(), err_msg=name)
        # gate (layers, C/g, g/2, mlp) and its scales: the mlp axis split over tensor, as the weight's is.
        values_spec, scales_spec = r[name + "_spec"]
        assert "tensor" in values_spec and "tensor" in scales_spec, (values_spec, scales_spec)


def test_qlora_run_evaluates_and_exports(tmp_path):
    """`quantize: int4` in a training config: the run's base is quantized and frozen, evaluation generates with the
    adapted quantized model, and export writes the adapters merged into dequantized weights."""
    from idefics_jax.train import loading, trainer

    run, dst = str(tmp_path / "run"), str(tmp_path / "hf")
    cfg = config_lib.load("tiny", [f"workdir={run}", "steps=3", "log_every=1", "save_every=3", "eval_every=3",
                                   "eval_batches=1", "data.num_records=24", "data.batch_size=4", "quantize=int4",
                                   "lora.rank=4", "lora.alpha=8"])
    assert quantized_format(loading.load_model(cfg, None)[0]) == "int4"
    last = trainer.train(cfg)
    assert 0.0 <= last["eval_exact_match"] <= 1.0 and np.isfinite(last["eval_loss"])
    trained, _ = loading.trained_model(run)
    want = _params(trained)
    # The adapted weights merged into full precision; the others still quantized (export dequantizes them).
    assert not isinstance(want["text/layers/q"], QuantizedWeight)
    assert isinstance(want["text/layers/up"], QuantizedWeight)
    # As `generate --model WORKDIR --dtype bfloat16` loads it: full-precision weights cast, the quantized base
    # kept, and the run's generation defaults (the shapes tokenizer's end token) carried over.
    chat = loading.load_chat(run, dtype=jnp.bfloat16)
    got = _params(chat.model)
    assert got["text/layers/q"].dtype == jnp.bfloat16
    up = got["text/layers/up"]
    assert up.format == "int4" and up.values.dtype == want["text/layers/up"].values.dtype
    assert chat.model.generation_defaults == trained.generation_defaults and trained.generation_defaults.eos_token_ids
    assert cli.main(["export", run, dst]) == 0
    back = _params(idefics_jax.load_pretrained(dst))
    assert back.keys() == want.keys()
    for k, w in want.items():
        w = w.dequantize() if isinstance(w, QuantizedWeight) else w
        np.testing.assert_array_equal(np.asarray(back[k]), np.asarray(w), err_msg=k)
