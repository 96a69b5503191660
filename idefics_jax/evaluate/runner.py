"""Run a task over a dataset: batched greedy answers, per-sample scores, a results file; resumable and sharded.
The answers come from the serving engine (idefics_jax.serve.engine), `batch_size` requests decoding together.

    from idefics_jax.evaluate import run
    results = run("tiny-shapes", "exact_match", "data.jsonl", "out/eval", limit=100)

Writes OUT/samples.jsonl (one line per sample, appended batch by batch: a killed run restarts where it stopped,
nothing answered twice) and, once every sample is in, OUT/results.json {"task", "metric", "score", "count",
"config", "timing", ...}. Several hosts split the samples (sample i goes to shard i % n; default: jax's process
index and count), each appending to its own OUT/samples.<i>-of-<n>.jsonl; the shard that finishes last writes
results.json over all of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Callable, Sequence

from idefics_jax.evaluate.data import Dataset, Sample
from idefics_jax.evaluate.tasks import Task, get
from idefics_jax.runtime.progress import Progress

# The split each task is scored on (lmms-eval's `test_split`): what a hub dataset's omitted split means.
EVAL_SPLITS = {"vqav2": "validation", "textvqa": "validation", "docvqa": "validation", "chartqa": "test",
               "mmmu": "validation"}

# (messages, images, max_new_tokens) -> answer text. By default the serving engine answers (engine_answerer).
Query = tuple[list[dict], list, int]
AnswerFn = Callable[[Sequence[Query]], list[str]]


def engine_answerer(engine, **request_kwargs) -> AnswerFn:
    """Answers through a started serving `Engine` (idefics_jax.serve.engine): a batch's queries are queued
    together and decode in its slots, each greedy answer the tokens `generate` gives it alone; `request_kwargs`
    go into every Request (ignore_eos=True for answers of a fixed length, say)."""
    from idefics_jax.serve.engine import Request

    def answer(queries: Sequence[Query]) -> list[str]:
        return engine.answer_all([Request(m, i, max_tokens=n, **request_kwargs) for m, i, n in queries])

    return answer


def messages_for(prompt: str, n_images: int) -> list[dict]:
    """The user turn: the images first, then the prompt (as the SmolVLM model cards ask)."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]


def parse_shard(spec: str | None) -> tuple[int, int]:
    """"i/n" -> (i, n); None -> jax's (process_index, process_count)."""
    if spec is None:
        import jax

        return jax.process_index(), jax.process_count()
    try:
        i, n = (int(v) for v in spec.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n (e.g. 0/4); got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard {spec!r}: need 0 <= i < n")
    return i, n


def _samples_file(out: str, shard: tuple[int, int]) -> str:
    i, n = shard
    return os.path.join(out, "samples.jsonl" if n == 1 else f"samples.{i}-of-{n}.jsonl")


def _read_done(path: str, repair: bool = True) -> dict[int, dict]:
    """The samples already answered. A line cut short by a kill is dropped (and, with `repair`, cut off the file:
    only a shard's own file, never one another host may be appending to)."""
    done: dict[int, dict] = {}
    if not os.path.exists(path):
        return done
    good = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            done[rec["index"]] = rec
            good += len(line)
    if repair and good != os.path.getsize(path):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def _check_run(out: str, config: dict) -> None:
    """OUT/run.json records what the folder holds; resuming with another task, data or limit is an error."""
    path = os.path.join(out, "run.json")
    key = {k: config[k] for k in ("task", "data", "limit", "shards")}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != key:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in key.items() if old.get(k) != v)
            raise ValueError(f"{out} holds another run ({diff}); use another --out")
    else:
        _write_json(path, key)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def summarize(task: Task, records: list[dict]) -> dict:
    """score (mean of the per-sample scores), count and, for tasks by subject, each subject's."""
    out: dict[str, Any] = {"task": task.name, "metric": task.metric,
                           "score": sum(r["score"] for r in records) / max(len(records), 1), "count": len(records)}
    if task.by_subject:
        subjects: dict[str, list[float]] = {}
        for r in records:
            subjects.setdefault(r.get("subject") or "unknown", []).append(r["score"])
        out["subjects"] = {k: {"score": sum(v) / len(v), "count": len(v)} for k, v in sorted(subjects.items())}
    return out


def _record(task: Task, s: Sample, prompt: str, prediction: str) -> dict:
    rec = {"index": s.index, "id": s.id, "question": prompt, "prediction": prediction, "references": s.answers,
           "score": float(task.score(prediction, s))}
    if task.parse is not None:
        rec["parsed"] = task.parse(prediction, s)
    if s.subject is not None:
        rec["subject"] = s.subject
    return rec


def run(model, task: str | Task, data: str, out: str, *, limit: int | None = None, batch_size: int = 16,
        max_new_tokens: int | None = None, shard: str | tuple[int, int] | None = None,
        answer_fn: AnswerFn | None = None, progress: bool = True, dtype=None, max_len: int | None = None,
        load: Callable | None = None) -> dict:
    """Evaluates `model` (any model name `Chat.load` takes, or with `load` whatever it takes, e.g. the training
    layer's `load_chat` for a WORKDIR; a `Chat`; or a started serving `Engine`, which is left running) on `task`
    over `data` (see `idefics_jax.evaluate.data`), the first `limit` samples; answers
    come from a serving engine with `batch_size` slots of `max_len` cache positions (prompt + answer; default the
    engine's: the model's positions, at most 2048), or from `answer_fn`. Returns results.json's content; for a
    shard that is not the last to finish, its own shard's results (also in OUT/results.<i>-of-<n>.json)."""
    task = get(task) if isinstance(task, str) else task
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch size must be a positive integer; got {batch_size!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1; got {limit}")
    shard = shard if isinstance(shard, tuple) else parse_shard(shard)
    dataset = Dataset(data, split=EVAL_SPLITS.get(task.name, ("validation", "test")))
    total = len(dataset) if limit is None else min(limit, len(dataset))
    n_new = max_new_tokens or task.max_new_tokens
    config = {"model": model if isinstance(model, str) else type(model).__name__, "task": task.name,
              "data": dataset.name, "limit": limit, "batch_size": batch_size, "max_new_tokens": n_new,
              "shards": shard[1]}
    os.makedirs(out, exist_ok=True)
    _check_run(out, config)
    path = _samples_file(out, shard)
    done = _read_done(path)
    mine = range(shard[0], total, shard[1])

    t0 = time.perf_counter()
    answered, load_s = 0, 0.0
    if len(done) < len(mine):
        engine = None
        if answer_fn is None:
            from idefics_jax.generation.chat import Chat
            from idefics_jax.serve.engine import Engine

            if isinstance(model, Engine):
                answer_fn = engine_answerer(model)
            else:
                t = time.perf_counter()
                chat = model if isinstance(model, Chat) else (load or Chat.load)(model, dtype=dtype)
                load_s = time.perf_counter() - t
                engine = Engine(chat.model, chat, slots=min(batch_size, len(mine) - len(done)),
                                max_len=max_len).start()
                answer_fn = engine_answerer(engine)
        try:
            answered = _answer(task, dataset, mine, done, path, answer_fn, batch_size, n_new, progress)
        finally:
            if engine is not None:
                engine.stop(timeout=0)  # a finished run leaves nothing queued; after an error, drop the rest
    seconds = time.perf_counter() - t0 - load_s
    timing = {"seconds": round(seconds, 3), "load_seconds": round(load_s, 3), "answered": answered,
              "samples_per_s": round(answered / seconds, 3) if answered and seconds > 0 else None}

    records = [done[i] for i in mine]
    result = {**summarize(task, records), "config": config, "timing": timing}
    if shard[1] == 1:
        _write_json(os.path.join(out, "results.json"), result)
        return result
    _write_json(os.path.join(out, f"results.{shard[0]}-of-{shard[1]}.json"), result)
    return _merge_if_complete(task, out, total, shard[1], config) or result


def _answer(task, dataset, mine, done, path, answer_fn, batch_size, n_new, progress) -> int:
    """Answers the samples of `mine` not in `done`, appending each batch to `path`; returns how many."""
    wanted = set(mine) - set(done)
    answered = 0
    # Counts this run's samples only, so that its rate is this run's samples/s after a resume.
    bar = Progress(task.name, len(wanted), unit="samples", enabled=progress)
    with open(path, "a") as f, contextlib.closing(bar):
        batch: list[Sample] = []

        def flush():
            prompts = [task.prompt(s) for s in batch]
            queries = [(messages_for(p, len(s.images)), s.load_images(), n_new) for p, s in zip(prompts, batch)]
            answers = answer_fn(queries)
            if len(answers) != len(queries):
                raise ValueError(f"the answer function gave {len(answers)} answers to {len(queries)} queries")
            for s, p, a in zip(batch, prompts, answers):
                rec = _record(task, s, p, a)
                done[s.index] = rec
                f.write(json.dumps(rec) + "\n")
            f.flush()  # a kill after this loses nothing of the batch
            bar.update(len(batch))
            batch.clear()

        for s in dataset:
            if s.index >= mine.stop:
                break
            if s.index in wanted:
                batch.append(s)
                if len(batch) == batch_size:
                    answered += len(batch)
                    flush()
        if batch:
            answered += len(batch)
            flush()
    return answered


def _merge_if_complete(task: Task, out: str, total: int, n: int, config: dict) -> dict | None:
    """results.json over every shard, once every shard has answered all of its samples."""
    records = []
    for i in range(n):
        done = _read_done(_samples_file(out, (i, n)), repair=False)
        if any(j not in done for j in range(i, total, n)):
            return None
        records += [done[j] for j in range(i, total, n)]
    records.sort(key=lambda r: r["index"])
    timings = []
    for i in range(n):
        with open(os.path.join(out, f"results.{i}-of-{n}.json")) as f:
            timings.append(json.load(f)["timing"])
    result = {**summarize(task, records), "config": config, "timing": {
        "seconds": max(t["seconds"] for t in timings), "answered": sum(t["answered"] for t in timings),
        "shards": timings}}
    _write_json(os.path.join(out, "results.json"), result)
    return result
