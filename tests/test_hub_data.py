"""Datasets named on the hub (`org/name[@revision][:subset][:split]`) for evaluation and training, read offline from
a real hub-cache layout written here: `datasets--org--name/` with blobs, snapshots/<commit>/ and refs/main, README.md
`configs:` YAML and parquet shards whose images are `{bytes, path}` structs, as the hub stores them."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import reference as testing
from idefics_jax.checkpoints import hub_data
from idefics_jax.shapes import task as shapes

VQA, CAULDRON = "acme/shapes-vqa", "acme/cauldron-mini"
MAIN, NEXT = "c" * 40, "d" * 40

# lmms-lab/DocVQA's README, trimmed: subsets as folders, a split each data_files entry names (and train shards the
# YAML leaves out, which are no split).
VQA_README = """---
license: apache-2.0
configs:
- config_name: shapes
  data_files:
  - split: validation
    path: shapes/validation-*
  - split: test
    path: shapes/test-*
- config_name: colors
  data_files:
  - split: validation
    path: colors/validation-*
---
# Shapes VQA
"""
# HuggingFaceM4/the_cauldron's README, trimmed.
CAULDRON_README = """---
configs:
- config_name: shapes
  data_files:
  - split: train
    path: shapes/train-*
---
"""


def _png(image) -> dict:
    return {"bytes": shapes.png_bytes(image), "path": None}


def vqa_rows(n: int, seed: int) -> list[dict]:
    """lmms-lab/VQAv2's columns: question_id, question, image struct, answers [{answer, answer_confidence,
    answer_id}]."""
    rng, rows = np.random.default_rng(seed), []
    while len(rows) < n:
        ex = shapes.sample(rng)
        q = ex.questions[0]
        rows.append({"question_id": 1000 * seed + len(rows), "question": q.text, "image": _png(ex.image),
                     "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": j + 1}
                                 for j in range(10)]})
    return rows


def cauldron_rows(n: int, seed: int) -> list[dict]:
    """The Cauldron's columns: images [{bytes, path}], texts [{user, assistant, source}]."""
    return [{**r, "images": [{"bytes": b, "path": None} for b in r["images"]]} for r in shapes.records(n, seed=seed)]


def write(folder, files: dict) -> str:
    for rel, content in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, str):
            open(path, "w").write(content)
        else:
            pq.write_table(pa.Table.from_pylist(content), path)
    return str(folder)


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    rows = vqa_rows(6, seed=1)
    vqa = write(root / "src-vqa", {
        "README.md": VQA_README, ".gitattributes": "*.parquet filter=lfs\n",
        "shapes/validation-00000-of-00002.parquet": rows[:3], "shapes/validation-00001-of-00002.parquet": rows[3:],
        "shapes/test-00000-of-00001.parquet": vqa_rows(2, seed=2),
        "shapes/train-00000-of-00001.parquet": vqa_rows(2, seed=3),  # left out of the YAML: no split
        "colors/validation-00000-of-00001.parquet": vqa_rows(2, seed=4)})
    testing.write_hub_cache(str(root / "home" / "hub"), VQA, {MAIN: vqa}, {"main": MAIN}, repo_type="dataset")
    cauldron = write(root / "src-cauldron", {"README.md": CAULDRON_README,
                                             "shapes/train-00000-of-00001.parquet": cauldron_rows(24, seed=5)})
    testing.write_hub_cache(str(root / "home" / "hub"), CAULDRON, {MAIN: cauldron}, {"main": MAIN},
                            repo_type="dataset")
    return str(root / "home")


@pytest.fixture
def offline(hf_home, monkeypatch):
    """This process reading the hub cache of `hf_home` offline (huggingface_hub reads its paths on import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", hf_home)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(hf_home, "hub"))
    return hf_home


def test_eval_from_the_hub_cache_offline(offline, tmp_path, capsys):
    from idefics_jax import cli
    from idefics_jax.evaluate import run

    seen = []
    result = run("tiny-shapes", "exact_match", f"{VQA}:shapes:validation", str(tmp_path / "eval"), batch_size=4,
                 progress=False, answer_fn=lambda q: seen.extend(q) or ["x"] * len(q))
    # The validation split's two shards in order (not test's, nor the train shards the YAML leaves out), images
    # decoded from the hub's {bytes, path} structs; recorded at the commit they were read from.
    want = vqa_rows(6, seed=1)
    assert result["count"] == 6 and result["config"]["data"] == f"{VQA}@{MAIN}:shapes:validation"
    samples = [json.loads(x) for x in open(tmp_path / "eval" / "samples.jsonl")]
    assert [s["id"] for s in samples] == [str(w["question_id"]) for w in want]
    assert [s["question"] for s in samples] == [w["question"] for w in want]
    assert [s["references"] for s in samples] == [[w["answers"][0]["answer"]] * 10 for w in want]
    assert len(seen) == 6 and all(len(ims) == 1 and ims[0].mode == "RGB" for _, ims, _ in seen)
    # An omitted split is the task's usual one: validation for vqav2, test for chartqa.
    r = run("tiny-shapes", "vqav2", f"{VQA}:shapes", str(tmp_path / "e2"), limit=1, progress=False,
            answer_fn=lambda q: ["x"] * len(q))
    assert r["config"]["data"].endswith(":shapes:validation")
    r = run("tiny-shapes", "chartqa", f"{VQA}:shapes", str(tmp_path / "e3"), limit=1, progress=False,
            answer_fn=lambda q: ["x"] * len(q))
    assert r["config"]["data"].endswith(":shapes:test") and r["count"] == 1
    # The command takes the same names; a split the subset lacks is one line listing its splits.
    assert cli.main(["eval", "--task", "vqav2", "--data", f"{VQA}:shapes:train", "--out", str(tmp_path / "e4")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == ("idefics-jax eval: error: acme/shapes-vqa:shapes:train: no split 'train' in "
                                        "subset 'shapes' (splits: validation, test); read from the hub cache, "
                                        "which holds what was downloaded")


def test_training_data_from_the_hub_cache_offline(offline, tmp_path):
    """`data.train: org/name:subset:train`: the trainer's batches come from the split, built once into records
    keyed by repository, commit, subset and split; the run's commit pinned in its WORKDIR."""
    from idefics_jax.checkpoints.registry import resolve
    from idefics_jax.train import config as config_lib, sources, trainer

    cfg = config_lib.load("configs/tiny.yaml", [f"workdir={tmp_path / 'run'}", f"data.train={CAULDRON}:shapes:train",
                                                "data.batch_size=4"])
    _, batches = trainer._data(cfg, resolve("tiny-shapes"))
    batch = next(batches)
    assert batch["input_ids"].shape[0] == 4 and batch["pixel_values"].shape[0] == 4
    records = os.path.join(offline, "idefics-jax", "records", "acme--cauldron-mini", MAIN, "shapes", "train")
    info = json.load(open(os.path.join(records, "cauldron_records", "1.0.0", "dataset_info.json")))
    assert info["splits"][0]["shardLengths"] == ["24"]
    pins = json.load(open(tmp_path / "run" / "hub-data.json"))
    assert pins == {f"train:{CAULDRON}:shapes:train": f"{CAULDRON}@{MAIN}:shapes:train"}
    # A dataset not in The Cauldron's layout is one line naming its columns.
    with pytest.raises(ValueError, match=rf"^{VQA}@{MAIN}:shapes:validation: not in The Cauldron's layout "
                                         r"\(training reads columns images and texts; this split has question_id, "):
        sources.source(f"{VQA}:shapes", "eval", cfg)


def test_training_records_are_reused_and_a_run_keeps_its_commit(offline, tmp_path, monkeypatch):
    from idefics_jax.train import config as config_lib, records, sources, tfds_builder

    cfg = config_lib.load("configs/tiny.yaml", [f"workdir={tmp_path / 'run'}"])
    first = sources.source(f"{CAULDRON}:shapes", "train", cfg)  # split omitted: train
    assert len(first) == 24

    def no_build(*a, **k):
        raise AssertionError("built again")

    with monkeypatch.context() as m:
        m.setattr(tfds_builder, "build", no_build)
        other = config_lib.load("configs/tiny.yaml", [f"workdir={tmp_path / 'other'}"])
        again = sources.source(f"{CAULDRON}:shapes:train", "train", other)
    assert records.from_example(again[3]) == records.from_example(first[3])

    # main moves to a commit with other data: a new run reads it, the first run keeps reading its own commit.
    src = write(tmp_path / "next", {"README.md": CAULDRON_README,
                                    "shapes/train-00000-of-00001.parquet": cauldron_rows(10, seed=6)})
    testing.write_hub_cache(os.path.join(offline, "hub"), CAULDRON, {NEXT: src}, {"main": NEXT}, repo_type="dataset")
    try:
        assert len(sources.source(f"{CAULDRON}:shapes", "train", cfg)) == 24
        fresh = config_lib.load("configs/tiny.yaml", [f"workdir={tmp_path / 'fresh'}"])
        assert len(sources.source(f"{CAULDRON}:shapes", "train", fresh)) == 10
    finally:
        testing.write_hub_cache(os.path.join(offline, "hub"), CAULDRON, {}, {"main": MAIN}, repo_type="dataset")


@pytest.mark.parametrize("name, message", [
    (f"{VQA}:nope:validation", f"no subset 'nope' in {VQA} (subsets: shapes, colors)"),
    (f"{VQA}:shapes:train", "no split 'train' in subset 'shapes' (splits: validation, test)"),
    (f"{VQA}", f"which of 2 subsets? name one as {VQA}:SUBSET (subsets: shapes, colors)"),
    (f"{VQA}::validation", f"which of 2 subsets? name one as {VQA}:SUBSET (subsets: shapes, colors)"),
    (f"{VQA}:nope", f"no subset or split 'nope' in {VQA} (subsets: shapes, colors)"),
    (f"{VQA}@v9:shapes", f"{VQA}@v9:shapes: not a local path, nor a dataset in the hub cache"),
    ("acme/absent:x:y", "acme/absent:x:y: not a local path, nor a dataset in the hub cache"),
])
def test_unknown_or_ambiguous_parts_are_one_line(offline, name, message):
    with pytest.raises(hub_data.DatasetError) as e:
        hub_data.resolve(name, default_split=("validation", "test"))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(name)


def test_an_unreachable_hub_falls_back_to_the_cache(offline, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refuses connections
    assert hub_data.resolve(f"{VQA}:shapes:test").files[0].endswith("shapes/test-00000-of-00001.parquet")
    with pytest.raises(hub_data.DatasetError, match=r"^acme/absent:x: not a local path; cannot reach the hub and "
                                                    r"not in the cache \(.*\): .*refused"):
        hub_data.resolve("acme/absent:x")


def test_a_split_cached_in_part_is_refused_offline(offline, tmp_path, monkeypatch):
    from huggingface_hub import constants

    part = write(tmp_path / "src", {"README.md": VQA_README,
                                    "shapes/validation-00001-of-00002.parquet": vqa_rows(1, seed=1)})
    testing.write_hub_cache(str(tmp_path / "hub"), VQA, {MAIN: part}, {"main": MAIN}, repo_type="dataset")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(hub_data.DatasetError, match=r"^acme/shapes-vqa:shapes: the hub cache holds 1 of the 2 "
                                                    r"shards shapes/validation-\*; download the rest"):
        hub_data.resolve(f"{VQA}:shapes", default_split="validation")


def test_names_resolve_offline(offline):
    got = hub_data.resolve(f"{VQA}:shapes", default_split=("validation", "test"))
    assert (got.commit, got.subset, got.split) == (MAIN, "shapes", "validation")
    assert [os.path.basename(f) for f in got.files] == ["validation-00000-of-00002.parquet",
                                                        "validation-00001-of-00002.parquet"]
    assert all(os.path.isfile(f) for f in got.files)
    assert hub_data.resolve(f"{VQA}@{MAIN}:shapes:test").split == "test"
    with pytest.raises(hub_data.DatasetError, match="subset 'colors' has no split test; name one as "
                                                    r"acme/shapes-vqa:colors:SPLIT \(splits: validation\)"):
        hub_data.resolve(f"{VQA}:colors", default_split="test")  # not its only split: no silent stand-in
    every = hub_data.resolve(f"{VQA}:*:validation")
    assert [f.split("/")[-2] for f in every.files] == ["shapes", "shapes", "colors"]
    only = hub_data.resolve(f"{CAULDRON}")  # one subset, train by default
    assert (only.subset, only.split) == ("shapes", "train")
    assert hub_data.resolve(f"{CAULDRON}:train").split == "train"  # one part: a split of the only subset


def test_layout_follows_the_hub_conventions():
    # data/<split>-NNNNN-of-NNNNN*.parquet (HuggingFaceM4/ChartQA): one subset; train, validation, test first.
    chartqa = ["data/test-00000-of-00001-e2cd0b7a0f9eb20d.parquet", "data/val-00000-of-00001-0f11.parquet",
               "data/train-00000-of-00003-4949.parquet", "data/train-00001-of-00003-7302.parquet"]
    assert hub_data.layout(chartqa) == ({"default": {
        "train": chartqa[2:], "test": chartqa[:1], "val": chartqa[1:2]}}, None)
    # The hub's parquet conversion (refs/convert/parquet): <subset>/<split>/NNNN.parquet.
    converted = ["ai2d/train/0000.parquet", "ai2d/train/0001.parquet", "vqarad/test/0000.parquet"]
    assert hub_data.layout(converted)[0] == {"ai2d": {"train": converted[:2]}, "vqarad": {"test": converted[2:]}}
    # Split keywords in folder, then file names; else everything is train.
    assert hub_data.layout(["dev/a.parquet", "training/b.parquet"])[0] == {
        "default": {"train": ["training/b.parquet"], "validation": ["dev/a.parquet"]}}
    assert hub_data.layout(["my_valid_file.parquet", "x-test.parquet"])[0] == {
        "default": {"validation": ["my_valid_file.parquet"], "test": ["x-test.parquet"]}}
    assert hub_data.layout(["pieces/a.parquet", "b.parquet"])[0] == {
        "default": {"train": ["b.parquet", "pieces/a.parquet"]}}
    # README configs: data_files as one pattern, a list, {split: patterns}; data_dir; `default: true`.
    readme = ("---\nconfigs:\n- config_name: a\n  data_files: a/*.parquet\n- config_name: b\n  default: true\n"
              "  data_dir: b\n  data_files:\n    test: [t-*.parquet]\n    train: '**/x.parquet'\n---\n")
    files = ["a/1.parquet", "b/t-1.parquet", "b/deep/x.parquet", "README.md"]
    assert hub_data.layout(files, readme) == ({"a": {"train": ["a/1.parquet"]},
                                               "b": {"test": ["b/t-1.parquet"], "train": ["b/deep/x.parquet"]}}, "b")


def test_names():
    assert hub_data.parse("lmms-lab/DocVQA:DocVQA:validation") == hub_data.Spec(
        "lmms-lab/DocVQA", None, "DocVQA", "validation")
    assert hub_data.parse("MMMU/MMMU@0123abc:Art:validation") == hub_data.Spec("MMMU/MMMU", "0123abc", "Art",
                                                                              "validation")
    assert hub_data.parse("a/b@refs/convert/parquet::test") == hub_data.Spec("a/b", "refs/convert/parquet", None,
                                                                            "test")
    assert hub_data.parse("a/b:x") == hub_data.Spec("a/b", None, "x", None, single=True)
    for not_hub in ("shapes", "./a/b", "/data/x", "gs://bucket/x", "a/b:c:d:e", "../a/b"):
        assert hub_data.parse(not_hub) is None, not_hub


class FakeHub:
    """The hub's HTTP API over the source folders, as much of it as huggingface_hub asks for here: repo info, the
    tree listing, and file downloads (HEAD + GET), recording which files were downloaded."""

    def __init__(self, repos: dict):  # repo id -> (commit, folder)
        import hashlib
        import http.server
        import threading
        import urllib.parse

        self.repos, self.downloads, self.gated = repos, [], {r for r in repos if "gated" in r}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _file(self, repo, rel):
                data = open(os.path.join(hub.repos[repo][1], rel), "rb").read()
                return data, hashlib.sha256(data).hexdigest()

            def _send(self, code, body=b"", headers=(), head=False):
                self.send_response(code)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "datasets"]:
                    repo, kind = "/".join(parts[2:4]), (parts[4:] or ["revision"])[0]
                    if repo not in hub.repos:
                        return self._send(404, b"Repository not found", [("X-Error-Code", "RepoNotFound")], head)
                    commit, folder = hub.repos[repo]
                    files = sorted(os.path.relpath(os.path.join(r, n), folder)
                                   for r, _, ns in os.walk(folder) for n in ns)
                    if kind == "revision":
                        body = {"id": repo, "sha": commit, "private": False,
                                "siblings": [{"rfilename": f} for f in files]}
                    else:  # tree
                        body = []
                        for f in files:
                            data, digest = self._file(repo, f)
                            entry = {"type": "file", "path": f, "size": len(data), "oid": digest[:40]}
                            if f.endswith(".parquet"):
                                entry["lfs"] = {"oid": digest, "size": len(data), "pointerSize": 130}
                            body.append(entry)
                    return self._send(200, json.dumps(body).encode(), [("Content-Type", "application/json")], head)
                if parts[0] == "datasets" and parts[3] == "resolve":
                    repo, rel = "/".join(parts[1:3]), "/".join(parts[5:])
                    if repo in hub.gated:
                        return self._send(403, b"Access to this dataset is restricted.",
                                          [("X-Error-Code", "GatedRepo")], head)
                    data, digest = self._file(repo, rel)
                    if not head:
                        hub.downloads.append(rel)
                    return self._send(200, data, [("X-Repo-Commit", hub.repos[repo][0]), ("ETag", f'"{digest}"')],
                                      head)
                self._send(404)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_online_downloads_only_the_split_it_names(hf_home, tmp_path):
    """Online (a hub at HF_ENDPOINT, an empty cache): the README and the named split's shards are downloaded, no
    other file; in a program of its own, as huggingface_hub reads HF_ENDPOINT when it is imported."""
    import subprocess
    import sys

    src = str(os.path.join(os.path.dirname(hf_home), "src-vqa"))
    hub = FakeHub({VQA: (MAIN, src), "acme/gated": (MAIN, src)})
    script = ("import json, os\nfrom idefics_jax.checkpoints import hub_data\n"
              f"s = hub_data.resolve('{VQA}:shapes', default_split=('validation', 'test'))\n"
              "print('RESULT', json.dumps([s.commit, s.split, s.files]))\n"
              "for name in ('acme/gated:shapes', 'acme/nothing:x'):\n    try:\n        hub_data.resolve(name)\n"
              "    except hub_data.DatasetError as e:\n        print('ERROR', e)\n"
              # Then offline: the split not downloaded is refused, not taken for absent.
              "os.environ['HF_HUB_OFFLINE'] = '1'\n"
              f"try:\n    hub_data.resolve('{VQA}:shapes:test')\n"
              "except hub_data.DatasetError as e:\n    print('OFFLINE', e)\n")
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    try:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    finally:
        hub.server.shutdown()
    assert r.returncode == 0, r.stderr[-3000:]
    commit, split, files = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert sorted(hub.downloads) == ["README.md", "shapes/validation-00000-of-00002.parquet",
                                     "shapes/validation-00001-of-00002.parquet"]
    assert (commit, split) == (MAIN, "validation")
    assert all(f.startswith(str(tmp_path / "home" / "hub" / "datasets--acme--shapes-vqa" / "snapshots" / MAIN))
               for f in files)
    assert [pq.read_table(f).num_rows for f in files] == [3, 3]
    assert "ERROR acme/gated:shapes: a gated dataset; accept its terms on huggingface.co and set HF_TOKEN" in r.stdout
    assert "ERROR acme/nothing:x: not a local path, nor a dataset on the hub (a private one needs HF_TOKEN)" in r.stdout
    offline = next(x for x in r.stdout.splitlines() if x.startswith("OFFLINE "))
    import huggingface_hub

    if hasattr(huggingface_hub, "get_cached_repo_tree"):  # the listing the download kept
        assert "holds 0 of the split's 1 files (not shapes/test-00000-of-00001.parquet)" in offline
    else:
        assert "no split 'test' in subset 'shapes' (splits: validation)" in offline
