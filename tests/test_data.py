"""Training data: the TFDS builder, grain sharding / order / state, and the collator's invariants.

Everything is built offline from PIL images and the tiny checkpoint's processor.
"""

import io
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import reference as testing
from idefics_jax.convert import hf_files
from idefics_jax.model.idefics import check_inputs
from idefics_jax.train import collate, data, records, tfds_builder
from idefics_jax.train.collate import IGNORE_INDEX, CollateConfig, Collator
from idefics_jax.train.records import Record, Turn

EOU = "<end_of_utterance>"


def encoded(rng, h, w, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    testing.random_image(rng, h, w).save(buf, fmt)
    return buf.getvalue()


def sample_records(n, seed=0):
    """Single- and multi-turn records, 0-2 images, PNG and JPEG, non-ASCII text."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        images = tuple(encoded(rng, 20 + 7 * j, 30 + 5 * i, "JPEG" if (i + j) % 2 else "PNG") for j in range(i % 3))
        turns = tuple(Turn(f"question {i}.{k} é?", f"answer {i}.{k}", f"src{i % 2}") for k in range(1 + i % 2))
        out.append(Record(images, turns))
    return out


# -- TFDS builder ----------------------------------------------------------------------------------------------

def cauldron_schema():
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    return pa.schema([("images", pa.list_(image)), ("texts", pa.list_(turn))])


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows, schema=cauldron_schema()), path)


def cauldron_row(r: Record) -> dict:
    d = records.to_dict(r)
    return {"images": [{"bytes": b, "path": None} for b in d["images"]], "texts": d["texts"]}


def read_all(data_dir, split):
    src = tfds_builder.data_source(str(data_dir), split)
    return [records.from_example(src[i]) for i in range(len(src))]


def test_builder_round_trips_parquet(tmp_path):
    recs = sample_records(7)
    write_parquet(tmp_path / "a.parquet", [cauldron_row(r) for r in recs[:4]])
    write_parquet(tmp_path / "b.parquet", [cauldron_row(r) for r in recs[4:]])
    src = tfds_builder.ParquetSource((str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")), batch_rows=3)
    generated = tfds_builder.GeneratedSource(lambda: [*recs[:2], {"images": []}, cauldron_row(recs[2])])
    report = tfds_builder.build(str(tmp_path / "ds"), {
        "train": src,
        "validation": tfds_builder.ParquetSource((str(tmp_path / "b.parquet"),)),
        "generated": generated,
    })
    assert report.num_records == {"train": 7, "validation": 3, "generated": 3}
    assert report.skipped == {"train": {}, "validation": {}, "generated": {"malformed": 1}}
    assert read_all(tmp_path / "ds", "train") == recs  # bytes and texts identical, source order kept
    assert read_all(tmp_path / "ds", "validation") == recs[4:]
    assert read_all(tmp_path / "ds", "generated") == recs[:3]
    with pytest.raises(FileExistsError):
        tfds_builder.build(str(tmp_path / "ds"), {"train": src})


def test_builder_round_trips_image_folder(tmp_path):
    recs = sample_records(5, seed=1)
    (tmp_path / "img" / "sub").mkdir(parents=True)
    lines = []
    for i, r in enumerate(recs):
        paths = []
        for j, b in enumerate(r.images):
            p = f"sub/{i}_{j}.bin" if j else f"{i}_{j}.img"  # names need no image extension: bytes are kept
            (tmp_path / "img" / p).write_bytes(b)
            paths.append(p)
        lines.append(json.dumps({"images": paths, "texts": records.to_dict(r)["texts"]}, ensure_ascii=False))
    (tmp_path / "img" / "data.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    report = tfds_builder.build(str(tmp_path / "ds"),
                                {"train": tfds_builder.ImageFolderSource(str(tmp_path / "img" / "data.jsonl"))})
    assert report.num_records == {"train": 5}
    assert read_all(tmp_path / "ds", "train") == recs


def test_builder_skips_and_counts_malformed_rows(tmp_path):
    good = sample_records(3)
    rng = np.random.default_rng(2)
    texts = cauldron_row(good[0])["texts"]
    rows = [cauldron_row(r) for r in good] + [
        {"images": [], "texts": None},  # missing texts
        {"images": None, "texts": texts},  # missing images
        {"images": [], "texts": [{"user": "q", "assistant": None, "source": "s"}]},  # turn without an answer
        {"images": [], "texts": []},  # no turns
        {"images": [{"bytes": b"not an image", "path": None}], "texts": texts},
        {"images": [{"bytes": encoded(rng, 30, 30, "JPEG")[:200], "path": None}], "texts": texts},  # truncated
    ]
    write_parquet(tmp_path / "a.parquet", rows)
    (tmp_path / "d.jsonl").write_text("\n".join([
        "{not json",
        json.dumps({"images": ["missing.png"], "texts": [{"user": "q", "assistant": "a"}]}),
        json.dumps({"texts": [{"user": "q", "assistant": "a"}]}),
        json.dumps({"images": [], "texts": [{"user": "q", "assistant": "a"}]}),  # fine: text only, no source
    ]))
    report = tfds_builder.build(str(tmp_path / "ds"), {
        "train": tfds_builder.ParquetSource((str(tmp_path / "a.parquet"),)),
        "jsonl": tfds_builder.ImageFolderSource(str(tmp_path / "d.jsonl")),
    })
    assert report.num_records == {"train": 3, "jsonl": 1}
    assert report.skipped == {"train": {"malformed": 4, "undecodable_image": 2}, "jsonl": {"malformed": 3}}
    assert read_all(tmp_path / "ds", "train") == good
    assert read_all(tmp_path / "ds", "jsonl") == [Record((), (Turn("q", "a", ""),))]
    with open(os.path.join(report.path, "metadata.json")) as f:  # the counts stay with the dataset
        assert json.load(f)["skipped"] == report.skipped


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"images": []}\n')
    for name in ("empty", "bad"):
        with pytest.raises(ValueError, match="no usable records"):
            tfds_builder.build(str(tmp_path / name), {"train": tfds_builder.ImageFolderSource(
                str(tmp_path / f"{name}.jsonl"))})
    with pytest.raises(FileNotFoundError, match="no built"):
        tfds_builder.data_source(str(tmp_path / "empty"), "train")
    with pytest.raises(ValueError, match="no records"):
        data.record_dataset([], data.LoaderConfig(batch_size=1), process_index=0, process_count=1)


# -- grain: sharding, order, state ------------------------------------------------------------------------------


def one_epoch(n, config, p, count):
    ds = data.record_dataset(list(range(n)), config, process_index=p, process_count=count)
    return list(ds)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_data(count):
    config = data.LoaderConfig(batch_size=1, seed=3, num_epochs=1)
    shards = [one_epoch(23, config, p, count) for p in range(count)]
    flat = [x for s in shards for x in s]
    assert len(flat) == len(set(flat)) == 23
    assert sorted(flat) == list(range(23))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_order_is_a_function_of_the_seed():
    cfg = lambda seed: data.LoaderConfig(batch_size=1, seed=seed, num_epochs=2)  # noqa: E731
    a, b, c = one_epoch(50, cfg(7), 1, 2), one_epoch(50, cfg(7), 1, 2), one_epoch(50, cfg(8), 1, 2)
    assert a == b
    assert a != c
    other = one_epoch(50, cfg(7), 0, 2)
    for e in (0, 1):  # each epoch reshuffled; the two hosts' shares of it are disjoint and cover the data
        assert sorted(a[25 * e:25 * (e + 1)] + other[25 * e:25 * (e + 1)]) == list(range(50))
    assert a[:25] != a[25:]
    # The hosts' items interleave into the one stream a single process reads.
    single = one_epoch(50, cfg(7), 0, 1)
    assert [x for pair in zip(other, a) for x in pair] == single
    assert one_epoch(10, data.LoaderConfig(batch_size=1, shuffle=False, num_epochs=1), 0, 1) == list(range(10))
    with pytest.raises(ValueError, match="gets no records"):
        one_epoch(2, cfg(0), 2, 3)


@pytest.fixture(scope="module")
def collator(processor):
    return Collator(processor, CollateConfig(length_buckets=(96, 192, 384), max_images=2), 32)


def assert_batches_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_iterator_state_restores_exactly(collator, tmp_path):
    import grain

    recs = sample_records(11)
    recs[4] = Record((b"broken",), recs[4].texts)  # skips are part of the state too
    config = data.LoaderConfig(batch_size=2, seed=5, num_threads=2, prefetch=4)
    make = lambda: iter(data.batches(recs, collator, config, process_index=0, process_count=1))  # noqa: E731
    it = make()
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # JSON: what grain's checkpoint handler writes
    (tmp_path / "ckpt").mkdir()  # Orbax makes it when the handler runs inside a CheckpointManager
    grain.checkpoint.CheckpointHandler().save(tmp_path / "ckpt", it)
    rest = [next(it) for _ in range(8)]  # into the second and third epochs

    resumed = make()
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(8)], rest)
    assert resumed.skipped == it.skipped and it.skipped["undecodable_image"] >= 2

    from_disk = make()
    grain.checkpoint.CheckpointHandler().restore(tmp_path / "ckpt", from_disk)
    assert_batches_equal([next(from_disk) for _ in range(8)], rest)


def test_pipeline_skips_and_counts_bad_records(collator):
    rng = np.random.default_rng(0)
    good = sample_records(6)
    long_text = Record((), (Turn("x" * 400, "y"),))
    bad = [
        {"texts": {"user": [b"q"], "assistant": [b"a"], "source": [b""]}},  # stored record without images
        Record((b"\xff\xd8\xff\xe0 truncated",), good[0].texts),
        Record((encoded(rng, 20, 20),) * 3, good[0].texts),  # over max_images
        long_text,
        Record((), (Turn("look: <image>", "a"),)),  # an image token without an image
    ]
    config = data.LoaderConfig(batch_size=2, num_epochs=1, seed=0, num_threads=1)
    it = iter(data.batches(good + bad, collator, config, process_index=0, process_count=1))
    out = list(it)
    assert len(out) == 3
    assert it.skipped == {"malformed": 2, "undecodable_image": 1, "too_many_images": 1, "too_long": 1}
    for b in out:
        assert b["input_ids"].shape[1] <= collator.config.max_length


def test_no_usable_records_is_a_clear_error(collator):
    bad = [Record((b"junk",), (Turn("q", "a"),))] * 3
    for epochs in (None, 1):
        it = iter(data.batches(bad, collator, data.LoaderConfig(batch_size=2, num_epochs=epochs, num_threads=1),
                               process_index=0, process_count=1))
        with pytest.raises(ValueError, match="no usable records"):
            next(it)
    # One usable record among bad ones: long runs of skips across epoch boundaries are not mistaken for none.
    recs = sample_records(1) + bad
    it = iter(data.batches(recs, collator, data.LoaderConfig(batch_size=1, seed=1, num_threads=1),
                           process_index=0, process_count=1))
    assert len([next(it) for _ in range(20)]) == 20
    assert it.skipped["undecodable_image"] >= 40


def test_last_partial_batch_is_padded_with_empty_rows(collator):
    recs = sample_records(5)
    config = data.LoaderConfig(batch_size=2, num_epochs=1, shuffle=False, drop_remainder=False, num_threads=1)
    out = list(data.batches(recs, collator, config, process_index=0, process_count=1))
    assert len(out) == 3
    last = out[-1]
    assert last["attention_mask"][1].sum() == 0 and (last["labels"][1] == IGNORE_INDEX).all()
    assert not last["pixel_values"][1].any()


def test_builder_to_batches_end_to_end(collator, tmp_path):
    recs = sample_records(6)
    write_parquet(tmp_path / "a.parquet", [cauldron_row(r) for r in recs])
    tfds_builder.build(str(tmp_path / "ds"), {"train": tfds_builder.ParquetSource((str(tmp_path / "a.parquet"),))})
    src = tfds_builder.data_source(str(tmp_path / "ds"), "train")
    config = data.LoaderConfig(batch_size=3, num_epochs=1, shuffle=False, num_threads=2)
    got = list(data.batches(src, collator, config, process_index=0, process_count=1))
    want = [collator.collate([collator.encode(r) for r in recs[i:i + 3]], 3) for i in (0, 3)]
    assert_batches_equal(got, want)


# -- collator ------------------------------------------------------------------------------------------------------


def label_runs(tokenizer, batch, row):
    """Decoded text of each contiguous run of labelled tokens."""
    idx = np.flatnonzero(batch["labels"][row] != IGNORE_INDEX)
    if not len(idx):
        return []
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1)
    return [tokenizer.decode(batch["labels"][row][r]) for r in runs]


def check_invariants(collator, recs, batch):
    """What every batch must satisfy, whatever the records."""
    tok = collator.processor.tokenizer
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pv, pmask = batch["pixel_values"], batch["pixel_attention_mask"]
    B, T = ids.shape
    assert T in collator.config.length_buckets and pv.shape[1] in collator.image_buckets
    assert pv.shape[2:] == (3, collator.image_size, collator.image_size) and pmask.shape == pv.shape[:2] + pv.shape[3:]
    assert ids.dtype == labels.dtype == mask.dtype == np.int32 and pv.dtype == np.float32 and pmask.dtype == bool
    check_inputs(testing.tiny_config(), ids, mask, pv, pmask)  # the model's own host-side checks
    for b in range(B):
        n = int(mask[b].sum())
        assert (mask[b, :n] == 1).all() and (mask[b, n:] == 0).all()  # right padding
        assert (ids[b, n:] == collator.pad_id).all() and (labels[b, n:] == IGNORE_INDEX).all()
        real = pv[b].reshape(pv.shape[1], -1).any(axis=1)
        n_real = int(real.sum())
        assert real[:n_real].all() and not pv[b, n_real:].any() and not pmask[b, n_real:].any()  # zero padding
        assert int((ids[b] == collator.image_token_id).sum()) == n_real * collator.image_seq_len
        on = labels[b] != IGNORE_INDEX
        assert (labels[b][on] == ids[b][on]).all()
        assert not (ids[b][on] == collator.image_token_id).any()
        if b < len(recs):
            want = [f" {t.assistant}{EOU}" for t in recs[b].texts]
            assert label_runs(tok, batch, b) == want


def test_labels_only_on_assistant_turns(collator):
    recs = [Record((), (Turn("hi", "hello"),)),
            Record(sample_records(3)[2].images, (Turn("what?", "a dog"), Turn("and then?", ""),
                                                 Turn("last", "Assistant: tricky <end_of_utterance"))),
            ]
    batch = collator.collate([collator.encode(r) for r in recs])
    check_invariants(collator, recs, batch)
    # Everything the template writes around the answers stays unlabelled.
    text = collator.processor.tokenizer.decode(batch["input_ids"][1][batch["attention_mask"][1] == 1])
    assert text.count("User:") == 3 and text.count("Assistant:") == 4


@pytest.mark.parametrize("splitting,longest_edge", [(True, None), (False, None), (True, 96), (True, 32)])
def test_image_tokens_equal_images_times_seq_len(processor, splitting, longest_edge):
    config = CollateConfig(length_buckets=(256, 1024), max_images=2, image_splitting=splitting,
                           longest_edge=longest_edge)
    col = Collator(processor, config, 32)
    per_image = 1 if not splitting else (-(-(longest_edge or 64) // 32)) ** 2 + (longest_edge != 32)
    assert col.image_buckets == (2 * per_image,)
    rng = np.random.default_rng(0)
    square = Record((encoded(rng, 40, 40), encoded(rng, 7, 7)), (Turn("two squares?", "yes"),))
    recs = sample_records(4) + [square]  # a square image makes the most sub-images: the bucket's worst case
    batch = col.collate([col.encode(r) for r in recs])
    check_invariants(col, recs, batch)
    real = batch["pixel_values"].reshape(len(recs), col.image_buckets[0], -1).any(axis=-1).sum(axis=1)
    assert real[-1] == 2 * per_image
    assert all(n <= per_image * len(r.images) for n, r in zip(real, recs))


def test_too_long_records_are_skipped_not_truncated(processor):
    col = Collator(processor, CollateConfig(length_buckets=(64,), max_images=1), 32)
    rec = Record(sample_records(2)[1].images, (Turn("q", "a"),))  # 64 image tokens alone fill the budget
    with pytest.raises(collate.TooLong):
        col.encode(rec)
    short = Record((), (Turn("q" * 20, "a" * 20),))
    assert len(col.encode(short).input_ids) <= 64
    with pytest.raises(collate.TooLong):
        col.encode(Record((), (Turn("q" * 40, "a" * 20),)))


def test_image_that_normalises_to_zeros_is_skipped():
    # With mean 0 and std 1, a black image becomes all zeros: the model's mark of a padding image.
    proc = testing.processor(testing.tiny_config())
    proc.image_processor.image_mean, proc.image_processor.image_std = [0.0] * 3, [1.0] * 3
    col = Collator(proc, CollateConfig(length_buckets=(512,)), 32)
    black, grey = (io.BytesIO(), io.BytesIO())
    Image.new("RGB", (40, 40)).save(black, "PNG")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(grey, "PNG")
    with pytest.raises(collate.BlankImage):
        col.encode(Record((black.getvalue(),), (Turn("q", "a"),)))
    col.encode(Record((grey.getvalue(),), (Turn("q", "a"),)))


def test_from_pretrained_reads_processor_and_image_size(tiny_hf):
    col = Collator.from_pretrained(tiny_hf, CollateConfig(length_buckets=(512,)))
    assert col.image_size == testing.tiny_config().vision.image_size
    assert col.image_seq_len == testing.tiny_config().image_seq_len
    assert col.batch_shapes == [(512, 5)]


def test_template_that_hides_the_answer_prefix_is_rejected(processor):
    import copy

    p = copy.copy(processor)
    # The generation prompt ("Assistant:") differs from what the answer turn writes ("Bot:").
    p.chat_template = hf_files.CHAT_TEMPLATE.replace("{{ 'Assistant:' }}", "{{ 'Bot:' }}")
    with pytest.raises(collate.TemplateError, match="prefix"):
        Collator(p, CollateConfig(), 32)


def test_idefics2_processor():
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    for split in (False, True):
        ip = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 32}, do_image_splitting=split)
        proc = Idefics2Processor(image_processor=ip, tokenizer=testing.char_tokenizer(), image_seq_len=4,
                                 chat_template=hf_files.CHAT_TEMPLATE)
        col = Collator(proc, CollateConfig(length_buckets=(128, 256), max_images=2), 32)
        assert col.image_buckets == ((10,) if split else (2,))
        recs = sample_records(3)
        batch = col.collate([col.encode(r) for r in recs])
        for b, r in enumerate(recs):
            assert label_runs(proc.tokenizer, batch, b) == [f" {t.assistant}{EOU}" for t in r.texts]
            n_real = int(batch["pixel_values"][b].reshape(col.image_buckets[0], -1).any(axis=1).sum())
            assert int((batch["input_ids"][b] == col.image_token_id).sum()) == 4 * n_real


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_decode_image_gives_rgb(mode):
    im = Image.new(mode, (7, 5))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buf = io.BytesIO()
    im.save(buf, fmt)
    out = records.decode_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (7, 5)


@pytest.fixture(scope="module")
def image_pool():
    rng = np.random.default_rng(4)
    sizes = [(1, 1), (3, 90), (90, 3), (31, 33), (64, 64), (50, 70), (120, 17), (200, 150)]
    return {s: encoded(rng, *s) for s in sizes}


turn_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.just("\n"),
                    max_size=24)


@st.composite
def record_lists(draw, pool_keys):
    out = []
    for _ in range(draw(st.integers(1, 3))):
        sizes = draw(st.lists(st.sampled_from(pool_keys), max_size=2))
        turns = draw(st.lists(st.tuples(turn_text, turn_text), min_size=1, max_size=3))
        out.append((sizes, turns))
    return out


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hyp=st.data())
def test_collator_invariants_hold_for_random_records(collator, image_pool, hyp):
    spec = hyp.draw(record_lists(sorted(image_pool)))
    recs = [Record(tuple(image_pool[s] for s in sizes), tuple(Turn(u, a) for u, a in turns)) for sizes, turns in spec]
    examples = []
    for r in recs:
        try:
            examples.append(collator.encode(r))
        except records.SkipRecord as e:
            event(f"skipped: {type(e).__name__}")
            # Only these may refuse a record drawn here: a literal special token in the text, or too many tokens.
            assert isinstance(e, (collate.TooLong, records.MalformedRecord)), e
            if isinstance(e, records.MalformedRecord):
                assert any(s in t for t in (x for turn in r.texts for x in (turn.user, turn.assistant))
                           for s in collator._reserved)
            return
    batch = collator.collate(examples, batch_size=len(examples) + hyp.draw(st.integers(0, 1)))
    check_invariants(collator, recs, batch)


def test_batch_gives_the_same_loss_in_transformers_and_jax(tiny_hf):
    """The batch contract end to end: right padding, an empty row, bool pixel mask, unshifted labels."""
    import torch
    from transformers import AutoModelForImageTextToText

    import idefics_jax

    col = Collator.from_pretrained(tiny_hf, CollateConfig(length_buckets=(256, 512), max_images=2))
    recs = sample_records(3)[1:] + [Record((), (Turn("hi", "hello"), Turn("and?", "bye")))]
    batch = col.collate([col.encode(r) for r in recs], batch_size=4)
    hf = AutoModelForImageTextToText.from_pretrained(tiny_hf).eval()
    with torch.no_grad():
        want = float(hf(**{k: torch.from_numpy(v).long() if k == "labels" else torch.from_numpy(v)
                           for k, v in batch.items()}).loss)
    labels = batch.pop("labels")
    logits = np.asarray(idefics_jax.load_pretrained(tiny_hf)(**batch), np.float64)[:, :-1]
    target, on = labels[:, 1:], labels[:, 1:] != IGNORE_INDEX
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    got = -np.take_along_axis(logp, np.where(on, target, 0)[..., None], -1)[..., 0][on].mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
