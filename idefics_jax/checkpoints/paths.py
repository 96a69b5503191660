"""Checkpoint, workdir and export locations: local directories or buckets (`gs://...`), all read and written through
`etils.epath` (what Orbax uses), never `os.path`, so a TPU VM run reads and writes a bucket directly.

A new checkpoint or export is built whole in a local directory, then published: a local destination by one rename,
a bucket by uploading it file by file with the file that loading keys on (the completion marker) last, so that a
half-written destination never loads.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import threading
from typing import Iterator

from etils import epath

from idefics_jax.runtime.progress import bytes_progress

UPLOAD_THREADS = 8  # files in flight to a bucket: an object store's throughput grows with parallel requests
_CHUNK = 16 * 2**20


def as_path(path) -> epath.Path:
    """A checkpoint, workdir or export location as a path object: local (made absolute, as Orbax wants) or a
    bucket (`gs://...`), both read and written through `etils.epath`, which Orbax uses."""
    if isinstance(path, epath.Path) or is_remote(path):
        return epath.Path(path)
    return epath.Path(os.path.abspath(os.fspath(path)))


def is_remote(path) -> bool:
    """Whether `path` names a location behind a URL scheme (`gs://`, `s3://`, ...): no local rename, no append."""
    return "://" in str(path)


def check_new(dst) -> None:
    """Refuses a destination that already exists (an output is never written over)."""
    if as_path(dst).exists():
        raise FileExistsError(f"{dst}: destination already exists (remove it or choose another)")


@contextlib.contextmanager
def building(dst, marker: str, progress: bool = False) -> Iterator[str]:
    """Yields a new local directory to build `dst` in; when the block completes, the directory becomes `dst`.

    Local `dst`: the directory is made next to it and renamed, one atomic step. A bucket: the directory is made in
    the system's temporary folder (room for the whole output is needed there) and uploaded with `marker` (the file
    whose presence makes a directory load: see `upload`) last. On any failure nothing is left at `dst`: the local
    directory is removed, and so is whatever reached the bucket.
    """
    check_new(dst)
    if is_remote(dst):
        tmp = tempfile.mkdtemp(prefix="idefics-jax-upload-")
        try:
            yield tmp
            upload(tmp, dst, marker, progress)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    local = os.fspath(as_path(dst))
    parent = os.path.dirname(local)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(local)}.partial-", dir=parent)
    try:
        yield tmp
        os.rename(tmp, local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def upload(src: str, dst, marker: str, progress: bool = False) -> None:
    """Copies local directory `src` to `dst` (a bucket or any epath location), `marker` (a path relative to `src`)
    last, after every other file is complete: a reader that checks for the marker never sees a partial copy. On
    failure, removes what it copied (`dst` must not have existed)."""
    dst = as_path(dst)
    files = sorted(os.path.relpath(os.path.join(root, f), src) for root, _, names in os.walk(src) for f in names)
    if marker not in files:
        raise ValueError(f"{src}: no {marker} to publish last")
    bar = bytes_progress("uploading", sum(os.path.getsize(os.path.join(src, f)) for f in files), progress)
    for d in sorted({os.path.dirname(f) for f in files}):
        (dst / d if d else dst).mkdir(parents=True, exist_ok=True)  # no-op on a bucket; a directory elsewhere

    lock = threading.Lock()

    def put(rel: str) -> None:
        with open(os.path.join(src, rel), "rb") as f, (dst / rel).open("wb") as g:
            shutil.copyfileobj(f, g, _CHUNK)
        with lock:
            bar.update(os.path.getsize(os.path.join(src, rel)))

    try:
        with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            list(pool.map(put, [f for f in files if f != marker]))  # re-raises the first failure
        put(marker)
    except BaseException:
        with contextlib.suppress(Exception):
            dst.rmtree(missing_ok=True)
        raise


def copy_side_files(src, dst: str) -> None:
    """The top-level files of checkpoint `src` (local or a bucket) but the weights (`*.safetensors` and their
    index; folders such as `params/` are not copied) into local directory `dst`: tokenizer, processor, chat
    template, configs."""
    for p in as_path(src).iterdir():
        if not (p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json" or p.is_dir()):
            with p.open("rb") as f, open(os.path.join(dst, p.name), "wb") as g:
                shutil.copyfileobj(f, g, _CHUNK)


def local_side_files(path) -> str:
    """A local directory with the files of checkpoint `path` that libraries read only from local disk
    (`copy_side_files`): `path` itself when it is local; for a bucket, a temporary copy, removed when the process
    exits."""
    if not is_remote(path):
        return os.fspath(path)
    tmp = tempfile.mkdtemp(prefix="idefics-jax-files-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    copy_side_files(path, tmp)
    return tmp
