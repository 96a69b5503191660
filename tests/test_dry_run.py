"""`idefics-jax train --dry-run`: the step compiled with nothing loaded, against the state and batches a real run
builds; what a config that does not fit, or a bad model or slice name, prints."""

import os

import jax
import pytest
from flax import nnx

from idefics_jax import cli
from idefics_jax.train import config as config_lib
from idefics_jax.train import dry_run, loading, optim, step as step_lib
from idefics_jax.train.collate import CollateConfig, Collator

TINY = "configs/tiny.yaml"


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("extra", [[], ["lora.rank=4", "freeze=[vision]"], ["param_dtype=bfloat16"]])
def test_dry_run_matches_the_state_and_batch_a_run_builds(tmp_path, extra):
    cfg = config_lib.load(TINY, [f"workdir={tmp_path / 'run'}", *extra])
    plan = dry_run.dry_run(cfg)
    # The state a run starts from (`trainer._setup`'s pieces), built for real on one device.
    model, model_dir = loading.load_model(cfg, None)
    parts = step_lib.split(model, cfg.freeze, cfg.lora if cfg.lora.rank else None, jax.random.key(cfg.seed))
    state = step_lib.init_state(parts.trainable, optim.make(cfg.optim, cfg.steps, parts.fan_in, parts.trainable))
    if not cfg.lora.rank:  # the weights (and so their moments) in the config's dtype
        assert {x.dtype.name for x in jax.tree.leaves(parts.trainable)} == {cfg.param_dtype}
    assert plan["params"] == _nbytes((parts.frozen, parts.trainable))
    assert plan["optimizer"] == _nbytes(state.opt_state)
    # The largest batch the run's collator makes: its longest bucket and its most sub-images.
    collator = Collator.from_pretrained(model_dir, CollateConfig(
        length_buckets=tuple(cfg.data.length_buckets), max_images=cfg.data.max_images,
        image_splitting=cfg.data.image_splitting))
    B, T, images = plan["batch"]
    assert (T, images) == max(collator.batch_shapes) and B == cfg.data.batch_size
    assert plan["fits"] and plan["arguments"] >= plan["params"] + plan["optimizer"] and plan["temporaries"] > 0


def test_cli_dry_run_prints_memory_and_writes_nothing(tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(["train", "--dry-run", TINY, f"workdir={work}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("compiled for 1 local CPU device (cpu);") and "batch 8 x 192 tokens" in out[0], out
    assert out[1].startswith("per device: parameters ") and " peak " in out[1], out
    assert out[-1] == "fits"
    assert not work.exists()


def test_a_config_that_does_not_fit_says_so_in_one_line(tmp_path, capsys):
    work = tmp_path / "run"
    code = cli.main(["train", "--dry-run", TINY, f"workdir={work}", "data.batch_size=100000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("idefics-jax train: error: does not fit: peak ") and " GiB per device, " in err[0], err
    assert not work.exists()


@pytest.mark.parametrize("args, message", [
    (["model=ckpt/nowhere"], "error: model 'ckpt/nowhere': no config.json there; a dry run needs only the "
                             "architecture: name a preset ("),
    (["--topology", "v9-8"], "error: unknown TPU slice 'v9-8' (known: v5e-8, v6e-8, v4-8, v5p-8, "),
    (["optim.grad_accum=3"], "error: optim.grad_accum: 3 micro-batches do not divide data.batch_size 8"),
])
def test_bad_model_or_slice_is_named(tmp_path, capsys, args, message):
    assert cli.main(["train", "--dry-run", TINY, f"workdir={tmp_path}", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_preset_compiles_on_simulated_devices_of_its_mesh():
    """The 8B LoRA config's program on this host's device (its mesh reshaped to one device): the architecture from
    the preset, nothing read from disk."""
    cfg = config_lib.load("configs/idefics3-8b-v5e8-lora.yaml", [
        "model=idefics3-8b-llama3", "mesh.fsdp=1", "data.batch_size=1", "optim.grad_accum=1", "data.max_images=1",
        "data.length_buckets=[1024]"])
    plan = dry_run.dry_run(cfg)
    # Idefics3-8B: 8.5 B parameters in fp32 (the frozen base), rank-16 adapters on seven matmuls per layer.
    assert 8.4e9 * 4 < plan["params"] < 8.6e9 * 4, plan["params"]
    assert plan["batch"] == (1, 1024, 17)
    assert os.path.basename(cfg.workdir) == "idefics3-8b-lora"


# ---- serve --dry-run -----------------------------------------------------------------------------------------------
def test_serve_dry_run_prints_weights_and_slots(capsys):
    assert cli.main(["serve", "--dry-run", "--model", "tiny-shapes", "--slots", "4", "--max-len", "256",
                     "--prefix-cache-gb", "0.5", "--image-cache-gb", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("compiled for 1 local CPU device (cpu); mesh data 1, fsdp 1, tensor 1; 4 slots of 256 "
                             "positions, bfloat16"), out
    # tiny-shapes: 4 layers, 2 kv heads of 32; keys and values of 4 x 256 positions in bf16.
    assert "KV cache 1.0 MiB" in out[1] and "with the prompt caches " in out[1], out
    assert out[-1] == "fits"


def test_serve_dry_run_that_does_not_fit_says_so_in_one_line(capsys):
    code = cli.main(["serve", "--dry-run", "--model", "tiny-shapes", "--slots", "64", "--max-len", "1000000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("idefics-jax serve: error: does not fit: peak ") and " GiB per device " in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--mesh", "tensr=2"], "error: mesh 'tensr=2': name a preset (fsdp, fsdp_tp, data, tensor) or sizes as "),
    (["--model", "ckpt/nowhere"], "error: model 'ckpt/nowhere': no config.json there; "),
    (["--topology", "v9-8"], "error: unknown TPU slice 'v9-8' (known: v5e-8, "),
])
def test_serve_dry_run_names_a_bad_mesh_model_or_slice(capsys, args, message):
    assert cli.main(["serve", "--dry-run", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_chat_loads_onto_a_named_mesh():
    """`serve --mesh` / `Chat.load(mesh=...)`: the weights placed on a (data, fsdp, tensor) mesh of this host's
    devices, as `load_pretrained(mesh=...)` places them."""
    from idefics_jax.generation.chat import Chat

    chat = Chat.load("tiny-shapes", mesh="tensor")
    leaves = jax.tree.leaves(nnx.state(chat.model, nnx.Param))
    assert all(x.sharding.mesh.axis_names == ("data", "fsdp", "tensor") for x in leaves)
    assert {x.sharding.mesh.shape["tensor"] for x in leaves} == {len(jax.devices())}


def test_generate_names_a_bad_mesh_before_loading(capsys):
    assert cli.main(["generate", "--mesh", "tensor=2,pipe=2", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["idefics-jax generate: error: mesh 'tensor=2,pipe=2': name a preset (fsdp, fsdp_tp, data, tensor) "
                   "or sizes as axis=N,... over the axes data, fsdp, tensor"], err

