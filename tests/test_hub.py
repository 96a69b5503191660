"""Models named by hub id, preset or path: one resolver (checkpoints/registry.py) behind load_pretrained, Chat.load,
the CLI and training configs. The hub cache is a real one laid out on disk (no mocking of huggingface_hub); the programs
run in subprocesses, because huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as testing
from idefics_jax.checkpoints import hub, registry
from idefics_jax.checkpoints.checkpoint import CheckpointError
from idefics_jax.checkpoints.load import load_pretrained

REPO = "acme/tiny-vlm"
MAIN, OTHER = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_hf):
    """A hub cache holding two commits of acme/tiny-vlm: main (seed 0 weights) and a `v2` tag (seed 1)."""
    root = tmp_path_factory.mktemp("hub")
    other = testing.save_hf_checkpoint(str(root / "src-v2"), seed=1)
    testing.write_hub_cache(str(root / "cache"), REPO, {MAIN: tiny_hf, OTHER: other}, {"main": MAIN, "v2": OTHER})
    return str(root / "cache")


SCRIPT = r"""
import json, sys
import numpy as np
from idefics_jax import cli
from idefics_jax.generation.chat import Chat
from idefics_jax.checkpoints.load import load_pretrained
from idefics_jax.train import config, loading

def first(model):
    return float(np.asarray(model.text.embed[...]).ravel()[:8].sum())

out = {}
for name in ("acme/tiny-vlm", "acme/tiny-vlm@bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", "acme/tiny-vlm@v2"):
    out[name] = first(load_pretrained(name))
chat = Chat.load("acme/tiny-vlm@v2")
out["chat"] = first(chat.model)
out["chat_processor"] = type(chat.processor).__name__
cfg = config.load("configs/tiny.yaml", ["model=acme/tiny-vlm", "workdir=" + sys.argv[1] + "/w"])
model, model_dir = loading.load_model(cfg, None)
out["train"], out["train_dir"] = first(model), model_dir
out["generate"] = cli.main(["generate", "--model", "acme/tiny-vlm", "--prompt", "hi", "--max-new-tokens", "2"])
out["convert"] = cli.main(["convert", "acme/tiny-vlm@v2", sys.argv[1] + "/orbax"])
out["converted"] = first(load_pretrained(sys.argv[1] + "/orbax"))
out["missing"] = cli.main(["generate", "--model", "acme/not-there", "--prompt", "hi"])
print("RESULT " + json.dumps(out))
"""


def _run(tmp_path, env, script=SCRIPT):
    env = {**os.environ, **env}
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), r.stderr


def test_hub_ids_load_offline_from_the_cache(cache, tmp_path, tiny_hf, program_env):
    import idefics_jax

    want = {seed: float(np.asarray(idefics_jax.load_pretrained(p).text.embed[...]).ravel()[:8].sum())
            for seed, p in ((0, tiny_hf), (1, os.path.join(os.path.dirname(cache), "src-v2")))}
    assert want[0] != want[1]
    out, err = _run(tmp_path, {**program_env, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": cache})
    assert out["acme/tiny-vlm"] == want[0]  # refs/main
    assert out[f"acme/tiny-vlm@{OTHER}"] == out["acme/tiny-vlm@v2"] == out["chat"] == want[1]  # @revision
    assert out["chat_processor"] == "Idefics3Processor"
    assert out["train"] == want[0] and out["train_dir"].endswith(f"models--acme--tiny-vlm/snapshots/{MAIN}")
    assert out["generate"] == 0 and out["convert"] == 0 and out["converted"] == want[1]
    # Offline without the model in the cache: one line naming the repo, the cause and what to do.
    assert out["missing"] == 1
    line = next(x for x in err.splitlines() if "acme/not-there" in x)
    assert "not in the hub cache" in line and "HF_HUB_OFFLINE" in line and cache in line


def test_unreachable_hub_is_one_clear_line(tmp_path, program_env):
    """Online mode, a hub endpoint that refuses connections and an empty cache."""
    script = ("import sys\nfrom idefics_jax import cli\n"
              "print('RESULT', cli.main(['generate', '--model', 'acme/tiny-vlm', '--prompt', 'hi']))\n")
    out, err = _run(tmp_path, {**program_env, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "empty"),
                               "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
                               "HF_HUB_DOWNLOAD_TIMEOUT": "2"}, script)
    assert out == 1
    lines = [x for x in err.splitlines() if x.startswith("idefics-jax generate: error:")]
    assert len(lines) == 1 and "cannot reach the hub" in lines[0] and "acme/tiny-vlm" in lines[0], err[-2000:]


def test_resolution_order(tmp_path, monkeypatch):
    # A local directory of the same name wins over the hub id; a shipped model's name is its package directory.
    monkeypatch.chdir(tmp_path)
    os.makedirs("acme/tiny-vlm")
    assert registry.resolve("acme/tiny-vlm") == "acme/tiny-vlm"
    shipped = registry.resolve("tiny-shapes")
    assert shipped.endswith(os.path.join("idefics_jax", "models", "tiny-shapes"))
    assert os.path.isfile(os.path.join(shipped, "config.json"))
    import pathlib

    assert registry.resolve(pathlib.Path("acme/tiny-vlm")) == "acme/tiny-vlm"
    # A shipped name means the shipped model from any working directory; ./NAME is the local folder.
    os.makedirs("tiny-shapes")
    assert registry.resolve("tiny-shapes") == shipped and registry.resolve("./tiny-shapes") == "./tiny-shapes"
    with pytest.raises(CheckpointError, match="not a shipped model, a preset .*smolvlm-256m.* or a hub id"):
        registry.resolve("no such model")


def test_a_workdir_resolves_to_its_newest_complete_checkpoint(tmp_path):
    """The registry knows a run's layout (WORKDIR/config.json, WORKDIR/checkpoints/STEP); the training layer builds
    the model from the step it names."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        registry.resolve(str(run))
    for step in (2, 10):
        (run / "checkpoints" / str(step)).mkdir()
    (run / "checkpoints" / "12.orbax-checkpoint-tmp-1").mkdir()  # a save still being written
    newest = registry.resolve(str(run))
    assert newest == str(run / "checkpoints" / "10")
    assert registry.run_step(newest) == (str(run), 10)
    assert registry.run_step(run / "checkpoints" / "2") == (str(run), 2)
    assert registry.run_step(run) is None and registry.run_step(tmp_path) is None
    with pytest.raises(CheckpointError, match="a training run's WORKDIR"):
        load_pretrained(str(run))


def test_presets_name_their_published_checkpoints():
    published = registry.published()
    assert set(published) == set(registry.PRESETS) - {"tiny", "tiny-idefics2"}
    assert published["smolvlm-256m"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert registry.PRESETS == {name: p.config for name, p in registry.PRESET_TABLE.items()}
    for name, repo in published.items():
        assert hub.parse_hub_id(repo) == (repo, None), name
    assert hub.parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("./org/name", "/abs/path", "gs://bucket/ckpt", "a/b/c", "name", "../x/y"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id


def test_paths_as_objects(tmp_path, tiny_hf):
    """Checkpoints and workdirs go through etils.epath (what Orbax uses; it also takes gs://): pathlib and epath
    objects work wherever a string does."""
    import pathlib

    from etils import epath

    import idefics_jax
    from idefics_jax.checkpoints.checkpoint import as_path
    from idefics_jax.convert.hf_to_orbax import convert
    from idefics_jax.checkpoints.registry import is_run

    assert str(as_path("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
    assert as_path("rel/dir") == epath.Path(os.path.abspath("rel/dir"))
    convert(pathlib.Path(tiny_hf), str(tmp_path / "orbax"), progress=False)
    ref = np.asarray(idefics_jax.load_pretrained(tiny_hf).text.embed[...])
    for p in (pathlib.Path(tmp_path / "orbax"), epath.Path(tmp_path / "orbax")):
        np.testing.assert_array_equal(np.asarray(idefics_jax.load_pretrained(p).text.embed[...]), ref)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text("{}")
    assert is_run(epath.Path(tmp_path / "run")) and is_run(pathlib.Path(tmp_path / "run"))
    assert not is_run(epath.Path(tmp_path / "orbax"))
