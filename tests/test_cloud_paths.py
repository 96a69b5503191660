"""Checkpoints, exports and training workdirs in a bucket: everything goes through `etils.epath` path objects.

The bucket is `fake://`, an epath path class registered for its own scheme the way epath serves `gs://`, backed by
a local folder. Its paths are URLs that `os.path` and `open` cannot use, so any code that still reads or writes a
checkpoint path with them fails here. Like a bucket it has no append and needs no directories. Orbax and
TensorStore reach it the way they reach `gs://` (a scheme they resolve to a storage driver): here Orbax's path
normalisation maps it onto the local folder.
"""

import json
import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
from conftest import assert_same_hf_weights
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath, register
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

import idefics_jax
from idefics_jax import cli
from idefics_jax.checkpoints import paths
from idefics_jax.checkpoints.checkpoint import META_FILE, CheckpointError
from idefics_jax.convert.hf_to_orbax import convert
from idefics_jax.convert.orbax_to_hf import export

SCHEME = "fake://"


class Bucket(epath_backend.Backend):
    """epath's storage interface over a local folder: `fake://b/key` is ROOT/b/key."""

    def __init__(self, root: str):
        self.root = root
        self.writes: list[str] = []  # every object opened for writing, in order

    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith(SCHEME), path
        return os.path.join(self.root, path[len(SCHEME):])

    def remote(self, local: str) -> str:
        return SCHEME + os.path.relpath(local, self.root)

    def open(self, path, mode):
        if "a" in mode:
            raise NotImplementedError(f"{path}: a bucket has no append")
        if "w" in mode:
            self.writes.append(os.fspath(path))
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)  # objects need no directories
        return open(self.local(path), mode, encoding=None if "b" in mode else "utf-8")

    def exists(self, path):
        return os.path.exists(self.local(path))

    def isdir(self, path):
        return os.path.isdir(self.local(path))

    def listdir(self, path):
        return os.listdir(self.local(path))

    def glob(self, path):
        import glob

        return [self.remote(p) for p in glob.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in os.walk(self.local(top), topdown=top_down, onerror=on_error):
            yield self.remote(root), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        os.makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        os.makedirs(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        shutil.rmtree(self.local(path))

    def remove(self, path):
        os.remove(self.local(path))

    def rename(self, path, dst):
        os.rename(self.local(path), self.local(dst))

    def replace(self, path, dst):
        os.replace(self.local(path), self.local(dst))

    def copy(self, path, dst, overwrite):
        shutil.copyfile(self.local(path), self.local(dst))

    def stat(self, path):
        return epath_backend.os_backend.stat(self.local(path))


def _internal(parts):
    """`fake://b/k` -> `/fake/b/k`, as epath stores `gs://b/k` (a pure path keeps no double slash)."""
    full = "/".join(os.fspath(p) for p in parts)
    return ("/fake/" + full[len(SCHEME):],) if full.startswith(SCHEME) else parts


class FakePath(gpath.PosixGPath):
    bucket: Bucket

    if sys.version_info < (3, 12):
        def __new__(cls, *parts):
            return super().__new__(cls, *_internal(parts))
    else:
        def __init__(self, *parts):
            super().__init__(*_internal(parts))

    @property
    def _uri_scheme(self):
        return "fake" if self.parts[:2] == ("/", "fake") else None

    @property
    def _backend(self):
        return self.bucket if self._uri_scheme == "fake" else super()._backend


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root, tmp = tmp_path_factory.mktemp("bucket"), tmp_path_factory.mktemp("tmp")
    normalize = ts_utils._normalize_path
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FakePath, "bucket", Bucket(str(root)), raising=False)
        mp.setitem(register._URI_PREFIXES_TO_CLS, SCHEME, FakePath)
        mp.setattr(ts_utils, "_normalize_path",
                   lambda p: FakePath.bucket.local(p) if str(p).startswith(SCHEME) else normalize(p))
        mp.setattr(tempfile, "tempdir", str(tmp))  # to see that uploads leave no local copy behind
        yield FakePath.bucket


def _uploads_left() -> list[str]:
    return [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("idefics-jax-upload-")]


def _files(top: str) -> set[str]:
    return {os.path.relpath(os.path.join(r, f), top) for r, _, names in os.walk(top) for f in names}


@pytest.fixture(scope="module")
def local_ckpt(tiny_hf, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("orbax") / "tiny")
    convert(tiny_hf, dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def bucket_ckpt(bucket, tiny_hf):
    dst = "fake://models/tiny"
    convert(tiny_hf, dst, progress=False)
    return dst


def test_the_fake_bucket_is_out_of_reach_of_os_path(bucket, bucket_ckpt):
    p = epath.Path(bucket_ckpt)
    assert isinstance(p, FakePath) and str(p / "x") == "fake://models/tiny/x"
    assert p.is_dir() and not os.path.exists(bucket_ckpt)


def test_convert_to_a_bucket_loads_like_a_local_checkpoint(bucket, bucket_ckpt, local_ckpt, cases):
    # Orbax names its data files at random: the same files at the top, as many inside params/.
    assert set(os.listdir(bucket.local(bucket_ckpt))) == set(os.listdir(local_ckpt))
    assert len(_files(bucket.local(bucket_ckpt))) == len(_files(local_ckpt))
    assert bucket.writes[-1] == f"{bucket_ckpt}/{META_FILE}"  # the file loading requires, last
    assert not _uploads_left()
    ours, ref = idefics_jax.load_pretrained(bucket_ckpt), idefics_jax.load_pretrained(local_ckpt)
    for inputs in cases.values():
        np.testing.assert_array_equal(np.asarray(ours(**inputs)), np.asarray(ref(**inputs)))
    # The processor's files come from the bucket too.
    chat = idefics_jax.Chat.load(bucket_ckpt)
    assert chat.model.generation_defaults == ref.generation_defaults and chat.model.generation_defaults.eos_token_ids
    local = idefics_jax.Chat.load(local_ckpt).processor
    assert chat.processor.tokenizer.get_vocab() == local.tokenizer.get_vocab()
    assert chat.processor.chat_template == local.chat_template


def test_export_to_a_bucket_and_convert_back(bucket, bucket_ckpt, local_ckpt, tiny_hf, tmp_path, cases):
    """Orbax checkpoint in the bucket -> HF directory in the bucket (config.json last) -> read back from the bucket
    by load_pretrained and by the converter."""
    hf = "fake://models/tiny-hf"
    bucket.writes.clear()
    export(bucket_ckpt, hf, progress=False)
    assert bucket.writes[-1] == f"{hf}/config.json"
    assert not _uploads_left()
    assert_same_hf_weights(bucket.local(hf), tiny_hf)  # transformers reads what landed
    ref = idefics_jax.load_pretrained(local_ckpt)
    ours = idefics_jax.load_pretrained(hf)  # safetensors read from the bucket
    for inputs in cases.values():
        np.testing.assert_array_equal(np.asarray(ours(**inputs)), np.asarray(ref(**inputs)))
    again = str(tmp_path / "again")
    convert(hf, again, progress=False)
    np.testing.assert_array_equal(np.asarray(idefics_jax.load_pretrained(again).text.embed[...]),
                                  np.asarray(ref.text.embed[...]))


def test_destination_in_a_bucket_is_never_overwritten(bucket, bucket_ckpt, tiny_hf, capsys):
    for argv in (["convert", tiny_hf, bucket_ckpt], ["export", tiny_hf, bucket_ckpt]):
        assert cli.main(argv) == 1
        assert capsys.readouterr().err.strip().endswith("destination already exists (remove it or choose another)")
    assert idefics_jax.load_pretrained(bucket_ckpt) is not None


def test_upload_publishes_the_marker_last_and_removes_a_failed_upload(bucket, tmp_path, monkeypatch):
    src = tmp_path / "src"
    for name in ("a.bin", "sub/b.bin", "sub/deeper/c.bin", "done.json"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(os.urandom(1000))
    bucket.writes.clear()
    paths.upload(str(src), "fake://up/ok", "done.json")
    assert bucket.writes[-1] == "fake://up/ok/done.json" and len(bucket.writes) == 4
    assert all((epath.Path("fake://up/ok") / n).read_bytes() == (src / n).read_bytes() for n in _files(str(src)))

    opened = bucket.open

    def fail_second(path, mode):
        if "w" in mode and len(bucket.writes) == 1:
            raise OSError("connection reset")
        return opened(path, mode)

    bucket.writes.clear()
    monkeypatch.setattr(bucket, "open", fail_second)
    with pytest.raises(OSError, match="connection reset"):
        paths.upload(str(src), "fake://up/failed", "done.json")
    assert not epath.Path("fake://up/failed").exists()


def test_an_interrupted_upload_never_loads(bucket, tiny_hf, local_ckpt, monkeypatch):
    """Killed just before the marker (nothing runs to remove what was uploaded): the destination holds every other
    file, and loading refuses it in one line."""
    opened, marker = bucket.open, {}

    def die_at_marker(path, mode):
        if "w" in mode and os.fspath(path) == marker["path"]:
            raise KeyboardInterrupt
        return opened(path, mode)

    monkeypatch.setattr(bucket, "open", die_at_marker)
    monkeypatch.setattr(FakePath, "rmtree", lambda self, missing_ok=False: None)  # the process is gone
    marker["path"] = f"fake://models/killed/{META_FILE}"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_hf, "fake://models/killed", progress=False)
    assert _files(bucket.local("fake://models/killed/params")) and epath.Path("fake://models/killed/config.json").exists()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        idefics_jax.load_pretrained("fake://models/killed")
    marker["path"] = "fake://models/killed-hf/config.json"
    with pytest.raises(KeyboardInterrupt):
        export(local_ckpt, "fake://models/killed-hf", progress=False)
    assert epath.Path("fake://models/killed-hf/model.safetensors").exists()
    with pytest.raises(ValueError, match="config.json: missing"):
        idefics_jax.load_pretrained("fake://models/killed-hf")
    assert not _uploads_left()


def test_training_workdir_in_a_bucket(bucket):
    """What a run writes into WORKDIR besides Orbax's checkpoints: the tiny-shapes base model (published whole),
    metrics.jsonl (rewritten, as a bucket has no append), and the data splits' leftovers check."""
    import dataclasses

    from idefics_jax.checkpoints import registry
    from idefics_jax.train import config as config_lib, loading, tfds_builder
    from idefics_jax.train.collate import CollateConfig, Collator
    from idefics_jax.train.writers import MetricsFile, TensorBoard, read_records

    work = "fake://runs/a"
    cfg = dataclasses.replace(config_lib.load("tiny", [f"workdir={work}"]), model="shapes")
    base = loading.model_path(cfg)
    assert base == f"{work}/base" and epath.Path(base, "config.json").exists()
    assert Collator.from_pretrained(base, CollateConfig()).image_size == 96  # processor files via a local copy
    assert loading.model_path(cfg) == base  # written once

    metrics = MetricsFile(epath.Path(work) / "metrics.jsonl", resume_at=0)
    for step in (1, 2, 3):
        metrics.write({"step": step})
    MetricsFile(epath.Path(work) / "metrics.jsonl", resume_at=2).write({"step": 3})  # resumed from step 2
    lines = (epath.Path(work) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    events = epath.Path(work) / "tensorboard"
    TensorBoard(events, 0).write({"step": 1, "loss": 2.0})
    TensorBoard(events, 1).write({"step": 2, "loss": 1.0})
    assert sorted(len(read_records(p.read_bytes())) for p in events.iterdir()) == [2, 2]  # file_version + a step

    assert not registry.is_run(work)
    (epath.Path(work) / "checkpoints").mkdir()
    (epath.Path(work) / "config.json").write_text("{}")
    assert registry.is_run(work)

    data = f"{work}/data-train"
    (epath.Path(data) / tfds_builder.NAME / "incomplete.x1" / "part").write_text("")
    assert not tfds_builder.is_built(data)
    with pytest.raises(FileExistsError, match="unfinished build .incomplete.x1."):
        tfds_builder.build(data, {})
