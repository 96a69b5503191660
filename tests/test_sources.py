"""Data specs and model specs of a training config: registered names, TFDS directories, plain paths."""

from __future__ import annotations

import dataclasses
import os

import pytest

from idefics_jax.checkpoints.checkpoint import CheckpointError
from idefics_jax.train import loading, records, sources
from idefics_jax.train.config import DataConfig, TrainConfig


def _cfg(tmp_path, **data) -> TrainConfig:
    return TrainConfig(workdir=str(tmp_path / "run"), data=DataConfig(**data))


def test_a_registered_source_is_found_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))
    sources.register("mine", lambda split, cfg: [split, cfg.workdir])
    cfg = _cfg(tmp_path)
    assert sources.source("mine", "eval", cfg) == ["eval", cfg.workdir]
    assert {"mine", "shapes"} <= set(sources.names())


def test_any_other_spec_is_a_tfds_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no built"):
        sources.source(str(tmp_path / "nothing") + ":eval", "train", _cfg(tmp_path))


def test_shapes_is_generated_once_per_split(tmp_path):
    cfg = _cfg(tmp_path, num_records=3)
    train = sources.source("shapes", "train", cfg)
    assert len(train) == 3
    stamp = os.path.getmtime(os.path.join(cfg.workdir, "data-train"))
    again = sources.source("shapes", "train", cfg)  # a resumed run reads what was written
    assert os.path.getmtime(os.path.join(cfg.workdir, "data-train")) == stamp
    first = records.from_example(train[0])
    assert records.from_example(again[0]) == first
    held_out = sources.source("shapes", "eval", cfg)
    assert len(held_out) == 3 and records.from_example(held_out[0]).images != first.images


def test_model_specs(tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path), model="shapes")
    base = loading.model_path(cfg)
    assert base == os.path.join(cfg.workdir, "base")
    assert {"config.json", "tokenizer.json", "generation_config.json"} <= set(os.listdir(base))
    other = str(tmp_path / "some-checkpoint")
    with pytest.raises(CheckpointError, match="some-checkpoint: no such directory"):  # at once, in one line
        loading.model_path(dataclasses.replace(cfg, model=other))
    os.makedirs(other)
    assert loading.model_path(dataclasses.replace(cfg, model=other)) == other
