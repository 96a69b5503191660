"""Evaluation data: the parquet shards the benchmarks publish on the hub, named as a hub dataset
(`org/name[@revision][:subset][:split]`, see `idefics_jax.checkpoints.hub_data`) or downloaded by the user; or a
JSONL file.

Parquet: a file or a folder of `*.parquet` (searched recursively, read in name order), or a hub dataset's split,
with the columns of
  VQAv2 (lmms-lab/VQAv2): question, image, answers [{answer, answer_confidence, answer_id}], question_id
  TextVQA (lmms-lab/textvqa): question, image, answers [str], question_id
  DocVQA (lmms-lab/DocVQA): question, image, answers [str], questionId
  ChartQA (lmms-lab/ChartQA: question, image, answer; HuggingFaceM4/ChartQA: query, image, label [str])
  MMMU (MMMU/MMMU, one folder per subject): id, question, options ("['a', 'b']"), answer, image_1 .. image_7,
    question_type
Images are {"bytes", "path"} structs (the datasets library's Image feature) or plain bytes.
JSONL: one object per line, {"image": path or [paths] relative to the file, "question": str, "answers": [str]}
(optional: "id", "options", "subject").

Rows are read a record batch at a time: a dataset never sits in memory whole, images are decoded when asked.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import io
import json
import os
from typing import Any, Iterator, Sequence

from idefics_jax.checkpoints import hub_data

MMMU_MAX_IMAGES = 7
QUESTION_COLUMNS = ("question", "query")
ANSWER_COLUMNS = ("answers", "label", "answer", "multiple_choice_answer")


@dataclasses.dataclass
class Sample:
    index: int  # position in the dataset: the key that resuming and sharding use
    id: str
    question: str
    images: list  # PIL images, paths or encoded bytes; `load_images` turns them into RGB PIL images
    answers: list[str]
    options: list[str] | None = None  # multiple choice (MMMU)
    subject: str | None = None

    def load_images(self) -> list:
        from PIL import Image

        from idefics_jax.generation.images import load_image, to_rgb

        out = []
        for im in self.images:
            if isinstance(im, (bytes, bytearray)):
                try:
                    im = to_rgb(Image.open(io.BytesIO(im)), f"sample {self.id}")
                except Exception as e:  # PIL's errors for undecodable bytes
                    raise ValueError(f"sample {self.id}: image bytes do not decode ({e})") from None
            out.append(load_image(im))
        return out


class Dataset:
    """The samples of `path` (see the module docstring), in order; `len` without reading the rows. A hub dataset
    whose split is omitted is read at the first of `split` it has. `name`: the data as results record it (a local
    path made absolute, a hub dataset at its commit)."""

    def __init__(self, path: str, split: str | Sequence[str] = ("validation", "test")):
        self.path = path
        self.name = os.path.abspath(path)
        hub = hub_data.parse(path) if not os.path.exists(path) else None
        if hub is not None:
            resolved = hub_data.resolve(hub, default_split=split)
            self.files, self.name = list(resolved.files), resolved.name
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such data file or folder")
        elif os.path.isdir(path):
            self.files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True))
            if not self.files:
                raise ValueError(f"{path}: a folder with no .parquet files")
        elif path.endswith(".parquet"):
            self.files = [path]
        elif path.endswith((".jsonl", ".json")):
            self.files = []
        else:
            raise ValueError(f"{path}: data must be a .jsonl file, a .parquet file or a folder of parquet shards")
        if self.files:
            import pyarrow.parquet as pq

            self._len = 0
            for f in self.files:
                try:
                    meta = pq.ParquetFile(f)
                except Exception as e:  # pyarrow's ArrowInvalid etc.
                    raise ValueError(f"{f}: not readable as parquet ({e})") from None
                names = set(meta.schema_arrow.names)
                for need in (QUESTION_COLUMNS, ANSWER_COLUMNS):
                    if not names & set(need):
                        raise ValueError(f"{f}: no column {' or '.join(need)} (columns: {', '.join(sorted(names))})")
                self._len += meta.metadata.num_rows
        else:
            self._samples = list(self._jsonl())  # paths and text only: cheap, and checked before any model work
            self._len = len(self._samples)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Sample]:
        return self._parquet() if self.files else iter(self._samples)

    def _parquet(self) -> Iterator[Sample]:
        import pyarrow.parquet as pq

        index = 0
        for f in self.files:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):
                for row in batch.to_pylist():
                    yield row_sample(row, index, f)
                    index += 1

    def _jsonl(self) -> Iterator[Sample]:
        base = os.path.dirname(os.path.abspath(self.path))
        index = 0
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{n}"
                try:
                    d = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
                if not isinstance(d, dict) or not isinstance(d.get("question"), str):
                    raise ValueError(f"{where}: needs a \"question\" string")
                images = d.get("image", d.get("images", []))
                images = [images] if isinstance(images, str) else list(images or [])
                answers = d.get("answers", d.get("answer"))
                answers = [answers] if isinstance(answers, str) else answers
                if not answers or not all(isinstance(a, str) for a in answers):
                    raise ValueError(f"{where}: needs \"answers\", a list of strings")
                yield Sample(index, str(d.get("id", index)), d["question"], [os.path.join(base, p) for p in images],
                             list(answers), d.get("options"), d.get("subject"))
                index += 1


def _image(v: Any) -> Any:
    if isinstance(v, dict):  # the datasets Image feature: bytes, or a path when the bytes were not embedded
        return v.get("bytes") or v.get("path")
    return v


def _answers(row: dict) -> list[str]:
    for key in ANSWER_COLUMNS:
        v = row.get(key)
        if v is None:
            continue
        v = v if isinstance(v, list) else [v]
        return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in v]
    raise ValueError(f"no answer ({', '.join(ANSWER_COLUMNS)} all empty)")


def row_sample(row: dict, index: int, where: str = "") -> Sample:
    """One parquet row of any of the published layouts -> a Sample."""
    question = row.get("question", row.get("query"))
    if not isinstance(question, str):
        raise ValueError(f"{where}: row {index} has no question column (question or query)")
    if row.get("image") is not None:
        images = [_image(row["image"])]
    elif row.get("images") is not None:
        images = [_image(v) for v in row["images"]]
    else:
        images = [_image(row[k]) for k in (f"image_{i}" for i in range(1, MMMU_MAX_IMAGES + 1))
                  if row.get(k) is not None]
    try:
        answers = _answers(row)
    except ValueError as e:
        raise ValueError(f"{where}: row {index}: {e}") from None
    options = row.get("options")
    if isinstance(options, str):  # MMMU stores the list's Python repr
        options = ast.literal_eval(options) if options.strip() else []
    rid = next((row[k] for k in ("question_id", "questionId", "id") if row.get(k) is not None), index)
    subject = row.get("subject")
    if subject is None and isinstance(row.get("id"), str) and row["id"].count("_") >= 2:
        subject = "_".join(row["id"].split("_")[1:-1])  # MMMU ids: "validation_Art_Theory_12"
    return Sample(index, str(rid), question, images, answers, list(options) if options else None, subject)
