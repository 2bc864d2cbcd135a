"""A fast GGUF header reader: metadata and tensor infos, without decoding the tokenizer's 100k strings.

`gguf.GGUFReader` builds Python objects for every element of every array (3 s for SmolLM2's vocabulary), which
every `ask` and UI start would pay. Here large arrays are skipped (their length is kept) and scalars, strings and
short arrays are decoded; tensor data is left on disk for the caller to memory-map.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
SMALL_ARRAY = 64  # arrays up to this length are decoded (per-layer head counts and the like)

# GGUF value types → struct formats (little-endian); 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    type: int  # ggml type id
    offset: int  # absolute file offset of the data
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type).name
        except ValueError:
            return f"type{self.type}"


@dataclass
class SkippedArray:
    """A long array left undecoded: its element type and length are known."""

    type: int
    length: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int


class _Reader:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise GGUFFormatError("unexpected end of file in the header")
        return b

    def unpack(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("Q")
        if n > 1 << 30:
            raise GGUFFormatError(f"implausible string length {n}")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.unpack("I"), self.unpack("Q")
            if n > 1 << 32:
                raise GGUFFormatError(f"implausible array length {n}")
            if n <= SMALL_ARRAY:
                return [self.value(etype) for _ in range(n)]
            self.skip(etype, n)
            return SkippedArray(etype, n)
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")

    def skip(self, etype: int, n: int) -> None:
        if etype in _SCALARS:
            self.f.seek(struct.calcsize(_SCALARS[etype]) * n, 1)
        elif etype == STRING:
            for _ in range(n):
                (length,) = struct.unpack("<Q", self.read(8))
                self.f.seek(length, 1)
        elif etype == ARRAY:
            for _ in range(n):
                self.value(ARRAY)
        else:
            raise GGUFFormatError(f"unknown GGUF value type {etype}")


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's header; raises GGUFFormatError on anything malformed."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f)
        if r.read(4) != MAGIC:
            raise GGUFFormatError("not a GGUF file")
        version = r.unpack("I")
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = r.unpack("Q"), r.unpack("Q")
        if n_tensors > 1 << 24 or n_kv > 1 << 24:
            raise GGUFFormatError("implausible tensor or key count")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            meta[key] = r.value(r.unpack("I"))
        raw = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.unpack("I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(r.unpack("Q") for _ in range(n_dims))
            raw.append((name, shape, r.unpack("I"), r.unpack("Q")))
        alignment = int(meta.get("general.alignment", 32) or 32)
        pos = f.tell()
    data_offset = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ttype, offset in raw:
        n = 1
        for d in shape:
            n *= d
        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"tensor {name} has unknown ggml type {ttype}") from None
        tensors.append(TensorInfo(name, shape, ttype, data_offset + offset, n, n // block * size))
    return GGUFHeader(version, meta, tensors, data_offset)
