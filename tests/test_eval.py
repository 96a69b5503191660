"""`idefics-jax eval` end to end: shapes images with known answers in the published parquet layouts and in JSONL,
scored by the shipped tiny-shapes model; resuming after a kill; shards; bad input."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from idefics_jax.evaluate import metrics, run
from idefics_jax.evaluate.runner import messages_for
from idefics_jax.shapes import task as shapes


def shape_questions(n: int, seed: int):
    """(image, question) pairs of every kind (count, colour, shape)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        ex = shapes.sample(rng)
        out += [(ex.image, q) for q in ex.questions[:2]]
    return out[:n]


def write_jsonl(folder, items) -> str:
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    path = os.path.join(folder, "data.jsonl")
    with open(path, "w") as f:
        for i, (image, q) in enumerate(items):
            image.save(os.path.join(folder, "img", f"{i}.png"))
            f.write(json.dumps({"image": f"img/{i}.png", "question": q.text, "answers": [q.answer]}) + "\n")
    return path


@pytest.fixture(scope="module")
def chat():
    from idefics_jax.generation.chat import Chat

    return Chat.load("tiny-shapes")


def model_answers(chat, prompts_images, max_new_tokens):
    return chat.answers([(messages_for(p, len(ims)), ims) for p, ims in prompts_images],
                        max_new_tokens=max_new_tokens)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_jsonl_exact_match(chat, tmp_path):
    items = shape_questions(10, seed=3)
    data = write_jsonl(str(tmp_path / "d"), items)
    r = run(chat, "exact_match", data, str(tmp_path / "out"), batch_size=4, progress=False)
    # The questions as written; the expected score from the model's own answers, compared as exact_match says.
    ours = model_answers(chat, [(q.text, [im]) for im, q in items], 32)
    expected = np.mean([a.strip().lower() == q.answer for a, (_, q) in zip(ours, items)])
    assert (r["task"], r["metric"], r["count"]) == ("exact_match", "exact_match", 10)
    assert r["score"] == pytest.approx(expected) and r["score"] >= 0.8  # tiny-shapes answers ~97% right
    saved = json.load(open(tmp_path / "out" / "results.json"))
    assert saved["score"] == r["score"] and saved["config"]["batch_size"] == 4 and saved["timing"]["answered"] == 10
    recs = lines(tmp_path / "out" / "samples.jsonl")
    assert [x["index"] for x in recs] == list(range(10))
    assert [x["prediction"] for x in recs] == ours and recs[0]["references"] == [items[0][1].answer]


def _struct(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_parquet_vqav2_layout(chat, tmp_path):
    """lmms-lab/VQAv2's columns: image struct, answers as {answer, answer_confidence, answer_id} dicts (10), the
    task's instruction appended; number answers spelled out by some humans."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = shape_questions(6, seed=4)
    words = {"1": "one", "2": "two", "3": "three", "4": "four"}
    rows = []
    for i, (image, q) in enumerate(items):
        humans = [q.answer] * 7 + [words.get(q.answer, q.answer).upper()] * 2 + ["no idea"]
        rows.append({"question_id": 100 + i, "question": q.text, "image": _struct(image),
                     "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j, a in enumerate(humans)], "multiple_choice_answer": q.answer})
    folder = tmp_path / "vqav2" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "validation-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[4:]), folder / "validation-00001-of-00002.parquet")
    r = run(chat, "vqav2", str(tmp_path / "vqav2"), str(tmp_path / "out"), batch_size=3, progress=False)
    prompt = "\nAnswer the question using a single word or phrase."
    ours = model_answers(chat, [(q.text + prompt, [im]) for im, q in items], 16)
    expected = [metrics.vqa_accuracy(a, [d["answer"] for d in row["answers"]]) for a, row in zip(ours, rows)]
    assert r["count"] == 6 and r["score"] == pytest.approx(np.mean(expected))
    recs = lines(tmp_path / "out" / "samples.jsonl")
    assert [x["id"] for x in recs] == [str(100 + i) for i in range(6)]
    assert [x["score"] for x in recs] == pytest.approx(expected)


def test_parquet_mmmu_layout_by_subject(chat, tmp_path):
    """MMMU/MMMU: a folder per subject, options as a Python list's repr, image_1..image_7, per-subject scores;
    answered by a running serving engine passed in."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = shape_questions(4, seed=6)
    for subject, part in (("Art", items[:2]), ("Math", items[2:])):
        rows = []
        for i, (image, q) in enumerate(part):
            options = sorted({q.answer, "7", "purple", "hexagon"})
            rows.append({"id": f"validation_{subject}_{i + 1}", "question": q.text, "options": repr(options),
                         "answer": "ABCD"[options.index(q.answer)], "image_1": _struct(image), "image_2": None,
                         "question_type": "multiple-choice"})
        (tmp_path / "mmmu" / subject).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mmmu" / subject / "validation-00000-of-00001.parquet")
    from idefics_jax.serve.engine import Engine

    # A serving engine the caller started: eval queues its requests there and leaves it running.
    with Engine(chat.model, chat, slots=4) as engine:
        admitted = []  # the requests each prefill round got: a batch's arrive together, none trickles in alone
        prefill_many = engine.decoder.prefill_many
        engine.decoder.prefill_many = lambda reqs: admitted.append(len(reqs)) or prefill_many(reqs)
        r = run(engine, "mmmu", str(tmp_path / "mmmu"), str(tmp_path / "out"), batch_size=4, progress=False)
        assert admitted == [4]
        assert engine.stats["finished"] == 4 and engine.load() == {"active": 0, "waiting": 0}
        assert engine.answer_all([(messages_for(items[0][1].text, 1), [items[0][0]])], max_tokens=4)
    recs = lines(tmp_path / "out" / "samples.jsonl")
    assert all(x["question"].endswith("Answer with the option's letter from the given choices directly.")
               for x in recs)
    assert all(x["parsed"] in "ABCD" and x["score"] == float(x["parsed"] == x["references"][0]) for x in recs)
    assert set(r["subjects"]) == {"Art", "Math"} and r["subjects"]["Art"]["count"] == 2
    assert r["score"] == pytest.approx(np.mean([x["score"] for x in recs]))


def fake_answers(requests):
    """A model stand-in: the question's length as the answer."""
    return [str(len(m[0]["content"][-1]["text"]) % 3) for m, _, _ in requests]


def test_shards_and_torn_line(tmp_path):
    items = shape_questions(7, seed=7)
    data = write_jsonl(str(tmp_path / "d"), items)
    whole = run(None, "exact_match", data, str(tmp_path / "whole"), answer_fn=fake_answers, progress=False)
    out = str(tmp_path / "sharded")
    first = run(None, "exact_match", data, out, shard="0/2", answer_fn=fake_answers, progress=False)
    assert first["count"] == 4 and not os.path.exists(os.path.join(out, "results.json"))
    # A kill in the middle of a write leaves half a line: it is dropped and the sample answered again.
    path = os.path.join(out, "samples.1-of-2.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"index": 1, "id": "1", "prediction": "x", "references": ["y"], "score": 0.0}) + "\n")
        f.write('{"index": 3, "id": "3", "predic')
    second = run(None, "exact_match", data, out, shard="1/2", answer_fn=fake_answers, progress=False)
    assert second["timing"]["shards"][1]["answered"] == 2  # 3 and 5; 1 was kept
    merged = json.load(open(os.path.join(out, "results.json")))
    assert merged["count"] == whole["count"] == 7
    recs = {x["index"] for x in lines(path)}
    assert recs == {1, 3, 5} and len(lines(path)) == 3


def test_other_run_in_the_same_folder_is_refused(tmp_path):
    data = write_jsonl(str(tmp_path / "d"), shape_questions(2, seed=8))
    run(None, "exact_match", data, str(tmp_path / "o"), answer_fn=fake_answers, progress=False)
    with pytest.raises(ValueError, match="holds another run.*task 'exact_match' -> 'vqav2'"):
        run(None, "vqav2", data, str(tmp_path / "o"), answer_fn=fake_answers, progress=False)


@pytest.mark.parametrize("content, msg", [
    ('{"question": "q"}\n', r"data.jsonl:1: needs \"answers\""),
    ('{"question": "q", "answers": ["a"]}\nnot json\n', "data.jsonl:2: not a JSON object"),
])
def test_bad_jsonl_is_one_line(tmp_path, capsys, content, msg):
    from idefics_jax.cli import main

    (tmp_path / "data.jsonl").write_text(content)
    rc = main(["eval", "--task", "exact_match", "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("idefics-jax eval: error:")
    import re
    assert re.search(msg, err)


def test_missing_data_is_one_line(tmp_path, capsys):
    from idefics_jax.cli import main

    assert main(["eval", "--task", "vqav2", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert "no such data file or folder" in capsys.readouterr().err


def test_resume_after_kill(tmp_path):
    """SIGKILL `idefics-jax eval` once some batches are written; the rerun answers only the rest."""
    data = write_jsonl(str(tmp_path / "d"), shape_questions(24, seed=9))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "idefics_jax.cli", "eval", "--task", "exact_match", "--data", data,
           "--out", str(out), "--batch-size", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    samples = out / "samples.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if samples.exists() and len(samples.read_bytes().splitlines()) >= 4:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = len(lines(samples))
    assert 4 <= before < 24 and not (out / "results.json").exists()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = lines(samples)
    assert sorted(x["index"] for x in recs) == list(range(24))  # every sample once
    res = json.load(open(out / "results.json"))
    assert res["count"] == 24 and res["timing"]["answered"] == 24 - before
    assert res["score"] == pytest.approx(np.mean([x["score"] for x in recs]))
