"""A reader for `.safetensors` files that needs only numpy and ml_dtypes.

The format is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw data. bfloat16 and
float8 (which numpy lacks) come from ml_dtypes, already a dependency of jax. Every header entry is checked
before use, so a truncated or hostile file raises `SafetensorsError` naming the
file and tensor instead of returning garbage.

Tensors are read with positioned reads into their own arrays, not through a
memory map: mapped pages of a shard would count in the process's resident set
until the whole shard is unmapped, while a read holds one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
# Headers are JSON of a few hundred bytes per tensor; anything far larger is not
# a safetensors file.
_MAX_HEADER_BYTES = 256 << 20


class SafetensorsError(ValueError):
    """A `.safetensors` file that cannot be read as one."""


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name, dtype, shape, start, end):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end


class SafetensorsFile:
    """One open `.safetensors` file: `tensors` maps names to `TensorInfo`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            self.tensors, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, message: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: {message}")

    def _read_header(self) -> tuple[dict[str, TensorInfo], int]:
        size = os.fstat(self._file.fileno()).st_size
        prefix = self._file.read(8)
        if len(prefix) < 8:
            raise self._fail("too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise self._fail(f"header length {header_len} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + header_len
        data_size = size - data_start
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._check_entry(name, entry, data_size)
        return tensors, data_start

    def _check_entry(self, name, entry, data_size) -> TensorInfo:
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise self._fail(f"tensor {name}: unsupported or missing dtype {dtype!r}")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise self._fail(f"tensor {name}: malformed shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise self._fail(f"tensor {name}: malformed data_offsets {offsets!r}")
        start, end = offsets
        dtype = DTYPES[entry["dtype"]]
        expected = math.prod(shape) * dtype.itemsize
        if not 0 <= start <= end <= data_size or end - start != expected:
            raise self._fail(
                f"tensor {name}: byte range {offsets} does not hold {entry['dtype']}{shape} "
                f"({expected} bytes) within the {data_size} data bytes"
            )
        return TensorInfo(name, dtype, tuple(shape), start, end)

    def read(self, name: str) -> np.ndarray:
        """The tensor, read into a new array."""
        info = self.tensors[name]
        array = np.empty(info.shape, info.dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        done, offset = 0, self._data_start + info.start
        while done < len(view):
            n = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise self._fail(f"tensor {name}: file ended while reading")
            done += n
        return array

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
