"""Training batches: a built dataset read with `tfds.data_source`, shuffled, sharded and batched with grain.

Order is a pure function of (seed, process_index, process_count): the split is shuffled from the seed (anew each
epoch) into one stream, and host p reads items p, p + count, ... of that stream. With a per-host batch of
global_batch / count, the hosts' batches of a step together hold the very records one process would batch at that
step (`tests/test_multihost.py` checks the losses). Records are decoded and encoded in threads; batches are
assembled in order. A record the collator cannot use is skipped and counted (`BatchIterator.skipped`), and the
counts are part of the iterator state, which `get_state` / `set_state` save and restore exactly (grain's
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` put it in an Orbax checkpoint, one file per process).

    collator = Collator.from_pretrained(checkpoint, CollateConfig(max_images=1))
    it = iter(batches(tfds_builder.data_source(data_dir, "train"), collator, LoaderConfig(batch_size=8, seed=0)))
    batch = next(it)              # numpy dict; see `Collator.collate`
    state = it.get_state()        # JSON-serialisable

Several sources mix into one stream (`Mixture`, grain's `MapDataset.mix`): each is shuffled, repeated and sharded
as one source is, then every host interleaves its shards in the weights' proportions, so the shares hold on every
host and in every window of the stream. The iterator counts the usable records of each source it reads
(`BatchIterator.records_by_source`, part of its state).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Any, Sequence

import grain

from idefics_jax.train import records
from idefics_jax.train.collate import Collator, Example

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int  # per host
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever (training); 1 for evaluation
    drop_remainder: bool = True  # False: the last partial batch is filled with empty rows (attention 0)
    num_threads: int = 4  # threads decoding images and running the processor
    prefetch: int = 16  # encoded records read ahead (each holds its float32 sub-images)
    # Several records per row, up to the longest length bucket (`Collator.collate_packed`). Each batch is packed
    # from records read ahead until they hold `pack_window` batches' worth of tokens, each in reading order into
    # the first row it fits; what fits nowhere waits, first in line for the next batch. Closing a batch at the
    # first record that fits no row instead left a third of the slots empty on a 30 to 1500-token mix in
    # 2048-token rows (bench/packing.py).
    packing: bool = False
    pack_window: float = 3.0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
        if not self.pack_window >= 1:
            raise ValueError(f"pack_window must be >= 1 (batches' worth of tokens read ahead), got {self.pack_window}")


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Stands in the stream for a record the collator could not use."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Sources read together, source i making up weights[i] / sum(weights) of the records."""

    sources: tuple[Sequence, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.sources) != len(self.weights) or not self.sources:
            raise ValueError(f"a mixture needs one weight per source; got {len(self.sources)} sources and "
                             f"{len(self.weights)} weights")
        if not all(w > 0 for w in self.weights):
            raise ValueError(f"mixture weights must be positive; got {list(self.weights)}")


def _tag(i: int, raw: Any) -> tuple[int, Any]:
    return i, raw


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def record_dataset(source: Sequence, config: LoaderConfig, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
    """This host's raw records: its stride of `source` shuffled from the seed (anew each epoch) and repeated.

    Host p takes items p, p + count, ... of the one shuffled stream, so in each epoch the hosts' shares are
    disjoint, cover the split and differ in size by at most one record.

    process_index / process_count default to jax's; pass them to build another host's view (tests do).
    """
    p, n = _processes(process_index, process_count)
    if len(source) == 0:
        raise ValueError("the dataset has no records")
    if p >= len(source):
        raise ValueError(f"host {p} of {n} gets no records: the dataset has only {len(source)}")
    ds = grain.MapDataset.source(source)
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)  # seeds each epoch with seed + epoch
    ds = ds.repeat(config.num_epochs)
    return ds if n == 1 else ds[p::n]


def mixture_dataset(mixture: Mixture, config: LoaderConfig, *, process_index: int, process_count: int
                    ) -> grain.MapDataset:
    """This host's records of every source, (source index, raw record), interleaved in the weights' proportions.
    Source i is shuffled with seed + i (two sources of one size are not drawn in the same order)."""
    parts = []
    for i, source in enumerate(mixture.sources):
        own = dataclasses.replace(config, seed=(config.seed + i) % 2**32)
        parts.append(record_dataset(source, own, process_index=process_index, process_count=process_count)
                     .map(functools.partial(_tag, i)))
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, mixture.weights)


def _encode_tagged(collator: Collator, item: tuple[int, Any]) -> tuple[int, Example | Skipped]:
    return item[0], encode_or_skip(collator, item[1])


def encode_or_skip(collator: Collator, raw: Any) -> Example | Skipped:
    """A stored record (`tfds.data_source` item or Record) -> Example, or Skipped saying why."""
    try:
        rec = raw if isinstance(raw, records.Record) else records.from_example(raw)
        return collator.encode(rec)
    except records.SkipRecord as e:
        return Skipped(e.reason, str(e))


def batches(source: Sequence | Mixture, collator: Collator, config: LoaderConfig, *,
            process_index: int | None = None, process_count: int | None = None) -> "Batches":
    """This host's batches of one source or a mixture (an IterDataset; `iter()` gives a checkpointable
    BatchIterator)."""
    p, n = _processes(process_index, process_count)
    mixture = source if isinstance(source, Mixture) else Mixture((source,), (1.0,))
    shard = mixture_dataset(mixture, config, process_index=p, process_count=n)
    shard_len = sum(len(range(p, len(s), n)) for s in mixture.sources)  # records per epoch on this host
    # A run of skips this long holds a whole epoch of this shard, however it straddles epoch boundaries.
    patience = 2 * shard_len - 1
    encoded = shard.map(functools.partial(_encode_tagged, collator)).to_iter_dataset(
        grain.ReadOptions(num_threads=config.num_threads, prefetch_buffer_size=config.prefetch))
    return Batches(encoded, collator, config, patience=patience)


class Batches(grain.IterDataset):
    """Groups encoded records into batches of `config.batch_size`, skipping and counting Skipped ones."""

    def __init__(self, parent: grain.IterDataset, collator: Collator, config: LoaderConfig, patience: int):
        super().__init__(parent)
        self._collator, self._config, self._patience = collator, config, patience

    def __iter__(self) -> "BatchIterator":
        return BatchIterator(self._parent.__iter__(), self._collator, self._config, self._patience)


class BatchIterator(grain.DatasetIterator):
    """Yields collated numpy batches. State: the parent's position, skip counts, usable records seen."""

    LOGGED_PER_REASON = 5  # the first few skip messages of each reason are logged; all are counted

    def __init__(self, parent: grain.DatasetIterator, collator: Collator, config: LoaderConfig, patience: int):
        super().__init__(parent)
        self._collator, self._config = collator, config
        # Packing: every usable record read since the oldest one not yet in a batch, as [example, state before
        # reading it, placed]; placed ones drop their example. The saved state is the first entry's, plus which
        # of the records read after it are placed: a restored iterator reads them again and drops those.
        self._window: list[list] = []
        self._replay: list[bool] = []  # after set_state: for each record read again, whether it was placed
        # Consecutive skips that span a whole epoch mean nothing usable is left: stop instead of spinning.
        self._patience = patience
        self._skipped: collections.Counter = collections.Counter()
        self._run = 0  # consecutive skips
        self._good = 0  # usable records seen
        self._by_source: collections.Counter = collections.Counter()  # usable records seen, by source index

    @property
    def skipped(self) -> dict[str, int]:
        """Records skipped so far on this host, by reason."""
        return dict(self._skipped)

    @property
    def records_by_source(self) -> dict[int, int]:
        """Usable records read so far on this host, by source index (a mixture's; one source is 0)."""
        return dict(self._by_source)

    def _read(self) -> Example:
        """The next usable record (skips counted); StopIteration at the end."""
        while True:
            try:
                item = next(self._parent)
            except StopIteration:
                if not self._good and self._skipped:
                    raise ValueError(f"no usable records: all {self._run} were skipped ({self._counts()})") from None
                raise
            i, item = item
            if isinstance(item, Skipped):
                self._count(item)
                continue
            self._run = 0
            self._good += 1
            self._by_source[i] += 1
            return item

    def __next__(self) -> dict:
        if self._config.packing:
            return self._next_packed()
        examples: list[Example] = []
        while len(examples) < self._config.batch_size:
            try:
                examples.append(self._read())
            except StopIteration:
                if not examples or self._config.drop_remainder:
                    raise
                break
        return self._collator.collate(examples, self._config.batch_size)

    def _next_packed(self) -> dict:
        cfg = self._config
        waiting = lambda: [w for w in self._window if not w[2]]  # noqa: E731
        ahead = cfg.pack_window * cfg.batch_size * self._collator.config.max_length
        exhausted = False
        while sum(len(w[0].input_ids) for w in waiting()) < ahead or self._replay:
            before = self._own_state()
            try:
                e = self._read()
            except StopIteration:
                exhausted = True
                break
            placed = self._replay.pop(0) if self._replay else False
            self._window.append([None if placed else e, before, placed])
        self._trim()
        candidates = waiting()
        if not candidates:
            raise StopIteration
        rows: list[list[Example]] = []
        for w in candidates:
            row = next((r for r in rows if self._collator.fits(r, w[0])), None)
            if row is None and len(rows) < cfg.batch_size:
                row = rows.append([]) or rows[-1]
            if row is not None:
                row.append(w[0])
                w[0], w[2] = None, True
        if exhausted and cfg.drop_remainder and len(rows) < cfg.batch_size:
            raise StopIteration
        self._trim()
        return self._collator.collate_packed(rows, cfg.batch_size)

    def _trim(self) -> None:
        while self._window and self._window[0][2]:
            self._window.pop(0)

    def _own_state(self) -> dict:
        return {"parent": self._parent.get_state(), "skipped": dict(self._skipped), "run": self._run,
                "good": self._good, "sources": {str(k): v for k, v in self._by_source.items()}}

    def _count(self, item: Skipped) -> None:
        self._skipped[item.reason] += 1
        self._run += 1
        if self._skipped[item.reason] <= self.LOGGED_PER_REASON:
            log.warning("skipped a record (%s): %s", item.reason, item.message)
        if self._run >= self._patience:
            raise ValueError(f"no usable records: the last {self._run} in a row were skipped ({self._counts()})")

    def _counts(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self._skipped.items()))

    def get_state(self) -> dict:
        if not self._window:
            return self._own_state()
        return {**self._window[0][1], "placed": [w[2] for w in self._window[1:]]}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._skipped = collections.Counter(state["skipped"])
        self._run = int(state["run"])
        self._good = int(state["good"])
        self._by_source = collections.Counter({int(k): int(v) for k, v in state.get("sources", {}).items()})
        self._window = []
        self._replay = [False] + [bool(p) for p in state["placed"]] if "placed" in state else []
