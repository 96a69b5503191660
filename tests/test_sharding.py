"""Meshes, sharded loading and the training step on 8 simulated CPU devices, in one process and in two.

This process already runs jax on one device, so the sharded runs happen in fresh processes
(`tests/_sharded_worker.py`); the one-device reference runs there too, under the same compiler flags.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import chat
from jax.sharding import AbstractMesh

from idefics_jax.model import sharding as cfg
from idefics_jax.model import sharding as shd
import reference as testing

WORKER = os.path.join(os.path.dirname(__file__), "_sharded_worker.py")
MESHES = ["2,2,2", "1,8,1", "1,2,4"]
# Meshes made the ordinary way, `jax.make_mesh(sizes, names)`: Explicit axes (jax's default), and a mesh naming
# only some of the axes.
ANY_MESHES = ["data=2,fsdp=2,tensor=2", "data=4,tensor=2"]
CASES = ["batch8", "text_only"]


def _mesh(shape):
    return AbstractMesh(tuple(shape), cfg.MESH_AXES)


def test_rules_replicate_what_does_not_divide():
    m = _mesh((2, 2, 4))
    assert shd.spec_for(("embed", "heads", "head_dim"), (48, 6, 8), m) == shd.PartitionSpec("fsdp", None, None)
    assert shd.spec_for(("embed", "heads", "head_dim"), (48, 8, 8), m) == shd.PartitionSpec("fsdp", "tensor", None)
    # The batch takes the longest prefix of (data, fsdp) that divides it.
    assert shd.spec_for(("batch", None), (8, 5), m) == shd.PartitionSpec(("data", "fsdp"), None)
    assert shd.spec_for(("batch", None), (2, 5), m) == shd.PartitionSpec("data", None)
    assert shd.spec_for(("batch", None), (3, 5), m) == shd.PartitionSpec(None, None)
    # A mesh axis shards one dimension at most; size-1 axes are dropped.
    assert shd.spec_for(("batch", "embed"), (8, 48), m) == shd.PartitionSpec(("data", "fsdp"), None)
    assert shd.spec_for(("embed", "mlp"), (48, 96), _mesh((8, 1, 1))) == shd.PartitionSpec(None, None)
    rules = cfg.override(cfg.RULES, mlp=None, experts="tensor")
    assert shd.spec_for(("embed", "mlp"), (48, 96), m, rules) == shd.PartitionSpec("fsdp", None)
    assert dict(rules)["experts"] == "tensor" and len(rules) == len(cfg.RULES) + 1


def test_mesh_presets():
    assert cfg.FSDP.resolve(8) == (1, 8, 1)
    assert cfg.FSDP_TP.resolve(8) == (1, 2, 4)
    assert cfg.DATA_PARALLEL.resolve(8) == (8, 1, 1)
    assert cfg.FSDP_TP.resolve(32) == (1, 8, 4)
    for bad, n in [(cfg.FSDP_TP, 6), (cfg.MeshShape(2, -1, -1), 8), (cfg.MeshShape(2, 2, 1), 8)]:
        with pytest.raises(ValueError, match="devices"):
            bad.resolve(n)


def test_chunks_align_with_shards():
    """Each shardable dimension is stored in 16 pieces when it divides: 2, 4, 8 or 16-way slices are whole chunks."""
    from idefics_jax.checkpoints.checkpoint import chunk_shape

    big = (32, 4096, 32, 128)
    assert chunk_shape(big, ("layers", "embed", "heads", "head_dim"), 2) == (32, 256, 2, 128)
    assert chunk_shape((128259, 4096), ("vocab", "embed"), 2) == (128259, 256)  # an odd vocab stays whole
    assert chunk_shape((32, 4096), ("layers", "embed"), 2) == (32, 4096)  # under 1 MiB: one chunk


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def ckpt(tiny_hf_sharded, workdir):
    """The Orbax conversion of a multi-file HF checkpoint."""
    from idefics_jax.convert.hf_to_orbax import convert

    dst = str(workdir / "orbax")
    convert(tiny_hf_sharded, dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def wide_ckpt(workdir):
    """A 14 MB model, stored in 16-piece chunks down to a few KB: big enough that the chunks are stored out of
    line (OCDBT inlines values under 1 KB into its index, which every reader reads), so disk reads show."""
    import idefics_jax.checkpoints.checkpoint as ckpt_lib
    from idefics_jax.convert.hf_to_orbax import convert

    c = testing.tiny_config()
    c = c.replace(text=dataclasses.replace(c.text, vocab_size=2048, hidden_size=256, intermediate_size=1024,
                                           num_heads=8, num_kv_heads=4, head_dim=32),
                  vision=dataclasses.replace(c.vision, hidden_size=128, intermediate_size=512))
    hf = testing.save_hf_checkpoint(str(workdir / "wide-hf"), c, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt_lib, "MIN_SPLIT_BYTES", 0)
        convert(hf, str(workdir / "wide"), progress=False)
    return str(workdir / "wide")


@pytest.fixture(scope="module")
def inputs(processor, workdir):
    """8 distinct samples with 0, 1 or 2 images (left-padded), 2 text-only ones, and a training batch."""
    rng = np.random.default_rng(0)
    n_images = [1, 0, 2, 1, 0, 1, 2, 1]
    texts = [chat(processor, n, "why? " * (1 + i)) for i, n in enumerate(n_images)]
    images = [[testing.random_image(rng, 20 + 7 * i, 30 + 9 * j) for j in range(n)] for i, n in enumerate(n_images)]
    batch8 = dict(processor(text=texts, images=images, return_tensors="np", padding=True))
    text_only = dict(processor(text=["<|im_start|>User: hello, how are you?<end_of_utterance>\nAssistant:",
                                     "<|im_start|>User: hi<end_of_utterance>\nAssistant:"],
                               return_tensors="np", padding=True))
    scored = (batch8["attention_mask"] == 1) & (batch8["input_ids"] != testing.IMAGE_TOKEN_ID)
    train = {**batch8, "labels": np.where(scored, batch8["input_ids"], -100)}
    arrays = {f"{case}/{k}": v for case, d in [("batch8", batch8), ("text_only", text_only), ("train", train)]
              for k, v in d.items()}
    path = str(workdir / "inputs.npz")
    np.savez(path, **arrays)
    return path, {"batch8": batch8, "text_only": text_only}


def _run(args, n=1, timeout=600):
    """Starts the worker in `n` processes (coordinator on a free loopback port); returns its outputs."""
    out = args[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = lambda i: [] if n == 1 else ["--process-id", str(i), "--num-processes", str(n), "--port", str(port)]  # noqa: E731
    procs = [subprocess.Popen([sys.executable, WORKER, *args, *extra(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-4000:]
    with np.load(out + ".npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, [json.load(open(f"{out}.{i}.json")) for i in range(n)]


@pytest.fixture(scope="module")
def one_process(ckpt, wide_ckpt, inputs, workdir, tiny_hf_sharded):
    return _run([ckpt, inputs[0], str(workdir / "one"), "--mesh", "one",
                 *sum((["--mesh", m] for m in MESHES + ANY_MESHES), []),
                 *sum((["--generate", m] for m in ["one", *ANY_MESHES]), []),
                 "--read-check", wide_ckpt, "--hf", tiny_hf_sharded])


@pytest.fixture(scope="module")
def two_processes(ckpt, wide_ckpt, inputs, workdir):
    return _run([ckpt, inputs[0], str(workdir / "two"), "--mesh", "1,8,1", "--read-check", wide_ckpt], n=2)


def _rel(a, b, keep=None):
    if keep is not None:
        a, b = a[keep], b[keep]
    return float(np.abs(a - b).max() / np.abs(b).max())


def _same_outputs(got: dict, prefix: str, ref: dict, inputs: dict):
    for case in CASES:
        a, b = got[f"{prefix}/{case}/logits"], ref[f"one/{case}/logits"]
        err = _rel(a, b, inputs[case]["attention_mask"].astype(bool))
        print(f"{prefix} {case}: logits rel err {err:.1e}")
        assert err <= 1e-5, (prefix, case, err)
        np.testing.assert_array_equal(a[:, -1].argmax(-1), b[:, -1].argmax(-1), err_msg=f"{prefix} {case} greedy")


def _same_step(got: dict, prefix: str, ref: dict):
    loss, ref_loss = float(got[f"{prefix}/loss"]), float(ref["one/loss"])
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (prefix, loss, ref_loss)
    params = [k[len("one/param/"):] for k in ref if k.startswith("one/param/")]
    worst = max((_rel(got[f"{prefix}/param/{p}"], ref[f"one/param/{p}"]), p) for p in params)
    print(f"{prefix}: loss {loss:.6f} (one device {ref_loss:.6f}), "
          f"worst updated parameter rel err {worst[0]:.1e} ({worst[1]})")
    assert worst[0] <= 1e-5, (prefix, worst)
    # The step kept every parameter's layout (trailing unsplit dimensions may be spelled out or not).
    same = lambda s: re.sub(r"(, None)*,?\)$", ")", str(s))  # noqa: E731
    for p in params:
        assert same(got[f"{prefix}/spec_after_step/{p}"]) == same(got[f"{prefix}/spec/{p}"]), (prefix, p)


@pytest.mark.parametrize("mesh", MESHES + ANY_MESHES)
def test_mesh_matches_one_device(one_process, inputs, mesh):
    """Logits, greedy tokens, the training step's loss and updated parameters (and `generate`'s tokens)."""
    got, _ = one_process
    _same_outputs(got, mesh, got, inputs[1])
    if mesh in ANY_MESHES:
        print(mesh, "generated", got[f"{mesh}/generate/batch8"][:, -3:].tolist())
        np.testing.assert_array_equal(got[f"{mesh}/generate/batch8"], got["one/generate/batch8"], err_msg=mesh)
    _same_step(got, mesh, got)


def test_any_mesh_is_kept_with_auto_axes():
    """A mesh with Explicit axes is used as the same mesh with Auto axes; a subset of the axis names is kept."""
    import jax
    from jax.sharding import AxisType

    explicit = jax.make_mesh((1, 1), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
    part = shd.Partitioning(explicit)
    assert part.mesh.axis_types == (AxisType.Auto,) * 2 and part.mesh.axis_names == ("data", "tensor")
    assert list(part.mesh.devices.flat) == list(explicit.devices.flat)
    assert part.spec(("batch", "heads"), (4, 4)) == shd.PartitionSpec(None, None)


def test_unknown_mesh_axis_is_named(tiny_hf):
    import jax

    import idefics_jax

    mesh = jax.make_mesh((1, 1), ("data", "model"))
    with pytest.raises(ValueError, match=r"^mesh axis 'model' is unknown: the sharding rules map onto data, fsdp, "
                                         r"tensor$"):
        idefics_jax.load_pretrained(tiny_hf, mesh=mesh)
    # An axis that a rule names is known.
    assert shd.Partitioning(mesh, cfg.override(cfg.RULES, mlp="model")).mesh.axis_names == ("data", "model")


def test_training_step_trains(one_process):
    """The one-device step moved every parameter, most by about the learning rate (so agreeing on them means
    something); key biases, whose gradient is zero, move by weight decay only."""
    got, _ = one_process
    names = [k[len("one/param/"):] for k in got if k.startswith("one/param/")]
    moved = {p: np.abs(got[f"one/param/{p}"] - got[f"one/param_before/{p}"]).max() for p in names}
    assert all(m > 0 for m in moved.values())
    assert sum(0.5e-4 <= m <= 2e-4 for m in moved.values()) >= 0.9 * len(names), moved
    assert np.isfinite(got["one/loss"]) and float(got["one/loss"]) > 0


@pytest.mark.parametrize("mesh", MESHES + ANY_MESHES)
def test_kv_cache_on_mesh(one_process, inputs, mesh):
    """A prefill through a KV cache allocated on the mesh: batch over data/fsdp, kv heads (2) over tensor when
    they divide; the same logits as the forward pass without a cache."""
    got, _ = one_process
    keep = inputs[1]["text_only"]["attention_mask"].astype(bool)
    assert _rel(got[f"{mesh}/prefill/logits"], got["one/text_only/logits"], keep) <= 1e-5
    expected = {"2,2,2": (None, "data", "tensor"), "1,8,1": (), "1,2,4": (None, "fsdp"),
                "data=2,fsdp=2,tensor=2": (None, "data", "tensor"),
                "data=4,tensor=2": (None, None, "tensor")}
    assert str(got[f"{mesh}/prefill/cache_spec"]) == str(shd.PartitionSpec(*expected[mesh]))


@pytest.mark.parametrize("mesh", MESHES + ANY_MESHES[:1])
def test_parameters_are_split(one_process, mesh):
    got, _ = one_process
    specs = {k.split("/spec/")[1]: str(v) for k, v in got.items() if k.startswith(f"{mesh}/spec/")}
    sizes = {p: got[f"one/param/{p}"].size for p in specs}
    unsplit = lambda s: not s.strip("P()").replace("None", "").strip(", ")  # noqa: E731
    replicated = [p for p, s in specs.items() if sizes[p] >= 1024 and unsplit(s)]
    assert not replicated, (mesh, replicated)
    per_device = got[f"{mesh}/bytes_per_device"]
    total = sum(got[f"one/param/{p}"].nbytes for p in specs)
    print(f"mesh {mesh}: {per_device.max():,} parameter bytes per device of {total:,} ({per_device.max() / total:.1%})")
    assert per_device.max() <= total / 2


def test_hf_directory_onto_mesh(one_process, inputs):
    """An HF directory, converted in memory, placed onto a (2, 2, 2) mesh."""
    got, _ = one_process
    _same_outputs(got, "hf", got, inputs[1])


def test_two_processes(two_processes, one_process, inputs):
    """`jax.distributed` with two CPU processes on loopback, gloo collectives, 4 devices each: the same logits,
    greedy tokens, loss and updated parameters as one device; each process reads about half the checkpoint."""
    got, infos = two_processes
    ref, ref_info = one_process
    assert [i["processes"] for i in infos] == [2, 2] and infos[0]["devices"] == 8
    _same_outputs(got, "1,8,1", ref, inputs[1])
    _same_step(got, "1,8,1", ref)
    whole = ref_info[0]["read_bytes"]
    for i, info in enumerate(infos):
        print(f"process {i} read {info['read_bytes']:,} bytes to load its half; one process alone read {whole:,}")
        assert info["read_bytes"] <= 0.6 * whole
