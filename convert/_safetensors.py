"""Reading and writing safetensors files one tensor at a time.

The reader uses plain reads, not mmap: a mapped file's pages count toward the converter's resident memory,
and for a 16 GB checkpoint that would be a second copy of the model. Files in a bucket (`gs://...`) are read with
ranged reads through `etils.epath`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from idefics_jax.checkpoints.checkpoint import CheckpointError
from idefics_jax.checkpoints.paths import as_path, is_remote


DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Parses one file's header and checks that every tensor lies inside the file."""
    name = os.path.basename(path)
    try:
        size = as_path(path).stat().length if is_remote(path) else os.path.getsize(path)
        with _open(path) as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{name}: file too short to be safetensors ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{name}: corrupt header (header length {n}, file size {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{name}: missing ({path})") from None
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError):
        raise CheckpointError(f"{name}: corrupt header (not a JSON object)") from None
    header.pop("__metadata__", None)
    out = {}
    for key, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(s) for s in h["shape"])
            begin, end = (int(o) for o in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: corrupt header entry for '{key}'") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{name}: tensor '{key}' has {end - begin} bytes for shape {shape} {h['dtype']}")
        if 8 + n + end > size:
            raise CheckpointError(f"{name}: truncated ({size} bytes, tensor '{key}' ends at byte {8 + n + end})")
        out[key] = TensorInfo(path, dtype, shape, 8 + n + begin, nbytes)
    return out


def _open(path: str):
    return as_path(path).open("rb") if is_remote(path) else open(path, "rb")


def read_tensor(info: TensorInfo) -> np.ndarray:
    with _open(info.file) as f:
        f.seek(info.start)
        if is_remote(info.file):  # a stream without a file descriptor: one read, into writable memory
            arr = np.frombuffer(bytearray(f.read(info.nbytes)), dtype=info.dtype)
        else:
            arr = np.fromfile(f, dtype=info.dtype, count=int(np.prod(info.shape, dtype=np.int64)))
    if arr.nbytes != info.nbytes:
        raise CheckpointError(f"{os.path.basename(info.file)}: truncated while reading a tensor")
    return arr.reshape(info.shape)


def write_file(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes one safetensors file, tensor by tensor (no second in-memory copy)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, arr in tensors.items():
        header[key] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
