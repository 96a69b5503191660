"""Sequence packing: several records per row, kept apart by segment ids; each record's loss is its unpacked loss."""

import json

import jax
import numpy as np
import pytest

import idefics_jax
from idefics_jax.train import data
from idefics_jax.train.collate import IGNORE_INDEX, CollateConfig, Collator
from tests.test_data import assert_batches_equal, sample_records


@pytest.fixture(scope="module")
def collator(tiny_hf):
    return Collator.from_pretrained(tiny_hf, CollateConfig(length_buckets=(128, 256, 512, 1024), max_images=2))


def _token_nll(model, batch):
    """Per-token negative log-likelihood (B, T - 1) of labels t + 1 under logits t (0 where unlabelled)."""
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    logits = model.forward(*(batch[k] for k in keys), segment_ids=batch.get("segment_ids"))
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64)[:, :-1], axis=-1)
    labels = batch["labels"][:, 1:]
    nll = -np.take_along_axis(np.asarray(logp), np.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return np.where(labels != IGNORE_INDEX, nll, 0.0)


def test_packed_row_gives_each_record_its_unpacked_loss(tiny_hf, collator):
    """fp32: records with 0, 1 and 2 images packed in one row; per-record summed loss as when run alone."""
    model = idefics_jax.load_pretrained(tiny_hf)
    examples = [collator.encode(r) for r in sample_records(4)[1:]] + [collator.encode(sample_records(1)[0])]
    assert sorted(len(e.pixel_values) > 0 for e in examples) == [False, False, True, True]
    packed = collator.collate_packed([examples], batch_size=1)
    seg = packed["segment_ids"][0]
    assert seg.max() == len(examples) and (seg[packed["attention_mask"][0] == 0] == 0).all()
    nll = _token_nll(model, packed)[0]
    for k, e in enumerate(examples, start=1):
        alone = _token_nll(model, collator.collate([e]))[0]
        # The record's tokens score labels inside it; its first label is dropped when packed (see collate_packed).
        in_record = (seg[1:] == k) & (seg[:-1] == k)
        assert np.isclose(nll[in_record].sum(), alone.sum(), rtol=1e-5), k
        assert (alone > 0).sum() == (nll[in_record] > 0).sum() > 0


def test_packing_fills_rows_and_its_state_restores_exactly(collator):
    """Packed batches hold more real tokens than plain ones; a state saved while records wait in the packing
    window (some read after them already placed) restores the same batches."""
    recs = sample_records(14)
    mk = lambda packing, window=3: iter(data.batches(recs, collator, data.LoaderConfig(  # noqa: E731
        batch_size=2, seed=3, num_threads=2, prefetch=4, packing=packing, pack_window=window), process_index=0,
        process_count=1))
    plain, packed = mk(False), mk(True)
    fill = lambda bs: sum(b["attention_mask"].sum() for b in bs) / sum(b["attention_mask"].size for b in bs)  # noqa: E731
    a, b = [next(plain) for _ in range(4)], [next(packed) for _ in range(4)]
    assert fill(b) > fill(a)
    assert max(b_["segment_ids"].max() for b_ in b) >= 2  # rows do hold several records
    for window in (3, 1):
        packed = mk(True, window)
        seen, states = [], []
        for _ in range(11):
            seen.append(next(packed))
            states.append(json.loads(json.dumps(packed.get_state())))
        # The hard case: the oldest record waits while some read after it went into batches.
        k = next(i for i, s in enumerate(states[:6]) if True in s.get("placed", ()))
        resumed = mk(True, window)
        resumed.set_state(states[k])
        assert_batches_equal([next(resumed) for _ in range(5)], seen[k + 1:k + 6])
