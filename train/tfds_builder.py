"""A TFDS dataset builder writing Cauldron-shaped records as array_record, without TensorFlow.

Sources: The Cauldron's parquet files (read with pyarrow), a folder of images plus a JSONL file whose lines are
`{"images": ["relative/path.png", ...], "texts": [{"user": ..., "assistant": ..., "source": ...}, ...]}`, or records
made in Python.

Images are stored as the source's encoded bytes (`tfds.features.Scalar(np.object_)`): `tfds.features.Image` would
decode them inside `tfds.data_source` reads, where an undecodable image fails the whole read instead of being
skipped and counted by the collator. Malformed rows are skipped at build time and counted in the dataset's
`metadata.json`.

    from idefics_jax.train import tfds_builder
    report = tfds_builder.build("data/cauldron-ai2d", {"train": tfds_builder.ParquetSource(("ai2d/0000.parquet",))})
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import logging
import os
import sys
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from idefics_jax.checkpoints.paths import as_path
from idefics_jax.train import records

log = logging.getLogger(__name__)

NAME = "cauldron_records"  # the registered TFDS name of `CauldronRecords`; one dataset per data_dir
VERSION = "1.0.0"

Row = dict | records.SkipRecord  # a source row, or why it could not be read


@dataclasses.dataclass(frozen=True)
class ParquetSource:
    """Cauldron parquet files (columns `images`: list of {bytes, path}, `texts`: list of {user, assistant, source})."""

    files: tuple[str, ...]
    batch_rows: int = 64  # rows decoded from parquet at a time: bounds memory on image-heavy files

    def rows(self) -> Iterator[Row]:
        import pyarrow.parquet as pq

        for path in self.files:
            f = pq.ParquetFile(path)
            columns = [c for c in ("images", "texts") if c in f.schema_arrow.names]
            for batch in f.iter_batches(batch_size=self.batch_rows, columns=columns):
                yield from batch.to_pylist()


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """A JSONL file; each line's `images` are paths relative to `image_dir` (default: the JSONL's folder)."""

    jsonl: str
    image_dir: str | None = None

    def rows(self) -> Iterator[Row]:
        root = self.image_dir if self.image_dir is not None else os.path.dirname(os.path.abspath(self.jsonl))
        with open(self.jsonl, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                yield _jsonl_row(line, root, f"{self.jsonl}:{n}")


def _jsonl_row(line: str, root: str, where: str) -> Row:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return records.MalformedRecord(f"{where}: not JSON ({e})")
    if not isinstance(row, dict) or not isinstance(row.get("images"), list):
        return row  # `records.from_dict` names what is missing
    images = []
    for p in row["images"]:
        if not isinstance(p, str):
            return records.MalformedRecord(f"{where}: image path {p!r} is not a string")
        try:
            with open(os.path.join(root, p), "rb") as img:
                images.append(img.read())
        except OSError as e:
            return records.MalformedRecord(f"{where}: cannot read image {p} ({e.strerror})")
    return {**row, "images": images}


@dataclasses.dataclass(frozen=True)
class GeneratedSource:
    """Records made in Python (a synthetic task): `make()` returns an iterable of Records or Cauldron rows."""

    make: Callable[[], Iterable[records.Record | Mapping]]

    def rows(self) -> Iterator[Row]:
        for r in self.make():
            yield records.to_dict(r) if isinstance(r, records.Record) else r


Source = ParquetSource | ImageFolderSource | GeneratedSource


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "images": tfds.features.Sequence(tfds.features.Scalar(dtype=np.object_)),
        "texts": tfds.features.Sequence({f: tfds.features.Text() for f in records.TURN_FIELDS}),
    })


class CauldronRecords(tfds.core.GeneratorBasedBuilder):
    """Cauldron-shaped records. `splits` maps a split name to its source; omit it to read a built dataset."""

    VERSION = tfds.core.Version(VERSION)
    # TFDS looks for checksum files beside a builder's code; this one downloads nothing, and that lookup imports
    # `importlib_resources`, which TFDS does not install.
    code_path = None

    def __init__(self, *, splits: Mapping[str, Source] | None = None, check_images: bool = True, **kwargs):
        self._sources = dict(splits or {})
        self._check_images = check_images
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # disable_shuffling keeps the source order on disk: grain shuffles at read time, from a seed.
        return tfds.core.DatasetInfo(builder=self, features=features(), disable_shuffling=True,
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        if not self._sources:
            raise ValueError("CauldronRecords: no sources given (pass splits={'train': ParquetSource(...)})")
        return {name: self._generate_examples(name, src) for name, src in self._sources.items()}

    def _generate_examples(self, split: str, source: Source):
        skipped: collections.Counter = collections.Counter()
        kept = 0
        for i, row in enumerate(source.rows()):
            try:
                if isinstance(row, records.SkipRecord):
                    raise row
                rec = records.from_dict(row)
                if self._check_images:
                    records.decode_images(rec)
            except records.SkipRecord as e:
                skipped[e.reason] += 1
                if skipped[e.reason] <= 5:  # the first few of each reason; all are counted
                    log.warning("split '%s': skipped row %d (%s): %s", split, i, e.reason, e)
                continue
            kept += 1
            yield i, records.to_dict(rec)
        # Written into metadata.json when the build completes.
        self.info.metadata.setdefault("skipped", {})[split] = dict(skipped)
        if not kept:
            raise ValueError(f"split '{split}': no usable records in {source} (skipped: {dict(skipped) or 'none'})")


@dataclasses.dataclass(frozen=True)
class BuildReport:
    path: str  # the dataset's version directory
    num_records: dict[str, int]
    skipped: dict[str, dict[str, int]]  # split -> reason -> count


def is_built(data_dir: str) -> bool:
    """Whether `data_dir` holds a finished build (TFDS writes dataset_info.json last, then renames the folder)."""
    return (as_path(data_dir) / NAME / VERSION / "dataset_info.json").exists()


def build(data_dir: str, splits: Mapping[str, Source], *, check_images: bool = True,
          replace_incomplete: bool = False) -> BuildReport:
    """Writes the splits as array_record under `data_dir`. Refuses a data_dir that already holds this dataset.

    TFDS builds into `NAME/incomplete.*` and renames it to `NAME/VERSION` when complete, so a killed build leaves
    no dataset that reads. replace_incomplete: remove such leftovers (and a version folder without its
    dataset_info.json) first; otherwise they are refused. check_images: decode every image once, so undecodable
    ones are dropped here rather than at each epoch.
    """
    if is_built(data_dir):
        raise FileExistsError(f"{data_dir}: already holds a built {NAME} dataset; choose another data_dir")
    root = as_path(data_dir) / NAME  # a local directory or a bucket (TFDS writes both)
    leftovers = [d for d in (root.iterdir() if root.is_dir() else [])
                 if d.name.startswith("incomplete.") or d.name == VERSION]
    if leftovers and not replace_incomplete:
        raise FileExistsError(f"{data_dir}: holds an unfinished build ({leftovers[0].name}); remove "
                              "it or pass replace_incomplete=True")
    for d in leftovers:
        d.rmtree()
    builder = CauldronRecords(splits=splits, check_images=check_images, data_dir=data_dir,
                              file_format="array_record")
    # TFDS prints "Downloading and preparing dataset" on stdout (nothing is downloaded): keep stdout for the
    # program's own lines, and its progress bars for a terminal.
    if not sys.stderr.isatty():
        tfds.display_progress_bar(False)
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()
    log.info("built %s in %s", ", ".join(splits), data_dir)
    info = builder.info
    return BuildReport(
        path=os.fspath(builder.data_dir),
        num_records={name: s.num_examples for name, s in info.splits.items()},
        skipped={k: dict(v) for k, v in info.metadata.get("skipped", {}).items()},
    )


def data_source(data_dir: str, split: str):
    """The split as a random-access sequence of raw TFDS examples (`records.from_example` turns one into a Record).

    Raises FileNotFoundError for a data_dir without a built dataset, ValueError for an empty or unknown split.
    """
    if not is_built(data_dir):
        raise FileNotFoundError(f"{data_dir}: no built {NAME} dataset (run train.tfds_builder.build first)")
    try:
        src = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{data_dir}: no split '{split}' ({str(e).splitlines()[0][:200]})") from None
    if len(src) == 0:
        raise ValueError(f"{data_dir}: split '{split}' has no records")
    return src
