"""The tensors of a Hugging Face checkpoint directory, read from its safetensors headers alone (no weights).

The one reader of safetensors headers: the planner sizes a checkpoint from it, and the torch engine's cold tier
reads experts with pread at the offsets it gives.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from localmoe.errors import LocalmoeError

MAX_HEADER_BYTES = 100 * 1024**2  # a longer header is a foreign or corrupt file, not a checkpoint


@dataclass(frozen=True)
class TensorInfo:
    file: str  # shard file name inside the checkpoint directory
    dtype: str  # safetensors dtype code: F32, BF16, ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """A safetensors file's tensors from its header (8-byte little-endian length, then JSON), without the data.

    The JSON's data_offsets are relative to the end of the header; the offsets returned here are absolute."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n} is implausible")
            raw = f.read(n)
            if len(raw) != n:
                raise ValueError("truncated header")
        header = json.loads(raw)
    except (OSError, ValueError) as e:
        raise LocalmoeError(f"cannot read safetensors header of {path}: {e}") from None
    base = 8 + n
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[key] = TensorInfo(path.name, meta["dtype"], tuple(meta["shape"]), base + start, end - start)
    return out


def shard_files(model_dir: Path) -> list[str]:
    """The checkpoint's shard file names: those its index maps tensors to, else every .safetensors file; each one
    checked to exist, so a missing shard is named before anything is read."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise LocalmoeError(f"{model_dir} holds no .safetensors files")
    for name in files:
        if not (model_dir / name).exists():
            raise LocalmoeError(f"checkpoint shard {name} is missing from {model_dir}")
    return files


def checkpoint_tensors(model_dir: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory (all shards), from the safetensors headers only."""
    tensors: dict[str, TensorInfo] = {}
    for name in shard_files(model_dir):
        tensors.update(read_safetensors_header(model_dir / name))
    return tensors
