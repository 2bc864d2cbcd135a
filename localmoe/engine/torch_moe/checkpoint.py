"""Reading a Hugging Face checkpoint directory for the torch engine: its dense weights once, at load, and each
expert's matrices when the expert store asks for them.

Tensor offsets come from the safetensors headers (localmoe.placement.safetensors, the planner's reader too). Dense
weights are read through safetensors' mmaps, which are closed after load; experts are read with pread and dropped
from the page cache, so a memory-capped machine holds each byte once. Hub tensor names live here only: the model
sees the names of model.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from localmoe.engine.torch_moe.config import ModelArgs
from localmoe.engine.torch_moe.expert_store import Loader
from localmoe.errors import LocalmoeError
from localmoe.placement.safetensors import TensorInfo, read_safetensors_header, shard_files


class Checkpoint:
    """Tensors of a checkpoint across its safetensors shards, read one at a time with shape checks."""

    def __init__(self, model_dir: Path, device: torch.device | str = "cpu") -> None:
        self.dir = model_dir
        self.device = torch.device(device)  # where `get` puts the dense weights
        self._stack = ExitStack()
        try:
            self._open(model_dir)
        except BaseException:
            self._stack.close()  # the fds and maps opened so far: the caller never gets an object to close
            raise
        self.bytes_read = 0
        # True where every expert fits in RAM beside the page cache (the engine decides): the next process that
        # opens this checkpoint then reads it from memory, not from disk
        self.keep_page_cache = False

    def _open(self, model_dir: Path) -> None:
        files = shard_files(model_dir)
        from safetensors import safe_open

        # safetensors handles (each an mmap of its shard) serve the dense weights at load, then are closed by
        # release_mmaps(): a mapped page cannot be dropped from RAM, and the whole file would stay resident.
        self._mmaps = ExitStack()
        self._stack.callback(self._mmaps.close)
        self._handles: dict[str, Any] = {}
        for name in files:
            path = model_dir / name
            try:
                self._handles[name] = self._mmaps.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
                raise LocalmoeError(f"cannot read checkpoint shard {path}: {e}") from None
        # Offsets from the headers, for the cold tier's pread reads; one fd per shard, closed with the stack.
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[str, int] = {}
        for name in files:
            self.tensors.update(read_safetensors_header(model_dir / name))
            try:
                fd = os.open(model_dir / name, os.O_RDONLY)
            except OSError as e:
                raise LocalmoeError(f"cannot open checkpoint shard {model_dir / name}: {e.strerror}") from None
            self._stack.callback(os.close, fd)
            self._fds[name] = fd

    def info(self, key: str, shape: tuple[int, ...]) -> TensorInfo:
        """The header's entry for `key`, checked against the shape config.json implies before any byte is read."""
        info = self.tensors.get(key)
        if info is None:
            raise LocalmoeError(f"tensor {key} is missing from the checkpoint in {self.dir}")
        if tuple(info.shape) != shape:
            raise LocalmoeError(f"tensor {key} has shape {list(info.shape)}, expected {list(shape)} from config.json")
        return info

    def get(self, key: str, shape: tuple[int, ...]) -> Tensor:
        info = self.info(key, shape)
        handle = self._handles.get(info.file)
        if handle is None:  # after release_mmaps (only dtypes pread cannot decode come here): open it briefly
            from safetensors import safe_open

            with safe_open(str(self.dir / info.file), framework="pt") as h:
                raw = h.get_tensor(key).clone()
        else:
            raw = handle.get_tensor(key)
        # copy=True: a float32 tensor would otherwise stay a view of the file's mmap, pages the kernel may evict
        # and read again under memory pressure
        t = raw.to(device=self.device, dtype=torch.float32, copy=True)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read(self, key: str, shape: tuple[int, ...], out: Tensor | None = None) -> Tensor:
        """The cold tier: one tensor with os.pread at its header offset, then dropped from the page cache
        (POSIX_FADV_DONTNEED) so it does not sit in RAM twice. Same bytes as `get`, so bit-identical.

        `out` (float32, contiguous, `shape`): read into it — straight into its memory when the file holds float32 —
        so a miss allocates nothing beyond the expert's own tensors."""
        info = self.info(key, shape)
        dtype = _ST_DTYPES.get(info.dtype)
        if dtype is None or sys.byteorder != "little":
            t = self.get(key, shape)  # a dtype torch.frombuffer cannot take: safetensors decodes it
            return out.copy_(t) if out is not None else t
        direct = out is not None and dtype == torch.float32 and out.is_contiguous() and info.nbytes == out.nbytes
        buf = memoryview(out.numpy()).cast("B") if direct else memoryview(bytearray(info.nbytes))  # type: ignore
        self._pread(key, info, buf, f"checkpoint shard {self.dir / info.file}")
        if direct:
            return out  # type: ignore[return-value]
        t = torch.frombuffer(buf, dtype=dtype) if info.nbytes else torch.empty(0, dtype=dtype)
        t = t.reshape(shape).to(torch.float32)
        return out.copy_(t) if out is not None else t

    def _pread(self, key: str, info: TensorInfo, buf: memoryview, where: str) -> None:
        """The tensor's bytes into `buf` with pread, then out of the page cache unless it is kept."""
        fd, done = self._fds[info.file], 0
        while done < info.nbytes:
            n = os.preadv(fd, [buf[done:]], info.offset + done)
            if n <= 0:
                raise LocalmoeError(f"{where} is truncated at tensor {key}")
            done += n
        if _FADVISE and not self.keep_page_cache:
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)

    def release_mmaps(self) -> None:
        """Unmap the shards once the dense weights are copied out; experts are read with pread from then on."""
        self._handles.clear()
        self._mmaps.close()

    def drop_page_cache(self) -> None:
        """Forget the shards' pages (the dense weights now live in tensors): the page cache would otherwise keep a
        second copy of everything `get` read, which a memory-capped machine cannot spare."""
        if _FADVISE and not self.keep_page_cache:
            for fd in self._fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._stack.close()


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_FADVISE = hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED")


class DenseWeights(Mapping[str, Tensor]):
    """The model's dense weights by model.py's names, each read from the checkpoint (shape-checked against
    config.json) when it is asked for and not kept here: the model holds the only copy."""

    def __init__(self, ckpt: Checkpoint, args: ModelArgs) -> None:
        self.ckpt = ckpt
        self.keys_shapes = dense_tensors(args)

    def __getitem__(self, name: str) -> Tensor:
        key, shape = self.keys_shapes[name]
        return self.ckpt.get(key, shape)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor to find out
        return name in self.keys_shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_shapes)

    def __len__(self) -> int:
        return len(self.keys_shapes)


Where = tuple[str, tuple[int, ...]]  # a tensor's name in the checkpoint, and the shape config.json implies


def dense_tensors(args: ModelArgs) -> dict[str, Where]:
    """model.py's name -> where the checkpoint holds it, for every dense weight, in the order the model reads them."""
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    d = args.dim
    out: dict[str, Where] = {"tok_embeddings": ("model.embed_tokens.weight", (args.vocab_size, d))}
    for i in range(args.n_layers):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.{args.moe_block}."
        w: dict[str, Where] = {
            "q_proj": (f"{p}self_attn.q_proj.weight", (q_out, d)),
            "k_proj": (f"{p}self_attn.k_proj.weight", (kv_out, d)),
            "v_proj": (f"{p}self_attn.v_proj.weight", (kv_out, d)),
            "o_proj": (f"{p}self_attn.o_proj.weight", (d, q_out)),
            "input_layernorm": (f"{p}input_layernorm.weight", (d,)),
            "post_attention_layernorm": (f"{p}post_attention_layernorm.weight", (d,)),
            "router": (f"{m}gate.weight", (args.n_experts, d)),
        }
        if args.qk_norm:
            per_head = args.qk_norm == "head"
            w["q_norm"] = (f"{p}self_attn.q_norm.weight", (args.head_dim if per_head else q_out,))
            w["k_norm"] = (f"{p}self_attn.k_norm.weight", (args.head_dim if per_head else kv_out,))
        if args.qkv_bias:
            for name, size in (("q", q_out), ("k", kv_out), ("v", kv_out)):
                w[f"{name}_bias"] = (f"{p}self_attn.{name}_proj.bias", (size,))
        if args.shared_expert:
            w["shared_gate"] = (f"{m}shared_expert.gate_proj.weight", (args.shared_ff, d))
            w["shared_up"] = (f"{m}shared_expert.up_proj.weight", (args.shared_ff, d))
            w["shared_down"] = (f"{m}shared_expert.down_proj.weight", (d, args.shared_ff))
            w["shared_expert_gate"] = (f"{m}shared_expert_gate.weight", (1, d))
        out.update({f"layers.{i}.{name}": v for name, v in w.items()})
    out["norm"] = ("model.norm.weight", (d,))
    if not args.tie_embeddings:
        out["output"] = ("lm_head.weight", (args.vocab_size, d))
    return out


def expert_loader(ckpt: Checkpoint, args: ModelArgs) -> Loader:
    """(layer, expert) -> its (gate and up stacked, down) float32 matrices read from disk, and the bytes read."""
    prefix = [f"model.layers.{i}.{args.moe_block}.experts." for i in range(args.n_layers)]
    gate, up, down = args.expert_proj
    shapes = ((gate, (args.expert_ff, args.dim)), (up, (args.expert_ff, args.dim)), (down, (args.dim, args.expert_ff)))

    def load(layer: int, expert: int) -> tuple[tuple[Tensor, Tensor], int]:
        p = f"{prefix[layer]}{expert}."
        gate_up = torch.empty(2 * args.expert_ff, args.dim)  # gate and up stacked: one matmul for both
        down = torch.empty(args.dim, args.expert_ff)
        ckpt.read(f"{p}{shapes[0][0]}.weight", shapes[0][1], gate_up[: args.expert_ff])
        ckpt.read(f"{p}{shapes[1][0]}.weight", shapes[1][1], gate_up[args.expert_ff :])
        ckpt.read(f"{p}{shapes[2][0]}.weight", shapes[2][1], down)
        nbytes = sum(ckpt.tensors[f"{p}{name}.weight"].nbytes for name, _ in shapes)
        return (gate_up, down), nbytes

    return load
