"""Where a run's metrics go: WORKDIR/metrics.jsonl, TensorBoard event files in WORKDIR/tensorboard, and Weights &
Biases when `logging.wandb` names a project. Process 0 writes; the others write nothing.

Each logged step is one row, `{"step": N, "loss": ..., ...}`, every other value a number: the same names in all
three places. A resumed run continues the same stream: what the files hold past the step it resumes from (steps a
killed run logged after its newest checkpoint, which the resumed run computes again) is dropped first, so no step
appears twice. Rows are on disk when `write` returns (a kill loses nothing logged).

The event files are written here (TFRecord framing and the scalar fields of TensorBoard's Event protocol buffer,
a few lines) rather than with tensorboardX, whose import imports torch wherever torch is installed.

    writers = Writers(config, start=0)
    writers.write({"step": 1, "loss": 2.3, "learning_rate": 1e-4})
    writers.close()
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import secrets
import socket
import struct
import time

import jax

from idefics_jax.checkpoints.paths import as_path, is_remote
from idefics_jax.train.config import TrainConfig

TENSORBOARD = "tensorboard"  # WORKDIR/tensorboard
WANDB_ID = "wandb-id"  # WORKDIR/wandb-id: the W&B run a resumed run continues


class _File:
    """A file grown one piece at a time. A local file is appended to and flushed. A bucket has no append, but
    writes each object whole: there the object is rewritten with everything (it stays small), so a killed run
    leaves the previous version, never half a piece."""

    def __init__(self, path, keep: bytes | None = None):
        """`keep`: the content to start from (the file is rewritten with it); None: the file as it is."""
        self.path, self.remote = path, is_remote(path)
        if keep is not None and (not path.exists() or path.read_bytes() != keep):
            if self.remote:
                path.write_bytes(keep)
            else:
                tmp = path.parent / (path.name + ".tmp")
                tmp.write_bytes(keep)
                os.replace(tmp, path)
        self.data = (path.read_bytes() if path.exists() else b"") if self.remote else b""

    def append(self, piece: bytes) -> None:
        if self.remote:
            self.data += piece
            self.path.write_bytes(self.data)
        else:
            with open(self.path, "ab") as f:
                f.write(piece)


class MetricsFile:
    """WORKDIR/metrics.jsonl, one JSON object per logged step, kept across resumes."""

    def __init__(self, path, resume_at: int | None = None):
        """`resume_at`: the step the run starts from; lines of later steps (and a line a kill cut short) go."""
        keep = None
        if resume_at is not None and path.exists():
            lines = path.read_bytes().splitlines(keepends=True)
            keep = b"".join(line for line in lines if line.endswith(b"\n") and _step(line) <= resume_at)
        self.file = _File(path, keep)

    def write(self, row: dict) -> None:
        self.file.append((json.dumps(row) + "\n").encode())

    def close(self) -> None:
        pass


def _step(line: bytes) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def _masked_crc(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C, rotated and offset."""
    c = 0xFFFFFFFF
    for byte in data:
        c = _CRC32C[(c ^ byte) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One record of a TFRecord file (an event file is a sequence of them)."""
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def read_records(blob: bytes) -> list[tuple[bytes, bytes]]:
    """(record, payload) of each whole record of a TFRecord file, up to a record cut short (a kill's tail). A file
    is only ever appended to, so the records before the tail are whole: the checksums are not computed again (in
    Python, seconds per megabyte)."""
    out, i = [], 0
    while i + 12 <= len(blob):
        (n,) = struct.unpack("<Q", blob[i:i + 8])
        end = i + 12 + n + 4
        if end > len(blob):
            break
        out.append((blob[i:end], blob[i + 12:i + 12 + n]))
        i = end
    return out


# TensorBoard's Event protocol buffer (tensorflow/core/util/event.proto, summary.proto), the few fields a scalar
# needs, written in the protobuf wire format: Event {wall_time = 1 (double), step = 2 (int64), file_version = 3
# (string), summary = 5}; Summary {value = 1 (repeated)}; Summary.Value {tag = 1 (string), simple_value = 2 (float)}.

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def scalar_event(step: int, values: dict[str, float], wall_time: float) -> bytes:
    summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", v)) for tag, v in values.items())
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + _field(5, summary)


def version_event(wall_time: float) -> bytes:
    return b"\x09" + struct.pack("<d", wall_time) + _field(3, b"brain.Event:2")


def event_step(data: bytes) -> int:
    """The step of an encoded Event (0 when it has none)."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        kind = key & 7
        if key >> 3 == 2 and kind == 0:
            return _read_varint(data, i)[0]
        if kind == 0:
            i = _read_varint(data, i)[1]
        elif kind == 2:
            n, i = _read_varint(data, i)
            i += n
        else:
            i += {1: 8, 5: 4}[kind]
    return 0


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i


class TensorBoard:
    """Scalars in TensorBoard event files under `directory`: a new file per start, earlier files cut back to the
    step the run resumes from."""

    def __init__(self, directory, start: int):
        directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(directory.glob("events.out.tfevents.*")):
            _File(path, b"".join(r for r, data in read_records(path.read_bytes()) if event_step(data) <= start))
        # Named as TensorFlow names them (TensorBoard reads files in name order): time, host, and the step started
        # from, so that two starts never share a name.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{start:09d}"
        self.file = _File(directory / name, b"")
        self.file.append(tfrecord(version_event(time.time())))

    def write(self, row: dict) -> None:
        values = {k: float(v) for k, v in row.items() if k != "step"}
        self.file.append(tfrecord(scalar_event(row["step"], values, time.time())))

    def close(self) -> None:
        pass


def check_wandb(config: TrainConfig) -> None:
    """Refuses `logging.wandb` without wandb installed, before anything loads."""
    if config.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"logging.wandb: {config.logging.wandb}: Weights & Biases is not installed "
                         "(pip install 'idefics-jax[wandb]')")


class WandB:
    """A Weights & Biases run in `project`, the same run across resumes (its id kept in WORKDIR/wandb-id). W&B's
    own settings apply: WANDB_MODE=offline writes the run under WORKDIR/wandb (a local WORKDIR) for `wandb sync`;
    WANDB_ENTITY, WANDB_NAME, WANDB_API_KEY. W&B keeps steps increasing: a resumed run's steps that W&B already
    holds are not logged again."""

    def __init__(self, config: TrainConfig):
        import wandb

        workdir = as_path(config.workdir)
        id_file = workdir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        if not id_file.exists():
            id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(project=config.logging.wandb, id=run_id, resume="allow",
                                  dir=None if is_remote(workdir) else os.fspath(workdir),
                                  config=dataclasses.asdict(config))
        except wandb.errors.Error as e:  # no API key, no network, ...: one line, as every other config error
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"logging.wandb: {config.logging.wandb}: {msg} (WANDB_MODE=offline logs without "
                             "an account)") from None

    def write(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


class Writers:
    """metrics.jsonl, TensorBoard (`logging.tensorboard`) and W&B (`logging.wandb`), on process 0."""

    def __init__(self, config: TrainConfig, start: int):
        self.writers: list = []
        if jax.process_index() != 0:
            return
        workdir = as_path(config.workdir)
        self.writers.append(MetricsFile(workdir / "metrics.jsonl", resume_at=start))
        if config.logging.tensorboard:
            self.writers.append(TensorBoard(workdir / TENSORBOARD, start))
        if config.logging.wandb:
            self.writers.append(WandB(config))

    def write(self, row: dict) -> None:
        for w in self.writers:
            w.write(row)

    def close(self) -> None:
        for w in self.writers:
            w.close()
