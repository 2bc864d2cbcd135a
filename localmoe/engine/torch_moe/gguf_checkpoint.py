"""Reading a GGUF MoE file for the torch engine: its dense weights dequantised once to float32 at load, and each
expert's bytes, still in the file's quantisation, when the expert store asks for them.

The file is seen through `placement.gguf_file.checkpoint_view` (hub names and shapes, each expert a byte range of
its layer's `*_exps` tensor), so the model, the planner and the store are the same as for a safetensors checkpoint.
A cold miss reads only that expert's bytes: with 4-bit experts, an eighth of what its float32 matrices would be.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType
from torch import Tensor

from localmoe.engine.torch_moe import ggml_quants
from localmoe.engine.torch_moe.checkpoint import _ST_DTYPES, Checkpoint, DenseWeights
from localmoe.engine.torch_moe.config import ModelArgs
from localmoe.engine.torch_moe.expert_store import Loader, PackedExpert
from localmoe.engine.torch_moe.packed import PackedLinear
from localmoe.errors import LocalmoeError
from localmoe.placement.gguf_file import GGUFFormatError, checkpoint_view, read_header

_FLOAT_TYPES = _ST_DTYPES  # the unquantised types, by the same names in both formats


def type_of(name: str) -> int:
    """The ggml type id of a type name as `checkpoint_view` writes it (F32, Q4_K, ...); -1 when unknown."""
    try:
        return int(GGMLQuantizationType[name])
    except KeyError:
        return -1


def read_view(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF-style config, hub-named tensors) of a GGUF MoE, with one-line errors for a foreign or truncated file."""
    try:
        header = read_header(path)
    except GGUFFormatError as e:
        raise LocalmoeError(f"{path.name} is not a readable GGUF file: {e}") from None
    except OSError as e:
        raise LocalmoeError(f"cannot read {path}: {e.strerror}") from None
    config, tensors = checkpoint_view(header, path.name)
    size = path.stat().st_size
    for key, t in tensors.items():
        if t.offset + t.nbytes > size:
            raise LocalmoeError(f"{path.name} is truncated: tensor {key} ends at byte {t.offset + t.nbytes:,} but "
                                f"the file has {size:,} bytes")
        if t.dtype not in _FLOAT_TYPES and not ggml_quants.supported(type_of(t.dtype)):
            known = ", ".join(GGMLQuantizationType(q).name for q in ggml_quants.BLOCK)
            raise LocalmoeError(f"{path.name}: tensor {key} is {t.dtype}, a quantisation the native engine does "
                                f"not read (it reads {known}); use the llama.cpp backend")
    return config, tensors


class GGUFCheckpoint(Checkpoint):
    """A GGUF MoE behind the safetensors checkpoint's interface: `get` dequantises a dense tensor, `read_raw` gives
    an expert's packed bytes. One file descriptor, pread only: nothing is memory-mapped."""

    def __init__(self, path: Path, device: torch.device | str = "cpu", view: tuple[dict, dict] | None = None) -> None:
        self._view = view
        super().__init__(path, device)
        self.file = path

    def _open(self, path: Path) -> None:
        self.config, self.tensors = self._view or read_view(path)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise LocalmoeError(f"cannot open {path}: {e.strerror}") from None
        self._stack.callback(os.close, fd)
        self._fds = {path.name: fd}
        self._handles = {}
        # llama.cpp's `llama` arch (Mixtral) ropes interleaved pairs, so its converter reorders q and k rows; the
        # engine rotates halves, as transformers does: the rows are put back when read
        self._unpermute = {} if self.config["model_type"] != "mixtral" else {
            "q_proj": self.config["num_attention_heads"], "k_proj": self.config["num_key_value_heads"]}

    def read_raw(self, key: str, out: Tensor | None = None) -> Tensor:
        """The tensor's bytes as stored (uint8), read with pread into `out` when given."""
        info = self.tensors[key]
        buf = out if out is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        self._pread(key, info, memoryview(buf.numpy()).cast("B"), self.dir.name)
        self.bytes_read += info.nbytes
        return buf

    def get(self, key: str, shape: tuple[int, ...]) -> Tensor:
        info = self.info(key, shape)
        raw = self.read_raw(key)
        if info.dtype in _FLOAT_TYPES:
            t = raw.view(_FLOAT_TYPES[info.dtype]).reshape(shape).to(torch.float32)
        else:
            t = ggml_quants.dequantize(type_of(info.dtype), raw, shape)
        return self._rope_rows(key, t).to(self.device).contiguous()

    def get_packed(self, key: str, shape: tuple[int, int]) -> PackedLinear:
        """A matrix as the file stores it (rows in its ggml type), for PackedLinear."""
        info = self.info(key, shape)
        raw = self.read_raw(key)
        return PackedLinear([(type_of(info.dtype), self._rope_rows(key, raw.view(shape[0], -1)).reshape(-1),
                              shape[0])], shape[1])

    def _rope_rows(self, key: str, rows: Tensor) -> Tensor:
        """q and k rows (values, or each row's bytes) in the rotate-half order; other tensors as they are."""
        heads = next((n for proj, n in self._unpermute.items() if key.endswith(f".self_attn.{proj}.weight")), 0)
        if not heads:
            return rows
        n = rows.shape[0]
        return rows.reshape(heads, n // heads // 2, 2, -1).transpose(1, 2).reshape(n, -1).contiguous()

    def read(self, key: str, shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
        t = self.get(key, shape)
        return out.copy_(t) if out is not None else t

    def release_mmaps(self) -> None:
        pass  # nothing is mapped


# the dense matrices a GGUF keeps packed in memory (model.py's names): the ones read whole every token
PACKED_DENSE = ("tok_embeddings", "output", "q_proj", "k_proj", "v_proj", "o_proj")


class GGUFDenseWeights(DenseWeights):
    """DenseWeights of a GGUF: the attention projections, embeddings and output head as PackedLinear (the file's
    bytes), the rest (norms, routers, biases, shared experts) dequantised to float32. With `packed` False (the GPU
    path, whose matmuls are torch's), every dense weight is dequantised once to float32 on the checkpoint's
    device."""

    def __init__(self, ckpt: Checkpoint, args: ModelArgs, packed: bool = True) -> None:
        super().__init__(ckpt, args)
        self.packed = packed

    def __getitem__(self, name: str) -> Tensor | PackedLinear:  # type: ignore[override]
        key, shape = self.keys_shapes[name]
        if self.packed and name.rsplit(".", 1)[-1] in PACKED_DENSE:
            assert isinstance(self.ckpt, GGUFCheckpoint)
            return self.ckpt.get_packed(key, (shape[0], shape[1]))
        return self.ckpt.get(key, shape)


def expert_types(ckpt: GGUFCheckpoint, args: ModelArgs) -> list[tuple[int, int]]:
    """Per layer, the ggml types of its experts' (gate and up, down) rows, checked against the shapes ModelArgs
    implies; gate and up must match (they are computed as one stacked matrix)."""
    moe, (gate, up, down) = args.moe_block, args.expert_proj
    layer_types: list[tuple[int, int]] = []
    for layer in range(args.n_layers):
        p = f"model.layers.{layer}.{moe}.experts.0."
        g, u, d = (ckpt.info(f"{p}{name}.weight", shape) for name, shape in (
            (gate, (args.expert_ff, args.dim)), (up, (args.expert_ff, args.dim)), (down, (args.dim, args.expert_ff))))
        if g.dtype != u.dtype:
            raise LocalmoeError(f"layer {layer}'s expert gate ({g.dtype}) and up ({u.dtype}) projections are "
                                "quantised differently; the native engine needs them alike")
        layer_types.append((type_of(g.dtype), type_of(d.dtype)))
    return layer_types


def gguf_expert_loader(ckpt: GGUFCheckpoint, args: ModelArgs) -> Loader:
    """(layer, expert) -> its packed matrices (gate and up rows stacked, then down) and the bytes read."""
    moe, (gate, up, down) = args.moe_block, args.expert_proj
    layer_types = expert_types(ckpt, args)

    def load(layer: int, expert: int) -> tuple[PackedExpert, int]:
        p = f"model.layers.{layer}.{moe}.experts.{expert}."
        g, u, d = (ckpt.tensors[f"{p}{name}.weight"] for name in (gate, up, down))
        gate_up = torch.empty(g.nbytes + u.nbytes, dtype=torch.uint8)
        ckpt.read_raw(f"{p}{gate}.weight", gate_up[: g.nbytes])
        ckpt.read_raw(f"{p}{up}.weight", gate_up[g.nbytes :])
        down_raw = ckpt.read_raw(f"{p}{down}.weight")
        gu_type, down_type = layer_types[layer]
        packed = PackedExpert(gate_up, down_raw, gu_type, down_type, args.expert_ff, args.dim)
        return packed, g.nbytes + u.nbytes + d.nbytes

    return load
