"""Dense matrices kept as a GGUF stores them (Q4_K, Q6_K, Q8_0, ...): `PackedLinear`.

Dequantised to float32, a Qwen3-30B-A3B's attention, embeddings and output head are 6 GB, read whole every token:
four times the bytes llama.cpp reads for them, and more than a 4-8 GB laptop budget leaves for the expert cache.
Packed, one token reads the file's bytes (ggml_quants.qgemv, or the native decode step directly); a prompt's several
tokens get a float32 copy of one matrix at a time, made for the call and dropped after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import localmoe.engine.torch_moe.kernels as kernels
from localmoe.engine.torch_moe import ggml_quants

Part = tuple[int, Tensor, int]  # (ggml type, the rows' bytes as uint8, how many rows)
CHUNK_BYTES = 32 << 20  # the float32 rows a prompt's matmul dequantises at a time


class PackedLinear:
    """y = x · Wᵀ for W (out × k) held as one or more row blocks, each in its own ggml type (q, k and v stacked
    into one projection keep their own types)."""

    __slots__ = ("parts", "k", "out_features", "nbytes")

    def __init__(self, parts: list[Part], k: int) -> None:
        self.parts, self.k = parts, k
        self.out_features = sum(rows for _, _, rows in parts)
        self.nbytes = sum(raw.numel() for _, raw, _ in parts)

    @classmethod
    def stack(cls, mats: list[PackedLinear]) -> PackedLinear:
        return cls([p for m in mats for p in m.parts], mats[0].k)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.k

    @property
    def device(self) -> torch.device:
        return self.parts[0][1].device

    def dequantize(self) -> Tensor:
        """The whole matrix as float32 (out × k)."""
        return torch.cat([ggml_quants.dequantize(t, raw, (rows, self.k)) for t, raw, rows in self.parts])

    def rows(self, ids: Tensor) -> Tensor:
        """Rows `ids` as float32 (an embedding lookup: only those rows are dequantised)."""
        flat = ids.reshape(-1).tolist()
        out = torch.empty(len(flat), self.k)
        for i, r in enumerate(flat):
            t, raw, start = self._part_of(r)
            rb = ggml_quants.row_bytes(t, self.k)
            out[i] = ggml_quants.dequantize(t, raw[(r - start) * rb:(r - start + 1) * rb], (1, self.k))[0]
        return out.reshape(*ids.shape, self.k)

    def _part_of(self, row: int) -> tuple[int, Tensor, int]:
        start = 0
        for t, raw, rows in self.parts:
            if row < start + rows:
                return t, raw, start
            start += rows
        raise IndexError(f"row {row} of a {self.out_features}-row matrix")

    def __call__(self, x: Tensor, bias: Tensor | None = None, native: bool = False) -> Tensor:
        rows = x.reshape(-1, self.k)
        if rows.shape[0] == 1 and x.device.type == "cpu":  # one token: on the packed bytes
            xr = rows[0].contiguous()
            y = torch.cat([ggml_quants.qgemv(t, raw, xr, n, self.k) for t, raw, n in self.parts])
            if bias is not None:
                y = y + bias
            return y.reshape(*x.shape[:-1], self.out_features)
        # several tokens: a float32 copy of at most CHUNK_BYTES of rows at a time, so an output head of 150k rows
        # (1.2 GB as float32) costs a prompt 32 MB of transient memory, not the whole matrix under a memory cap
        out = torch.empty(*x.shape[:-1], self.out_features)
        flat, lo = out.view(-1, self.out_features), 0
        for t, raw, n in self.parts:
            rb, step = ggml_quants.row_bytes(t, self.k), max(1, CHUNK_BYTES // (4 * self.k))
            for r in range(0, n, step):
                m = min(step, n - r)
                w = ggml_quants.dequantize(t, raw[r * rb:(r + m) * rb], (m, self.k))
                b = bias[lo + r:lo + r + m] if bias is not None else None
                use_native = native and kernels.linear_usable(rows, w, b)
                flat[:, lo + r:lo + r + m] = kernels.linear(rows, w, b) if use_native else F.linear(rows, w, b)
            lo += n
        return out
