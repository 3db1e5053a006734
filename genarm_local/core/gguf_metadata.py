"""A GGUF file's key-value metadata, read without loading the model: the few keys the engine needs before loading
(general.type, general.architecture, an ARM's genarm.calibration.*).

gguf-py's GGUFReader parses every field and tensor record into numpy views, which for a 262,144-token vocabulary
takes seconds; here the header is walked once and the values of keys nobody asked for are skipped (fixed-size
arrays in one jump, string arrays by their lengths), which takes milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

from .errors import CorruptModelError

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType) -> struct format of one scalar; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.path, self.at = data, path, 0

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.at + size > len(self.data):
            raise CorruptModelError(f"{self.path}: the GGUF header ends early (truncated file?)")
        values = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += size
        return values[0] if len(values) == 1 else values

    def string(self, keep: bool = True) -> str | None:
        n = self.take("Q")
        if self.at + n > len(self.data):
            raise CorruptModelError(f"{self.path}: a GGUF string runs past the end of the file")
        raw = self.data[self.at : self.at + n] if keep else None
        self.at += n
        return raw.decode("utf-8", errors="replace") if keep else None

    def value(self, kind: int, keep: bool):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string(keep)
        if kind != _ARRAY:
            raise CorruptModelError(f"{self.path}: unknown GGUF value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS and not keep:
            self.at += count * struct.calcsize("<" + _SCALARS[item])
            return None
        values = [self.value(item, keep) for _ in range(count)]
        return values if keep else None


def read_metadata(path: str | os.PathLike, wanted: Callable[[str], bool]) -> dict[str, object]:
    """The metadata values whose keys ``wanted`` accepts: numbers, strings (UTF-8) and lists of them."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # an empty file cannot be mapped
            raise CorruptModelError(f"{path}: not a GGUF file ({exc})") from exc
    with data:
        cursor = _Cursor(data, path)
        if cursor.take("4s") != GGUF_MAGIC:
            raise CorruptModelError(f"{path} is not a GGUF file (bad magic bytes)")
        version = cursor.take("I")
        if version not in (2, 3):
            raise CorruptModelError(f"{path}: GGUF version {version} is not supported (2 or 3; big-endian?)")
        _n_tensors, n_kv = cursor.take("Q"), cursor.take("Q")
        out = {}
        for _ in range(n_kv):
            key = cursor.string()
            keep = wanted(key)
            value = cursor.value(cursor.take("I"), keep)
            if keep:
                out[key] = value
        return out
