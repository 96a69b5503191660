"""Data sources: a config's data spec (`data.train`, `data.eval`) -> a random-access sequence of stored records.

A spec is the name of a registered source ("shapes": the synthetic task, generated into WORKDIR once), a TFDS
data directory written by `train.tfds_builder`, "DIR" or "DIR:SPLIT", or a hub dataset,
`org/name[@revision][:subset][:split]` (built once into records, see `hub`). A new kind of data registers a factory:

    register("mytask", lambda split, cfg: sources.generated(cfg, split, lambda: my_records(split)))
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Callable, Sequence

from idefics_jax.checkpoints import hub_data
from idefics_jax.checkpoints.paths import as_path
from idefics_jax.shapes import task as shapes
from idefics_jax.train.config import TrainConfig

Factory = Callable[[str, TrainConfig], Sequence]  # (split, config) -> records
_REGISTRY: dict[str, Factory] = {}

EVAL_RECORDS = 2048  # generated held-out records: more than any evaluation reads


def register(name: str, factory: Factory) -> None:
    """Makes `name` a data spec: `factory(split, cfg)` returns the split's records ("train" or "eval")."""
    _REGISTRY[name] = factory


def names() -> list[str]:
    return sorted(_REGISTRY)


def source(spec: str, split: str, cfg: TrainConfig) -> Sequence:
    """The records `spec` names, for `split` ("train" or "eval"; a "DIR:SPLIT" spec picks its own split)."""
    factory = _REGISTRY.get(spec)
    if factory is not None:
        return factory(split, cfg)
    if hub_data.parse(spec) is not None and not as_path(spec.partition(":")[0]).exists():
        return hub(spec, split, cfg)
    return tfds_directory(spec, split)


def hub(spec: str, split: str, cfg: TrainConfig) -> Sequence:
    """A hub dataset's split as records (an omitted split: `train` for training, else `validation` or `test`).
    Its parquet shards are built once into HF_HOME/idefics-jax/records/ORG--NAME/COMMIT/SUBSET/SPLIT and reused
    by every run that names the same repository, revision, subset and split. The commit a run first resolves is
    kept in WORKDIR/hub-data.json: a resumed run reads the records it started with, wherever the branch moved."""
    import filelock
    import jax
    from huggingface_hub import constants

    from idefics_jax.train import tfds_builder

    pins_file = as_path(cfg.workdir) / "hub-data.json"
    pins = json.loads(pins_file.read_text()) if pins_file.exists() else {}
    key = f"{split}:{spec}"
    data = hub_data.resolve(pins.get(key, spec), default_split="train" if split == "train" else ("validation", "test"))
    if key not in pins and jax.process_index() == 0:
        pins_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = pins_file.parent / (pins_file.name + ".tmp")
        tmp.write_text(json.dumps({**pins, key: data.name}, indent=2) + "\n")
        tmp.replace(pins_file)
    parts = (data.repo.replace("/", "--"), data.commit, data.subset, data.split)
    path = os.path.join(constants.HF_HOME, "idefics-jax", "records", *(urllib.parse.quote(p, safe="") for p in parts))
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in data.split)  # a TFDS split name
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with filelock.FileLock(path + ".lock"):  # one build, however many runs start at once
        if not tfds_builder.is_built(path):
            _build(data, path, name)
    return tfds_builder.data_source(path, name)


def _build(data: hub_data.Split, path: str, name: str) -> None:
    import sys

    import pyarrow.parquet as pq

    from idefics_jax.runtime.progress import Progress
    from idefics_jax.train import tfds_builder

    names = pq.read_schema(data.files[0]).names
    if not {"images", "texts"} <= set(names):
        raise ValueError(f"{data.name}: not in The Cauldron's layout (training reads columns images and texts; "
                         f"this split has {', '.join(names)})")
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in data.files)
    # On a terminal TFDS draws its own bars; elsewhere (a log) this line is the build's progress.
    bar = Progress(f"records of {data.name}", total, unit="rows", enabled=not sys.stderr.isatty())

    def rows():
        for row in tfds_builder.ParquetSource(data.files).rows():
            yield row
            bar.update()

    tfds_builder.build(path, {name: tfds_builder.GeneratedSource(rows)}, replace_incomplete=True)


def tfds_directory(spec: str, split: str) -> Sequence:
    """ "DIR" or "DIR:SPLIT": a directory written by `train.tfds_builder` (SPLIT defaults to `split`)."""
    from idefics_jax.train import tfds_builder  # tensorflow_datasets: seconds to import, only once data is read

    directory, _, name = spec.partition(":")
    return tfds_builder.data_source(directory, name or split)


def generated(cfg: TrainConfig, split: str, records: Callable[[], object]) -> Sequence:
    """Records of a generator, written once into WORKDIR/data-SPLIT (a resumed run reads the same ones).

    Built by process 0 while the others wait; a build that a killed run left unfinished is built again.
    """
    import jax

    from idefics_jax.train import tfds_builder

    path = os.fspath(as_path(cfg.workdir) / f"data-{split}")  # a local directory or a bucket
    if jax.process_index() == 0 and not tfds_builder.is_built(path):
        tfds_builder.build(path, {split: tfds_builder.GeneratedSource(records)}, replace_incomplete=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"data-{split}")
    return tfds_builder.data_source(path, split)


def _shapes(split: str, cfg: TrainConfig) -> Sequence:
    """The tiny-shapes task (`data.num_records`, default 1000; `data.shapes` narrows it). Held-out images come from
    other seeds."""
    seed = cfg.data.shuffle_seed + (0 if split == "train" else 1_000_003)
    n = cfg.data.num_records or 1000
    n = n if split == "train" else min(n, EVAL_RECORDS)  # evaluation reads eval_batches batches of them
    sc = cfg.data.shapes
    return generated(cfg, split, lambda: shapes.records(n, seed, sc.questions_per_image or None,
                                                        tuple(sc.shapes_per_image), tuple(sc.questions)))


register("shapes", _shapes)
