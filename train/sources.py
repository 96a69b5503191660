"""Data sources: a config's data spec (`data.train`, `data.eval`) -> a random-access sequence of stored records.

A spec is the name of a registered source ("shapes": the synthetic task, generated into WORKDIR once) or a TFDS
data directory written by `train.tfds_builder`, "DIR" or "DIR:SPLIT". A new kind of data registers a factory:

    register("mytask", lambda split, cfg: sources.generated(cfg, split, lambda: my_records(split)))
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

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
    return factory(split, cfg) if factory is not None else tfds_directory(spec, split)


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
