"""Training you can watch: data mixtures (shares as weighted, resumable), TensorBoard event files read back with
TensorBoard's own reader, a resumed run continuing the same event stream, W&B offline, benchmarks during a run."""

import collections
import json
import os
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from idefics_jax.shapes import task as shapes
from idefics_jax.train import config as config_lib, data, records, tfds_builder, trainer
from idefics_jax.train.collate import CollateConfig, Collator
from idefics_jax.train.config import ConfigError

SHIPPED = "idefics_jax/models/tiny-shapes"


@pytest.mark.parametrize("hosts", [1, 2])
def test_mixture_shares_match_the_weights(hosts):
    """Two sources at 3:1, shuffled and repeated as training reads them: over 1,000 records of a host's stream
    each source's share is its weight's within 3 points, on every host and in every window of 250."""
    mix = data.Mixture((list(range(100)), list(range(1000, 1007))), (3.0, 1.0))
    ds = data.mixture_dataset(mix, data.LoaderConfig(batch_size=1), process_index=hosts - 1, process_count=hosts)
    tags = [t for t, _ in ds[:1000]]
    shares = collections.Counter(tags)
    print(f"host {hosts - 1} of {hosts}: source shares over 1000 records {shares[0] / 1000}, {shares[1] / 1000} "
          "(weights 0.75, 0.25)")
    for start in range(0, 1000, 250):
        share = collections.Counter(tags[start:start + 250])[1] / 250
        assert abs(share - 0.25) <= 0.03, (start, share)
    assert abs(shares[1] / 1000 - 0.25) <= 0.03


def test_mixture_batches_count_sources_and_resume_exactly():
    """Through the real loader (records encoded by the tiny-shapes processor): the iterator counts each source's
    records; restored from its saved state it continues with the same batches and the same counts."""
    a, b = ([records.from_dict(d) for d in shapes.records(n, seed=seed, questions_per_image=1)]
            for n, seed in ((6, 1), (4, 2)))
    mix = data.Mixture((a, b), (1.0, 1.0))
    collator = Collator.from_pretrained(SHIPPED, CollateConfig(length_buckets=(256,), image_splitting=False,
                                                               max_images=1))
    cfg = data.LoaderConfig(batch_size=2, seed=3, num_threads=2)
    it = iter(data.batches(mix, collator, cfg, process_index=0, process_count=1))
    for _ in range(3):
        next(it)
    assert it.records_by_source == {0: 3, 1: 3}
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint keeps it
    ahead = [next(it) for _ in range(3)]
    again = iter(data.batches(mix, collator, cfg, process_index=0, process_count=1))
    again.set_state(state)
    for want in ahead:
        got = next(again)
        assert all((got[k] == want[k]).all() for k in want)
    assert again.records_by_source == it.records_by_source == {0: 6, 1: 6}


def test_mixture_config_errors():
    ok = config_lib.load("tiny", ["data.train=[{source: a, weight: 3}, {source: b}]"])
    assert [(s.source, s.weight) for s in ok.data.train] == [("a", 3.0), ("b", 1.0)]
    assert config_lib.load("tiny", ["data.train=some/dir:train"]).data.train[0].source == "some/dir:train"
    for bad, msg in [("[{source: a, weight: 0}]", "weight 0.0 is not a positive number"),
                     ("[{source: a}, {source: a}]", "named twice"),
                     ("[{weight: 2}]", r"data.train\[0\]: name a source"),
                     ("[{source: a, wieght: 2}]", "unknown config field 'data.train.0..wieght'")]:
        with pytest.raises(ConfigError, match=msg):
            config_lib.load("tiny", [f"data.train={bad}"])
    with pytest.raises(ConfigError, match="task 'nope' is not one of"):
        config_lib.load("tiny", ["eval.tasks=[{task: nope, data: x.jsonl}]"])


def _records(path, n, seed):
    tfds_builder.build(path, {"train": tfds_builder.GeneratedSource(lambda: shapes.records(n, seed=seed))})
    return path


def _eval_jsonl(folder) -> str:
    """Four tiny-shapes questions in `idefics-jax eval`'s JSONL form."""
    with open(os.path.join(SHIPPED, "examples", "questions.json")) as f:
        items = json.load(f)
    path = os.path.join(folder, "questions.jsonl")
    with open(path, "w") as f:
        for item in items[:2]:
            for q in item["questions"][:2]:
                image = os.path.abspath(os.path.join(SHIPPED, "examples", item["image"]))
                f.write(json.dumps({"image": image, "question": q["text"], "answers": [q["answer"]]}) + "\n")
    return path


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_wandb_and_benchmarks_and_a_resume_without_duplicate_steps(tmp_path, monkeypatch):
    """A two-source run logs every metric to TensorBoard (read back by TensorBoard's EventAccumulator), to W&B in
    offline mode, and scores a benchmark through the evaluation runner. Then the state a kill leaves: steps logged
    past the newest checkpoint. The resumed run drops them and logs each step once, with the same values."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    a, b = _records(str(tmp_path / "a"), 24, 5), _records(str(tmp_path / "b"), 24, 6)
    questions = _eval_jsonl(str(tmp_path))
    work = tmp_path / "run"
    mixture = f"[{{source: {a}, weight: 3}}, {{source: {b}, weight: 1}}]"

    args = [f"workdir={work}", f"data.train={mixture}", "steps=4", "log_every=1", "save_every=2", "data.eval=",
            "eval_every=4", "data.batch_size=4", "optim.warmup_steps=1", "logging.wandb=idefics-test",
            f"eval.tasks=[{{task: exact_match, data: {questions}, limit: 3, name: shapes}}]", "eval.batch_size=4"]

    first = trainer.train(config_lib.load("configs/tiny.yaml", args))
    assert abs(first["data_share/" + a] - 0.75) <= 0.03 and abs(first["data_share/" + b] - 0.25) <= 0.03
    before = _scalars(work / "tensorboard")
    assert [s for s, _ in before["loss"]] == list(range(1, 5))

    shutil.rmtree(work / "checkpoints" / "4")  # killed after logging step 4, before its save completed: resumes from 2
    last = trainer.train(config_lib.load("configs/tiny.yaml", args))

    tb = _scalars(work / "tensorboard")
    with open(work / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 5))  # no step twice in metrics.jsonl either
    for tag in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "real_token_fraction", "mfu",
                "data_share/" + a, "data_share/" + b):
        assert [s for s, _ in tb[tag]] == list(range(1, 5)), tag
        for (s, v), r in zip(tb[tag], rows):
            assert v == pytest.approx(r[tag], rel=1e-6), (tag, s)
    for (s, v), (s0, v0) in zip(tb["loss"], before["loss"]):  # the steps done again equal the dropped ones
        assert v == pytest.approx(v0, rel=1e-5), s
    assert [s for s, _ in tb["eval_shapes_exact_match"]] == [4]

    results = json.loads((work / "eval" / "step-4" / "shapes" / "results.json").read_text())
    assert (results["task"], results["count"]) == ("exact_match", 3)
    assert last["eval_shapes_exact_match"] == results["score"] == tb["eval_shapes_exact_match"][-1][1]

    run_id = (work / "wandb-id").read_text().strip()
    runs = sorted((work / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2 and all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)


def test_wandb_missing_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    from idefics_jax import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = cli.main(["train", "tiny", f"workdir={tmp_path / 'w'}", "logging.wandb=proj"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "logging.wandb: proj: Weights & Biases is not installed" in line, line
    assert not (tmp_path / "w").exists()  # refused before anything was written


def test_a_resumed_writer_cuts_back_what_a_kill_left(tmp_path):
    """Steps logged past the resumed step, and a record or line a kill cut short, are gone before the new rows."""
    from etils import epath

    from idefics_jax.train.writers import MetricsFile, TensorBoard

    work = epath.Path(tmp_path)
    tb, jsonl = TensorBoard(work / "tb", 0), MetricsFile(work / "metrics.jsonl", resume_at=0)
    for step in range(1, 6):
        tb.write({"step": step, "loss": float(step)})
        jsonl.write({"step": step, "loss": float(step)})
    (old,) = (work / "tb").iterdir()
    old.write_bytes(old.read_bytes()[:-3])  # killed while writing step 5
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    tb, jsonl = TensorBoard(work / "tb", 3), MetricsFile(work / "metrics.jsonl", resume_at=3)
    for step in (4, 5):
        tb.write({"step": step, "loss": 10.0 * step})
        jsonl.write({"step": step, "loss": 10.0 * step})
    assert _scalars(work / "tb")["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    with open(work / "metrics.jsonl") as f:
        assert [json.loads(line)["loss"] for line in f] == [1.0, 2.0, 3.0, 40.0, 50.0]


def test_wandb_without_an_account_is_a_one_line_error(tmp_path, monkeypatch):
    import wandb

    from idefics_jax.train.writers import WandB

    wandb.teardown()  # an earlier offline run in this process leaves its settings in wandb's singleton
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_lib.load("tiny", [f"workdir={tmp_path}", "logging.wandb=proj"])
    with pytest.raises(ValueError, match=r"^logging.wandb: proj: No API key configured.*WANDB_MODE=offline"):
        WandB(cfg)
