"""Every code block of the README and of docs/*.md runs here, or is checked as far as this machine allows
(tests/test_bench_scripts.py runs every bench/ script at its smallest setting). A block cannot rot silently.

Blocks, by fence language (any other language fails `test_every_block_is_handled`):

- ```python / ```py: executed, each file's blocks in order in one namespace (a later block uses what an earlier
  one made, as in a notebook), each file in a scratch folder of its own holding the stand-ins below. The files
  are shared between two fresh interpreters running at once (`docs_run`; SECOND names the second's), on 8
  simulated devices (the sharding blocks build 8-device meshes), so that what files share compiles once each.
- ```bash / ```sh: split into commands (continuation lines joined, comments dropped, `&&` separates). Every
  `idefics-jax` command, those passed on by the launch scripts included, is parsed by the CLI's own parser. Then:
  * `idefics-jax generate / convert / export / eval`, `train --list`: executed for real, in the same interpreters
    (`idefics_jax.cli.main(argv)`), in the file's scratch folder; a command repeated word for word elsewhere in
    the docs runs once, where it first appears;
  * `idefics-jax train CONFIG key=value ...` and `python3 -m idefics_jax.train ...`: training takes minutes to
    hours, so the config and its overrides are loaded by `train.config.load`, which refuses an unknown key, a bad
    value or a missing config;
  * `idefics-jax serve --dry-run` on this host's devices: executed like the commands above;
  * `idefics-jax serve --model tiny-shapes --slots 8` (SERVER): started for real (on a free port) as the server
    that the client blocks and the `curl` commands talk to, and stopped with SIGTERM, which must exit 0;
  * `python bench/X.py ...`: parsed by the script's own argparse parser (the script stops right after parsing);
    tests/test_bench_scripts.py runs each script at its smallest setting;
  * `python3 scripts/demo.py ...` (a program of its own, started first, beside the blocks) and `curl ...`:
    executed;
  * `scripts/tpu-vm/tpu.sh`, `scripts/gpu/node.sh`, `scripts/gpu/slurm.sbatch`: executed with `--dry-run`
    (they print their gcloud / sbatch commands instead of running them);
  * anything else must be listed in NOT_RUN with the reason, and NOT_RUN lists nothing the docs do not hold.
- ```json: JSONL lines for `idefics-jax eval`, read with `idefics_jax.evaluate.data.Dataset`, images included.
- ```yaml: a training config, loaded by `train.config.load` (and saved as `my-config.yaml`, which the docs name).
- ```text: docs/layout.md's layer table and folder tree, checked against tests/test_layout.py and the files.

Substitutions: nothing in a block's text is changed except the server's address (`127.0.0.1:8000` -> the test
server's port). The names the docs use for real checkpoints, photos and data are small real files in the scratch
folder, made only where a file names them and none of its executed commands writes them first:

| name in the docs | what the test puts there |
| --- | --- |
| `idefics3-8b-orbax`, `smolvlm-256m-orbax`, `out/run1` (a WORKDIR in the docs) | tiny-shapes converted to Orbax |
| `path/to/Idefics3-8B-Llama3`, `HuggingFaceTB/SmolVLM-256M-Instruct` | copies of the tiny-shapes HF directory (a |
| | local directory wins over a hub id) |
| `smolvlm-int4` | tiny-shapes converted with `quantize="int4"` |
| `smolvlm2-256m-video-orbax` | a random tiny SmolVLM (model_type smolvlm, tests/reference.py), converted |
| `idefics_jax/models/tiny-shapes` | a copy of the shipped model (so that nothing writes into the repository) |
| `statue.jpg`, `skyline.jpg`, `a.jpg`, `b.jpg`; `img/1.png` - `img/3.png` | the shipped example images |
| `clip.mp4` | a generated 14-frame clip |
| `shapes/data.jsonl`, `DIR/data.jsonl` | the example images' questions (examples/questions.json) as eval JSONL |
| `DocVQA/validation` | one parquet shard in DocVQA's columns, from the example images |
| `my-images/train.jsonl`, `my-images/val.jsonl` | Cauldron-style JSONL over the example images |
| `my-config.yaml` | the ```yaml block of docs/train.md |
| `configs/`, `scripts/` | the repository's (with `tests/` beside `scripts/`, as in a clone) |
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest

import programs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
BENCH = os.path.join(ROOT, "bench")
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
ADDRESS = "127.0.0.1:8000"
SERVER = "idefics-jax serve --model tiny-shapes --slots 8"
LAUNCHERS = ("scripts/tpu-vm/tpu.sh", "scripts/gpu/node.sh", "scripts/gpu/slurm.sbatch")
SUBCOMMANDS = ("convert", "export", "train", "generate", "serve", "eval")
LANGUAGES = ("python", "py", "bash", "sh", "json", "yaml", "text")

# Commands that are not executed here, exactly as the docs spell them (tokens joined by one space), and why.
# The `idefics-jax` ones among them are still parsed by the CLI's parser.
NOT_RUN = {
    "python3 -m pip install -e .[test]": "installs the environment this suite runs in (CI runs it first: .ci/run)",
    "python3 -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder": "the test suite itself",
    "pip install -e .[aot]": "downloads libtpu (hundreds of MB) for bench/memory_plan.py's TPU rows",
    "gcloud auth login": "needs a Google Cloud account (interactive)",
    "gcloud config set project MY-PROJECT": "needs a Google Cloud project",
    "idefics-jax convert smolvlm-256m gs://MY-BUCKET/smolvlm-256m": "needs a Cloud Storage bucket and credentials",
    "idefics-jax serve --model smolvlm-256m-orbax --host 0.0.0.0 --port 8000 --slots 16 --max-queue 64 "
    "--max-len 2048 --allow-local-images /data/images --max-images 8 --max-image-pixels 16777216 --dtype bfloat16":
        "a server runs until stopped; the test runs SERVER, the tiny-shapes one, instead",
    "idefics-jax serve --model smolvlm-int4 --slots 8":
        "a server runs until stopped; the test runs SERVER, the tiny-shapes one, instead",
    "idefics-jax serve --model idefics3-8b-orbax --mesh tensor --slots 64 --max-len 4096":
        "a server runs until stopped; the test runs SERVER, the tiny-shapes one, instead",
    "idefics-jax serve --dry-run --model idefics3-8b-llama3 --mesh tensor --slots 64 --max-len 4096 --topology v5e-8":
        "compiles for a TPU slice: needs libtpu (the [aot] extra)",
    "idefics-jax export out/train-tiny-shapes-long idefics_jax/models/tiny-shapes":
        "needs the WORKDIR of an 80-minute training run (tests/test_train.py exports runs)",
}

# name in the docs -> how its stand-in is made (see the table above)
STANDINS = {
    "idefics3-8b-orbax": "orbax", "smolvlm-256m-orbax": "orbax", "out/run1": "orbax",
    "path/to/Idefics3-8B-Llama3": "hf", "HuggingFaceTB/SmolVLM-256M-Instruct": "hf",
    "smolvlm-int4": "int4", "smolvlm2-256m-video-orbax": "video_model",
    "idefics_jax/models/tiny-shapes": "hf",
    "statue.jpg": "jpg:1", "skyline.jpg": "jpg:2", "a.jpg": "jpg:3", "b.jpg": "jpg:1",
    "img/1.png": "png:1", "img/2.png": "png:2", "img/3.png": "png:3",
    "clip.mp4": "clip", "shapes/data.jsonl": "eval_jsonl", "DIR/data.jsonl": "eval_jsonl",
    "DocVQA/validation": "docvqa", "my-images/train.jsonl": "cauldron_jsonl", "my-images/val.jsonl": "cauldron_jsonl",
    "configs": "repo", "scripts": "repo",
}


# ---- reading the docs -------------------------------------------------------------------------------------------

def blocks() -> list[dict]:
    """Every fenced block: file, line, language, text."""
    out = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, re.S | re.M):
            line = text[:m.start()].count("\n") + 1
            out.append({"file": doc, "line": line, "id": f"{doc}:{line}", "lang": m[1].strip(), "text": m[2]})
    return out


def commands(text: str) -> list[list[str]]:
    """A shell block's commands as token lists: continuation lines joined, comments dropped, `&&` separating."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        group: list[str] = []
        for tok in shlex.split(line, comments=True) + ["&&"]:
            if tok == "&&":
                if group:
                    out.append(group)
                group = []
            else:
                group.append(tok)
    return out


def key(toks: list[str]) -> str:
    return " ".join(toks)


def plan(toks: list[str]) -> str:
    """How a command is tested (see the module docstring); "unhandled" fails the test."""
    if key(toks) in NOT_RUN:
        return "not_run"
    prog, args = toks[0], toks[1:]
    if prog == "idefics-jax":
        if args[:1] == ["serve"]:
            # A dry run on this host's devices runs; one for a TPU slice needs libtpu (NOT_RUN says so).
            if "--dry-run" in args:
                return "unhandled" if "--topology" in args else "cli"
            return "server" if key(toks) == SERVER else "unhandled"
        if args[:1] == ["train"] and "--list" not in args:
            # A dry run on this host's devices runs; one for a TPU slice needs libtpu: its config is loaded.
            return "cli" if "--dry-run" in args and "--topology" not in args else "train_config"
        return "cli" if args[:1] and args[0] in SUBCOMMANDS else "unhandled"
    if prog in ("python", "python3") and args:
        if args[:2] == ["-m", "idefics_jax.train"]:
            return "train_config"
        if args[0].startswith("bench/") and args[0].endswith(".py"):
            return "bench_parse"
        if args[0] == "scripts/demo.py":
            return "shell"
    if prog in LAUNCHERS:
        return "dry_run"
    if prog == "curl":
        return "shell"
    return "unhandled"


def shell_commands() -> list[tuple[dict, list[str]]]:
    return [(b, toks) for b in blocks() if b["lang"] in ("bash", "sh") for toks in commands(b["text"])]


def launched(toks: list[str]) -> list[str] | None:
    """The `idefics-jax` arguments a launcher command passes on (None: it passes none, e.g. `install`)."""
    for i, t in enumerate(toks[1:], 1):
        if t in SUBCOMMANDS:
            return toks[i:]
    return None


def cli_argvs() -> list[tuple[str, list[str]]]:
    """Every idefics-jax argument list in the docs: (where, argv without the program name)."""
    out = []
    for b, toks in shell_commands():
        if toks[0] == "idefics-jax":
            out.append((b["id"], toks[1:]))
        elif toks[0] in LAUNCHERS and launched(toks):
            out.append((b["id"], launched(toks)))
    return out


# ---- checks that need no model --------------------------------------------------------------------------------

def test_every_block_is_handled():
    bs = blocks()
    assert sum(b["lang"] in ("python", "py") for b in bs) >= 15, "the docs lost their Python blocks?"
    unknown = [f"{b['id']}: ```{b['lang']}" for b in bs if b["lang"] not in LANGUAGES]
    assert not unknown, f"blocks of a language this test does not handle: {unknown}"
    unhandled = [f"{b['id']}: {key(toks)}" for b, toks in shell_commands() if plan(toks) == "unhandled"]
    assert not unhandled, "commands neither tested nor listed in NOT_RUN (with the reason):\n" + "\n".join(unhandled)
    in_docs = {key(toks) for _, toks in shell_commands()}
    stale = sorted(set(NOT_RUN) - in_docs)
    assert not stale, f"NOT_RUN lists commands the docs no longer hold: {stale}"


def test_readme_is_short_and_links_every_guide():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert readme.count("\n") <= 250
    for doc in DOCS[1:]:
        assert f"({doc})" in readme, f"the README does not link {doc}"


def test_readme_models_table_names_every_preset():
    from idefics_jax import PRESETS

    with open(os.path.join(ROOT, "README.md")) as f:
        table = [line for line in f if line.startswith("| `")]
    missing = [name for name in PRESETS if not any(f"`{name}`" in row.split("|")[1] for row in table)]
    assert not missing, f"presets missing from the README's models table: {missing}"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_resolve():
    """Every relative link of the docs names a file that exists, and a heading of it when it has an anchor."""
    bad = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), path)) if path else \
                os.path.join(ROOT, doc)
            if not os.path.exists(full):
                bad.append(f"{doc}: {target}: no such file")
            elif anchor:
                with open(full) as f:
                    slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", f.read(), re.M)}
                if anchor not in slugs:
                    bad.append(f"{doc}: {target}: no such heading")
    assert not bad, "\n".join(bad)


def test_cli_commands_parse():
    """Every idefics-jax command of the docs (launched ones included) is one the CLI accepts."""
    from idefics_jax.cli import build_parser

    argvs = cli_argvs()
    assert len(argvs) >= 30
    bad = []
    for where, argv in argvs:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser().parse_args(argv)
        except SystemExit:
            bad.append(f"{where}: idefics-jax {key(argv)}: {err.getvalue().strip().splitlines()[-1:]}")
    assert not bad, "\n".join(bad)


def _train_config_argvs() -> list[tuple[str, list[str]]]:
    out = []
    for b, toks in shell_commands():
        argv = launched(toks) if toks[0] in LAUNCHERS else toks[1:]
        if toks[0] == "idefics-jax" and plan(toks) == "train_config":
            flags = {i for i, a in enumerate(argv) if a == "--dry-run"}
            flags |= {j for i, a in enumerate(argv) if a == "--topology" for j in (i, i + 1)}
            out.append((b["id"], [a for i, a in enumerate(argv[1:], 1) if i not in flags]))
        elif toks[:3] in (["python", "-m", "idefics_jax.train"], ["python3", "-m", "idefics_jax.train"]):
            out.append((b["id"], toks[3:]))
        elif toks[0] in LAUNCHERS and argv and argv[0] == "train":
            out.append((b["id"], argv[1:]))
    return out


def test_train_commands_load_their_config(tmp_path):
    """What a training command would train on: the config and overrides, loaded and checked."""
    from idefics_jax.train import config

    (yaml_block,) = [b for b in blocks() if b["lang"] == "yaml"]
    (tmp_path / "my-config.yaml").write_text(yaml_block["text"])
    argvs = _train_config_argvs()
    assert len(argvs) >= 8
    for where, argv in argvs:
        name, overrides = argv[0], argv[1:]
        for base in (tmp_path, ROOT):
            if os.path.exists(os.path.join(base, name)):
                name = os.path.join(base, name)
                break
        try:
            config.load(name, overrides)
        except Exception as e:
            pytest.fail(f"{where}: train {key(argv)}: {e}")


def test_launchers_dry_run():
    ran = 0
    for b, toks in shell_commands():
        if plan(toks) != "dry_run":
            continue
        r = subprocess.run(["bash", toks[0], "--dry-run", *toks[1:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})  # no gcloud / sbatch run
        assert r.returncode == 0 and r.stdout.strip(), f"{b['id']}: {key(toks)}: {r.stderr}"
        ran += 1
    assert ran >= 10


def _layout_blocks():
    layout = [b for b in blocks() if b["file"] == os.path.join("docs", "layout.md") and b["lang"] == "text"]
    tree = [b for b in layout if b["text"].startswith("idefics_jax/\n")]
    assert len(layout) == 2 and len(tree) == 1
    return [b for b in layout if b not in tree][0]["text"], tree[0]["text"]


def test_layout_doc_lists_the_layers_in_order():
    """docs/layout.md's layer table, top to bottom, is tests/test_layout.py's LAYERS from the last to the first."""
    sys.path.insert(0, TESTS)
    from test_layout import LAYERS, PACKAGES

    folders = {package: folder for folder, package in PACKAGES.items()}
    lines = _layout_blocks()[0].splitlines()

    def line_of(package: str) -> int:
        where = folders.get(package) or package.replace(".", "/")
        hits = [i for i, line in enumerate(lines) if re.search(rf"(^|\s){re.escape(where)}(/|\.py)(\s|$)", line)]
        assert hits, f"docs/layout.md's layer table does not name {where}"
        return hits[0]

    rows = [min(line_of(p) for p in packages) for _, packages in LAYERS]
    assert rows == sorted(rows, reverse=True), f"layers out of order in docs/layout.md: {list(zip(LAYERS, rows))}"


def test_layout_doc_tree_names_every_module():
    """docs/layout.md's folder tree names exactly the modules there are."""
    named, stack = set(), []
    for line in _layout_blocks()[1].splitlines():
        if not line.strip():
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        stack = stack[:depth]
        path = "/".join(stack + [name.rstrip("/")])
        if name.endswith("/"):
            stack.append(name.rstrip("/"))
        else:
            named.add(path)
    actual = set()
    for folder in ("idefics_jax", "convert", "train", "configs"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "models")]
            actual |= {os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames if f.endswith((".py", ".cc"))}
    assert sorted(actual - named) == [], "modules missing from docs/layout.md's tree"
    assert sorted(p for p in named - actual if p.endswith((".py", ".cc"))) == [], \
        "docs/layout.md's tree names modules that do not exist"


# ---- running the blocks ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _names_in(text: str) -> set[str]:
    return {n for n in STANDINS if re.search(rf"(?<![\w./-]){re.escape(n)}(?![\w.-])", text)}


def run_plan(folder) -> dict:
    """What `docs_run` executes: per file, its stand-ins and its steps in order. A command the docs repeat word for
    word (the README's tour repeats the guides) runs once, where it first appears."""
    from idefics_jax.cli import build_parser

    files, seen = [], set()
    for doc in DOCS:
        steps, written = [], set()
        for b in blocks():
            if b["file"] != doc:
                continue
            if b["lang"] in ("python", "py"):
                steps.append({"id": b["id"], "kind": "python", "code": b["text"]})
            elif b["lang"] == "json":
                steps.append({"id": b["id"], "kind": "jsonl", "code": b["text"]})
            elif b["lang"] in ("bash", "sh"):
                for toks in commands(b["text"]):
                    how = plan(toks)
                    if key(toks) in seen:
                        continue
                    seen.add(key(toks))
                    if how == "cli":
                        a = build_parser().parse_args(toks[1:])
                        if a.command in ("convert", "export"):
                            written.add(a.dst)
                        steps.append({"id": b["id"], "kind": "cli", "argv": toks[1:]})
                    elif how in ("shell", "bench_parse"):
                        steps.append({"id": b["id"], "kind": how, "argv": toks})
        standins = sorted(_names_in(json.dumps(steps)) - written)
        files.append({"doc": doc, "folder": os.path.join(folder, doc.replace("/", "_")), "standins": standins,
                      "steps": steps})
    return {"files": files}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """SERVER, on a free port, from a folder of its own; stopped with SIGTERM at the end (it must exit 0)."""
    port = _free_port()
    exe = shutil.which("idefics-jax")
    prog = [exe] if exe else [sys.executable, "-m", "idefics_jax.cli"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        p = subprocess.Popen(prog + SERVER.split()[1:] + ["--port", str(port)], cwd=log.parent, stdout=out,
                             stderr=subprocess.STDOUT, env=programs.env())
    yield port, p, log
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()


# The files whose blocks run in the second of the two interpreters (the rest, README first, in the first): two
# compilers at once on a 2-core machine. Each interpreter compiles what its files share once.
SECOND = ("docs/generate.md", "docs/quantize.md", "docs/serve.md", "docs/sharding.md")


@pytest.fixture(scope="module")
def docs_run(server, tmp_path_factory):
    """Runs every executable block (run_plan) in two fresh interpreters at once: this file as a script."""
    port, proc, log = server
    d = tmp_path_factory.mktemp("docs")
    p = run_plan(str(d))
    runs = []
    for i, files in enumerate([[f for f in p["files"] if f["doc"] not in SECOND],
                               [f for f in p["files"] if f["doc"] in SECOND]]):
        plan_file, results_file = d / f"plan{i}.json", d / f"results{i}.json"
        plan_file.write_text(json.dumps({"files": files, "port": port, "results": str(results_file),
                                         "cache": str(d / f"standins{i}")}))
        out = open(d / f"runner{i}.log", "w")
        runs.append((subprocess.Popen([sys.executable, os.path.abspath(__file__), str(plan_file)], cwd=d, text=True,
                                      stdout=out, stderr=subprocess.STDOUT, env=programs.env(8)),
                     results_file, d / f"runner{i}.log"))
    results = []
    for runner, results_file, runner_log in runs:
        runner.wait(1200)
        assert results_file.exists(), runner_log.read_text()[-8000:]
        results += json.loads(results_file.read_text())
    # The server ends as documented: SIGTERM lets it finish and exit 0.
    died = proc.poll() is not None
    if not died:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"results": results, "steps": sum(len(f["steps"]) for f in p["files"]), "server_died": died,
            "server_rc": proc.returncode, "server_log": log.read_text()[-3000:]}


def test_docs_run(docs_run):
    failed = [f"{r['id']} {r['what']}:\n{r['error']}" for r in docs_run["results"] if not r["ok"]]
    assert not failed, "\n\n".join(failed)


def test_docs_print_what_they_say(docs_run):
    res = docs_run["results"]
    assert len(res) == docs_run["steps"] >= 35
    # README: the set-up command prints "square"; the shipped-model block prints its comments' answers.
    (setup,) = [r for r in res if r["id"].startswith("README.md:") and r["what"].startswith("generate --image")]
    assert setup["out"].strip() == "square", setup
    shipped = [r for r in res if r["id"].startswith("README.md:") and "How many shapes" in r.get("code", "")]
    assert shipped[0]["out"].splitlines()[:2] == ["4", "green"], shipped[0]["out"]
    # serve.md: the OpenAI client gets "4"; curl gets JSON, not an error.
    client = [r for r in res if r["id"].startswith("docs/serve.md:") and "openai" in r.get("code", "")]
    assert client[0]["out"].startswith("4"), client[0]["out"]
    for r in res:
        if r["what"].startswith("curl"):
            body = json.loads(r["out"])
            assert "error" not in body, r
    assert not docs_run["server_died"] and docs_run["server_rc"] == 0, docs_run["server_log"]


# ---- the runner: `python tests/test_docs.py PLAN` (what docs_run starts) -----------------------------------------

class _Parsed(Exception):
    pass


def _make_standin(kind: str, cache: str) -> str:
    """The stand-in of this kind, built once in `cache`; its path."""
    path = os.path.join(cache, kind.replace(":", "-"))
    if kind.endswith("_jsonl"):
        path = os.path.join(path, "data.jsonl")
    if os.path.exists(path):
        return path
    from idefics_jax.checkpoints.registry import resolve
    from idefics_jax.convert.hf_to_orbax import convert

    shipped = resolve("tiny-shapes")
    examples = os.path.join(shipped, "examples")
    if kind == "orbax":
        convert(shipped, path, progress=False)
    elif kind == "int4":
        convert(shipped, path, progress=False, quantize="int4")
    elif kind == "hf":
        shutil.copytree(shipped, path)
    elif kind == "repo":
        return ROOT
    elif kind.startswith(("jpg:", "png:")):
        import PIL.Image

        PIL.Image.open(os.path.join(examples, f"shapes-{kind[4:]}.png")).convert("RGB").save(
            path, format="JPEG" if kind.startswith("jpg") else "PNG", quality=95)
    elif kind == "video_model":
        import reference

        hf = reference.save_hf_checkpoint(path + "-hf", reference.tiny_config(model_type="smolvlm"), seed=2,
                                          weight_scale=8.0)
        convert(hf, path, progress=False)
    elif kind == "clip":
        import av
        import numpy as np

        with av.open(path, "w", format="mp4") as c:
            s = c.add_stream("mpeg4", rate=4)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
            for i in range(14):
                a = np.full((48, 64, 3), 255, np.uint8)
                a[8:32, 3 * i:3 * i + 16] = (200, 30, 30 + 15 * i)
                for packet in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                    c.mux(packet)
            for packet in s.encode():
                c.mux(packet)
    elif kind == "eval_jsonl":
        os.makedirs(os.path.dirname(path))
        with open(os.path.join(examples, "questions.json")) as f:
            listing = json.load(f)
        with open(path, "w") as f:
            for item in listing:
                shutil.copy(os.path.join(examples, item["image"]), os.path.dirname(path))
                for q in item["questions"]:
                    f.write(json.dumps({"image": item["image"], "question": q["text"], "answers": [q["answer"]]})
                            + "\n")
    elif kind == "docvqa":
        import pyarrow as pa
        import pyarrow.parquet as pq

        os.makedirs(path)
        with open(os.path.join(examples, "questions.json")) as f:
            listing = json.load(f)
        rows = []
        for item in listing:
            with open(os.path.join(examples, item["image"]), "rb") as f:
                image = {"bytes": f.read(), "path": item["image"]}
            q = item["questions"][0]
            rows.append({"questionId": str(len(rows)), "question": q["text"], "image": image,
                         "answers": [q["answer"]]})
        pq.write_table(pa.Table.from_pylist(rows), os.path.join(path, "validation-00000-of-00001.parquet"))
    elif kind == "cauldron_jsonl":
        os.makedirs(os.path.dirname(path))
        with open(os.path.join(examples, "questions.json")) as f:
            listing = json.load(f)
        with open(path, "w") as f:
            for item in listing:
                shutil.copy(os.path.join(examples, item["image"]), os.path.dirname(path))
                texts = [{"user": q["text"], "assistant": q["answer"], "source": "shapes"} for q in item["questions"]]
                f.write(json.dumps({"images": [item["image"]], "texts": texts}) + "\n")
    else:
        raise ValueError(kind)
    return path


def _place(name: str, target: str, folder: str) -> None:
    dest = os.path.join(folder, name)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if name.endswith("/train.jsonl") or name.endswith("/val.jsonl") or name.endswith("/data.jsonl"):
        # A JSONL names its images relative to itself: the folder comes along.
        for f in os.listdir(os.path.dirname(target)):
            if not os.path.exists(os.path.join(os.path.dirname(dest), f)):
                os.symlink(os.path.join(os.path.dirname(target), f), os.path.join(os.path.dirname(dest), f))
        if not os.path.exists(dest):
            os.symlink(target, dest)
    elif name in ("configs", "scripts"):
        # The repository's folders, as in a clone; scripts/ finds tests/reference.py beside it.
        for repo_folder in (name, "tests") if name == "scripts" else (name,):
            os.symlink(os.path.join(ROOT, repo_folder), os.path.join(folder, repo_folder))
    else:
        os.symlink(target, dest)


def _wait_for(port: int, seconds: float = 180) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the test server on port {port} did not answer /health in {seconds} s")


def _parse_only(argv: list[str]) -> bool:
    """Runs `python bench/X.py ARGS` in this interpreter until its argparse parser has parsed ARGS."""
    import argparse
    import runpy

    script = os.path.join(ROOT, argv[1])
    real = argparse.ArgumentParser.parse_args
    env, path, modules = dict(os.environ), list(sys.path), set(sys.modules)

    def parse_and_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_and_stop
    sys.argv = [script, *argv[2:]]
    try:
        runpy.run_path(script, run_name="__main__")
        return False  # the script never parsed its arguments
    except _Parsed:
        return True
    finally:
        argparse.ArgumentParser.parse_args = real
        os.environ.clear()
        os.environ.update(env)
        sys.path[:] = path
        for m in set(sys.modules) - modules:
            if not m.startswith(("idefics_jax", "jax", "flax", "numpy", "torch", "transformers")):
                sys.modules.pop(m, None)


def _runner(plan_path: str) -> None:
    """Executes a run_plan: stand-ins first, the demo in the background, every file's steps in order, and the
    bench/ parses last (a script's imports must not change what the steps before it run)."""
    sys.path.insert(0, TESTS)  # tests/reference.py: the random video model
    with open(plan_path) as f:
        p = json.load(f)
    here = os.path.dirname(plan_path)
    cache = p["cache"]
    os.makedirs(cache, exist_ok=True)
    results, port = [], p["port"]
    served = False
    env = programs.env()  # for programs: one device, as users run them

    def record(step, what, fn):
        nonlocal served
        out, err = io.StringIO(), io.StringIO()
        r = {"id": step["id"], "what": what, "code": step.get("code", ""), "ok": True, "error": "", "out": ""}
        t0 = time.time()
        try:
            if ADDRESS in json.dumps(step) and not served:
                _wait_for(port)
                served = True
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                ok = fn()
            if ok is False:
                r.update(ok=False, error=err.getvalue()[-3000:] or "failed")
        except BaseException:  # a snippet's SystemExit too
            r.update(ok=False, error=traceback.format_exc()[-5000:] + err.getvalue()[-2000:])
        r["out"] = out.getvalue()
        print(f"{time.time() - t0:6.1f} s  {'ok  ' if r['ok'] else 'FAIL'} {step['id']} {what[:90]}", flush=True)
        results.append(r)

    for f in p["files"]:
        os.makedirs(f["folder"])
        for name in f["standins"]:
            _place(name, _make_standin(STANDINS[name], cache), f["folder"])
    # Programs (the demo, curl) run beside the steps: started now, collected at the end.
    background = []
    for f in p["files"]:
        for step in f["steps"]:
            if step["kind"] == "shell" and ADDRESS not in json.dumps(step):
                background.append((step, subprocess.Popen(step["argv"], cwd=f["folder"], env=env, text=True,
                                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for f in p["files"]:
        os.chdir(f["folder"])
        ns: dict = {"__name__": "__main__"}
        for step in f["steps"]:
            kind = step["kind"]
            if kind == "python":
                code = step["code"].replace(ADDRESS, f"127.0.0.1:{port}")
                record(step, "python", lambda: exec(compile(code, step["id"], "exec"), ns))
            elif kind == "jsonl":
                def read_jsonl():
                    from idefics_jax.evaluate.data import Dataset

                    with open("block.jsonl", "w") as j:
                        j.write(step["code"])
                    samples = list(Dataset("block.jsonl"))
                    assert len(samples) == len(step["code"].strip().splitlines())
                    for s in samples:
                        s.load_images()
                record(step, "jsonl", read_jsonl)
            elif kind == "cli":
                from idefics_jax.cli import main

                record(step, key(step["argv"]), lambda: main(list(step["argv"])) == 0)
            elif kind == "shell" and ADDRESS in json.dumps(step):
                argv = [a.replace(ADDRESS, f"127.0.0.1:{port}") for a in step["argv"]]

                def shell():
                    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
                    print(r.stdout, end="")
                    print(r.stderr[-3000:], file=sys.stderr, end="")
                    return r.returncode == 0
                record(step, key(step["argv"]), shell)
    os.chdir(here)
    for step, proc in background:
        def collect():
            out, err = proc.communicate(timeout=600)
            print(out, end="")
            print(err[-3000:], file=sys.stderr, end="")
            return proc.returncode == 0
        record(step, key(step["argv"]), collect)
    for f in p["files"]:
        for step in f["steps"]:
            if step["kind"] == "bench_parse":
                record(step, key(step["argv"]), lambda: _parse_only(step["argv"]))
    with open(p["results"], "w") as out:
        json.dump(results, out)


if __name__ == "__main__":
    _runner(sys.argv[1])
