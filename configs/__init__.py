"""The shipped training configs (`*.yaml` beside this file), found by name from any directory.

    idefics-jax train tiny workdir=/tmp/run      # this folder's tiny.yaml
    idefics-jax train my-run.yaml                # any path still works
"""

from __future__ import annotations

from importlib import resources

SUFFIX = ".yaml"


def names() -> list[str]:
    """The shipped configs' names ("tiny", "tiny-shapes", ...)."""
    return sorted(f.name[: -len(SUFFIX)] for f in resources.files(__name__).iterdir() if f.name.endswith(SUFFIX))


def find(name: str) -> str | None:
    """The file of the shipped config called `name` ("tiny" or "tiny.yaml"), or None."""
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if stem not in names():
        return None
    return str(resources.files(__name__) / (stem + SUFFIX))
