"""Fine-tuning: loss and gradients against transformers, LoRA and freezing, the training program, exact resume."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from transformers import AutoModelForImageTextToText

import idefics_jax
from idefics_jax.convert import _names
from idefics_jax.train import config as config_lib
from idefics_jax.train import loading, step as step_lib, tfds_builder, trainer
from idefics_jax.shapes import task as shapes
from idefics_jax.train.collate import CollateConfig, Collator
from idefics_jax.train.records import from_dict


@pytest.fixture(scope="module")
def batch(tiny_hf):
    collator = Collator.from_pretrained(tiny_hf, CollateConfig(length_buckets=(256, 512), max_images=1))
    examples = [collator.encode(from_dict(r)) for r in shapes.records(3, seed=5, questions_per_image=2)]
    return collator.collate(examples)


def test_loss_and_gradients_match_transformers(tiny_hf, batch):
    """fp32, labels only on assistant tokens: the same loss and the same gradient for every parameter."""
    assert (batch["labels"] != -100).sum() < (batch["attention_mask"] == 1).sum() / 4
    model = idefics_jax.load_pretrained(tiny_hf)
    parts = step_lib.split(model)

    def loss(trainable):
        t, c = step_lib._loss(parts, trainable, parts.frozen, batch, compute_dtype=None, remat="none", lora=None)
        return t / c

    ours, grads = jax.value_and_grad(loss)(parts.trainable)
    ref = AutoModelForImageTextToText.from_pretrained(tiny_hf).train()
    out = ref(**{k: torch.from_numpy(np.asarray(v)).long() if k in ("input_ids", "attention_mask", "labels")
                 else torch.from_numpy(np.asarray(v)) for k, v in batch.items()})
    out.loss.backward()
    assert abs(float(ours) - out.loss.item()) <= 1e-5 * out.loss.item()
    theirs = dict(ref.named_parameters())
    # Some gradients are zero in exact arithmetic (a key bias: softmax ignores a shift shared by all keys), so both
    # sides hold rounding noise there; measure each against the larger of its own scale and the model's.
    floor = 1e-4 * max(p.grad.abs().max().item() for p in theirs.values())
    worst = 0.0
    for key, e in _names.entries(model.config, {p: v.shape for p, v in grads.items()}).items():
        g = np.asarray(grads[e.path] if e.layer is None else grads[e.path][e.layer])
        t = theirs[key].grad.numpy()
        err = np.abs(e.transform.to_hf(g) - t).max() / max(np.abs(t).max(), floor)
        worst = max(worst, err)
        assert err <= 1e-4, key
    print(f"loss {float(ours):.6f} vs {out.loss.item():.6f}; worst gradient rel err {worst:.1e}")


def test_chunked_loss_equals_full_logits_loss_and_gradients():
    """The loss over token chunks (custom VJP, no (B, T, V) logits) against optax over the whole logits."""
    kh, kw, kl = jax.random.split(jax.random.key(3), 3)
    h = jax.random.normal(kh, (3, 50, 16), jnp.float32)
    w = jax.random.normal(kw, (16, 97), jnp.float32) * 0.3
    labels = jax.random.randint(kl, (3, 50), 0, 97).at[:, :7].set(-100).at[2, 30:].set(-100)

    def full(h, w):
        t, c = step_lib.cross_entropy(jnp.einsum("BTD,DV->BTV", h, w), labels)
        return t / c

    def chunked(h, w):
        t, c = step_lib.chunked_cross_entropy(h, w, labels, chunk=32)  # 147 tokens: 5 chunks, the last padded
        return t / c

    (a, ga), (b, gb) = (jax.value_and_grad(f, argnums=(0, 1))(h, w) for f in (full, chunked))
    assert abs(float(a) - float(b)) <= 1e-6 * abs(float(a))
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6 * float(jnp.abs(x).max()))
    jaxpr = str(jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)))(h, w))
    assert "3,50,97" not in jaxpr.replace(" ", "") and "150,97" not in jaxpr.replace(" ", "")


def test_lora_trains_adapters_only_and_frozen_parts_stay(tiny_hf, batch):
    model = idefics_jax.load_pretrained(tiny_hf)
    lora = config_lib.LoraConfig(rank=4, alpha=8.0)
    parts = step_lib.split(model, lora=lora, key=jax.random.key(1))
    assert set(parts.trainable) == set(lora.targets)
    tx = optax.adam(1e-2)
    state = step_lib.init_state(parts.trainable, tx)
    before = jax.tree.map(np.asarray, state.trainable)
    frozen_before = {k: np.asarray(v).copy() for k, v in parts.frozen.items()}
    step = step_lib.make_train_step(parts, tx, lora=lora)
    losses = []
    for _ in range(3):
        state, m = step(state, parts.frozen, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0]
    for k in before:
        assert not np.array_equal(before[k]["b"], np.asarray(state.trainable[k]["b"]))
    for k, v in parts.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), frozen_before[k], err_msg=k)


def test_step_compiles_once_over_three_steps(tiny_hf, batch):
    """The first state is committed like the step's outputs, so steps 2 and 3 reuse step 1's executable."""
    parts = step_lib.split(idefics_jax.load_pretrained(tiny_hf))
    tx = optax.adamw(1e-3)
    step = step_lib.make_train_step(parts, tx)
    state = step_lib.init_state(parts.trainable, tx)
    with jax.log_compiles(True):
        for _ in range(3):
            state, m = step(state, parts.frozen, step_lib.put_batch(batch, None))
            float(m["grad_norm"])
    assert step._cache_size() == 1


def test_frozen_vision_stays_bit_identical(tiny_hf, batch):
    model = idefics_jax.load_pretrained(tiny_hf)
    parts = step_lib.split(model, freeze=("vision", "connector"))
    assert parts.frozen and all(k.startswith(("vision/", "connector/")) for k in parts.frozen)
    assert not any(k.startswith(("vision/", "connector/")) for k in parts.trainable)
    frozen_before = {k: np.asarray(v).copy() for k, v in parts.frozen.items()}
    tx = optax.adam(1e-2)
    state = step_lib.init_state(parts.trainable, tx)
    state, _ = step_lib.make_train_step(parts, tx)(state, parts.frozen, batch)
    for k, v in parts.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), frozen_before[k], err_msg=k)


def test_gradient_accumulation_equals_one_big_batch(tiny_hf, batch):
    model = idefics_jax.load_pretrained(tiny_hf)
    parts = step_lib.split(model)
    tx = optax.sgd(0.1)
    big = {k: np.concatenate([v, v[::-1]]) for k, v in batch.items()}
    one, m1 = step_lib.make_train_step(parts, tx)(step_lib.init_state(parts.trainable, tx), parts.frozen, big)
    parts2 = step_lib.split(idefics_jax.load_pretrained(tiny_hf))
    acc, m2 = step_lib.make_train_step(parts2, tx, grad_accum=2)(step_lib.init_state(parts2.trainable, tx),
                                                                  parts2.frozen, big)
    assert abs(float(m1["loss"]) - float(m2["loss"])) <= 1e-6
    for k in one.trainable:
        np.testing.assert_allclose(np.asarray(one.trainable[k]), np.asarray(acc.trainable[k]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data") / "shapes")
    tfds_builder.build(d, {"train": tfds_builder.GeneratedSource(lambda: shapes.records(96, seed=11))})
    return d


def _overrides(workdir, data, steps):
    return [f"workdir={workdir}", f"data.train={data}", f"steps={steps}", "log_every=1", "save_every=4",
            "data.eval=", "eval_every=0", "data.batch_size=4", "optim.warmup_steps=2", "optim.learning_rate=3e-3"]


def rows_first_loss(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return json.loads(f.readline())["loss"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss"] for m in map(json.loads, f)}


def test_loss_falls_and_metrics_are_written(tmp_path, shapes_data):
    cfg = config_lib.load("configs/tiny.yaml", _overrides(tmp_path / "run", shapes_data, 16)
                          + [f"data.eval={shapes_data}:train", "eval_every=16", "eval_batches=1"])
    last = trainer.train(cfg)
    assert 0.0 <= last["eval_exact_match"] <= 1.0 and last["eval_loss"] < rows_first_loss(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert {"step", "loss", "learning_rate", "tokens_per_second", "mfu"} <= set(rows[0])
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.7 * first

    # Another run may start from this one (a curriculum's next stage): `model: WORKDIR` is its newest step.
    from idefics_jax.train.loading import trained_model

    nxt = dataclasses.replace(cfg, model=str(tmp_path / "run"), workdir=str(tmp_path / "next"))
    model, _ = loading.load_model(nxt, None)
    want, _ = trained_model(str(tmp_path / "run"))
    got, ref = dict(nnx.to_flat_state(nnx.state(model))), dict(nnx.to_flat_state(nnx.state(want)))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(np.asarray(got[k][...]), np.asarray(ref[k][...]))
    init = dict(nnx.to_flat_state(nnx.state(loading.load_model(cfg, None)[0])))
    assert sum(not np.array_equal(np.asarray(init[k][...]), np.asarray(got[k][...])) for k in init) > len(init) // 2


def test_bf16_parameters_train_and_are_kept_in_bf16(tmp_path, shapes_data):
    """param_dtype=bfloat16: the weights, gradients and AdamW moments in bf16 (half the memory); the loss still
    falls, and the checkpoint a later run or an export reads holds bf16 weights."""
    cfg = config_lib.load("configs/tiny.yaml", _overrides(tmp_path / "run", shapes_data, 8) + ["param_dtype=bfloat16"])
    trainer.train(cfg)
    losses = _losses(tmp_path / "run")
    assert np.mean([losses[s] for s in (6, 7, 8)]) < 0.8 * np.mean([losses[s] for s in (1, 2, 3)]), losses
    from idefics_jax.train.loading import trained_model

    model, _ = trained_model(str(tmp_path / "run"))
    assert {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}


def test_text_lr_scale_slows_only_the_decoder():
    from idefics_jax.train import optim
    from idefics_jax.train.config import OptimConfig

    trainable = {"text/layers/q": jnp.ones((2, 3)), "vision/patch_embed": jnp.ones((2, 3)), "lm_head": jnp.ones(3),
                 "connector/proj": jnp.ones((2, 3))}
    grads = jax.tree.map(jnp.ones_like, trainable)
    tx = optim.make(OptimConfig(learning_rate=1e-3, warmup_steps=0, weight_decay=0.0, text_lr_scale=0.1), 10,
                    {"text/layers/q": 1, "vision/patch_embed": 3, "lm_head": 1, "connector/proj": 1}, trainable)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    ref = float(updates["vision/patch_embed"][0, 0])
    assert ref < 0 and float(updates["connector/proj"][0, 0]) == ref
    for k in ("text/layers/q", "lm_head"):
        np.testing.assert_allclose(np.asarray(updates[k]), 0.1 * ref, rtol=1e-6)
