"""The command line itself: arguments checked before anything loads, --debug anywhere, --version, train --list."""

import os

import pytest

from idefics_jax import cli, configs

EXAMPLE = os.path.join(os.path.dirname(cli.__file__), "models", "tiny-shapes", "examples", "shapes-1.png")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the CLI must refuse its arguments first."""
    from idefics_jax.generation.chat import Chat

    monkeypatch.setattr(Chat, "load", classmethod(lambda *a, **k: pytest.fail("the model was loaded")))


@pytest.mark.parametrize("args, message", [
    (["--max-new-tokens", "0"], "max_new_tokens must be a positive integer; got 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0 (0: greedy); got -1.0"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0 (0: greedy); got nan"),
    (["--top-k", "0"], "top_k must be an integer >= 1 (or None); got 0"),
    (["--top-p", "0"], "top_p must be in (0, 1] (or None); got 0.0"),
    (["--top-p", "1.5"], "top_p must be in (0, 1] (or None); got 1.5"),
    (["--longest-edge", "0"], "--longest-edge must be a positive number of pixels; got 0"),
    (["--image", EXAMPLE, "--image", "no/such.png"], "no/such.png: no such image file"),
    (["--video", "no/such.mp4"], "no/such.mp4: no such video file"),
])
def test_generate_arguments_are_checked_before_loading(no_loading, capsys, args, message):
    assert cli.main(["generate", "--prompt", "hi", *args]) == 1
    err = capsys.readouterr().err
    assert err == f"idefics-jax generate: error: {message}\n"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_anywhere_shows_the_traceback(no_loading, where):
    argv = ["generate", "--prompt", "hi", "--top-k", "0"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(ValueError, match="top_k must be"):
        cli.main(argv)


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"idefics-jax {version('idefics-jax')}\n"


def test_train_lists_the_shipped_configs(capsys):
    assert cli.main(["train", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == configs.names() and {"tiny", "tiny-shapes"} <= set(listed)
    assert cli.main(["train"]) == 1
    assert "name a config: a YAML file or a shipped one (" in capsys.readouterr().err
    assert cli.main(["train", "no-such-config"]) == 1
    assert "no-such-config: no such config file (nor a shipped config: " in capsys.readouterr().err
