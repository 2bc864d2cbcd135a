"""GGUF (ggml) blocks dequantised by torch tensor ops, on whatever device the bytes are: the GPU path's experts.

On a GPU the native engine keeps a GGUF's experts as the file's bytes (uint8 tensors in VRAM, as ggml_quants lays
them out) and dequantises an expert where it is used, then runs the ordinary float matmul. Every function here is a
handful of whole-tensor ops (views, shifts, masks, gathers, one or two float multiplies): no loop over blocks, no
native code, so the same code runs on CUDA, MPS and the CPU (where the tests prove it). The float arithmetic is
gguf's (= llama.cpp's) in the same order, product by product, so the values are bit for bit `gguf.quants.dequantize`
(no fused multiply-add: each product and sum is its own op).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from localmoe.errors import LocalmoeError

QK_K = 256


def _f16(blocks: Tensor, offset: int) -> Tensor:
    """(n, 1) float32 from the little-endian float16 at `offset` of each block (copied out first: a view of the
    block bytes as float16 needs an even offset and stride, which a slice of a packed row need not have)."""
    field = torch.empty((blocks.shape[0], 2), dtype=torch.uint8, device=blocks.device)
    field.copy_(blocks[:, offset:offset + 2])
    return field.view(torch.float16).to(torch.float32)


def _shifts(values: Sequence[int], device: torch.device) -> Tensor:
    return _constant(tuple(values), torch.uint8, device)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once per device (not a host-to-device copy at every expert's use)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _nibbles(qs: Tensor, group: int) -> Tensor:
    """(n, bytes) -> (n, groups, 2, group): each run of `group` bytes as its low nibbles, then its high ones (the
    ggml order of the 4-bit types: element j of a run from byte j's low bits, element group + j from its high)."""
    n = qs.shape[0]
    s = _shifts([0, 4], qs.device).reshape(1, 1, 2, 1)
    return (qs.reshape(n, -1, 1, group) >> s) & 0x0F


def _high_bits(qh: Tensor) -> Tensor:
    """(n, 4) bytes of a little-endian uint32 -> (n, 32): bit i of it, i = 0..31 (Q5_0 and Q5_1's fifth bits)."""
    n = qh.shape[0]
    s = _shifts(range(8), qh.device).reshape(1, 1, 8)
    return ((qh.reshape(n, 4, 1) >> s) & 1).reshape(n, 32)


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 16).reshape(b.shape[0], 32).to(torch.int16) - 8
    return d * q.to(torch.float32)


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 16).reshape(b.shape[0], 32).to(torch.float32)
    return d * q + m


def _q5_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    ql = _nibbles(b[:, 6:], 16).reshape(b.shape[0], 32)
    q = (ql | (_high_bits(b[:, 2:6]) << 4)).to(torch.int16) - 16
    return d * q.to(torch.float32)


def _q5_1(b: Tensor) -> Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    ql = _nibbles(b[:, 8:], 16).reshape(b.shape[0], 32)
    q = (ql | (_high_bits(b[:, 4:8]) << 4)).to(torch.float32)
    return d * q + m


def _q8_0(b: Tensor) -> Tensor:
    d = _f16(b, 0)
    q = torch.empty((b.shape[0], 32), dtype=torch.uint8, device=b.device)
    q.copy_(b[:, 2:])
    return d * q.view(torch.int8).to(torch.float32)


def _scale_min_k4(scales: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K and Q5_K's 12 bytes of 6-bit sub-block scales and mins -> (n, 8) each, as float32."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _q4_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    scale = (d * sc).reshape(n, 8, 1)
    minus = (dmin * mn).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).to(torch.float32)
    return (scale * q - minus).reshape(n, QK_K)


def _q5_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _scale_min_k4(b[:, 4:16])
    scale = (d * sc).reshape(n, 8, 1)
    minus = (dmin * mn).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    # the fifth bit of element j of sub-block i: bit i of high byte j
    qh = (b[:, 16:48].reshape(n, 1, 32) >> _shifts(range(8), b.device).reshape(1, 8, 1)) & 1
    q = (ql | (qh << 4)).to(torch.float32)
    return (scale * q - minus).reshape(n, QK_K)


def _q6_k(b: Tensor) -> Tensor:
    n = b.shape[0]
    ql = _nibbles(b[:, :128], 64).reshape(n, 8, 32)  # per 128 elements: 64 bytes' low nibbles, then high ones
    qh = (b[:, 128:192].reshape(n, 2, 1, 32) >> _shifts([0, 2, 4, 6], b.device).reshape(1, 1, 4, 1)) & 3
    q = (ql | (qh.reshape(n, 8, 32) << 4)).to(torch.int16) - 32
    scales = torch.empty((n, 16), dtype=torch.uint8, device=b.device)
    scales.copy_(b[:, 192:208])
    scale = (_f16(b, 208) * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    return (scale * q.reshape(n, 16, 16).to(torch.float32)).reshape(n, QK_K)


_E2M1 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # MXFP4's values, doubled


def _mxfp4(b: Tensor) -> Tensor:
    n = b.shape[0]
    e = b[:, :1].to(torch.int32)
    # ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 bits, subnormal for e < 2
    bits = torch.where(e < 2, torch.bitwise_left_shift(torch.full_like(e, 0x00200000), e), (e - 1) << 23)
    d = bits.view(torch.float32)
    table = _constant(_E2M1, torch.float32, b.device)
    q = table[_nibbles(b[:, 1:], 16).reshape(n, 32).to(torch.int64)]
    return d * q


def _f32(b: Tensor) -> Tensor:
    out = torch.empty(b.shape, dtype=torch.uint8, device=b.device)
    out.copy_(b)
    return out.view(torch.float32)


def _f16_type(b: Tensor) -> Tensor:
    return _f16(b, 0)


# ggml type id -> (elements, bytes) of one block, and its dequantiser of (n_blocks, bytes) -> (n_blocks, elements)
DEQUANT: dict[int, tuple[int, int, Callable[[Tensor], Tensor]]] = {
    0: (1, 4, _f32),  # F32
    1: (1, 2, _f16_type),  # F16
    2: (32, 18, _q4_0),  # Q4_0
    3: (32, 20, _q4_1),  # Q4_1
    6: (32, 22, _q5_0),  # Q5_0
    7: (32, 24, _q5_1),  # Q5_1
    8: (32, 34, _q8_0),  # Q8_0
    12: (QK_K, 144, _q4_k),  # Q4_K
    13: (QK_K, 176, _q5_k),  # Q5_K
    14: (QK_K, 210, _q6_k),  # Q6_K
    39: (32, 17, _mxfp4),  # MXFP4
}


def _name(qtype: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"ggml type {qtype}"


def supported(qtype: int) -> bool:
    return qtype in DEQUANT


def dequantize(qtype: int, raw: Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The tensor of `shape` (its last dimension a row of whole blocks) that `raw` (uint8 bytes as the file stores
    them, on any device) holds in ggml type `qtype`, as `dtype` on raw's device: float32 bit for bit as
    `gguf.quants.dequantize`, other dtypes rounded from it."""
    if qtype not in DEQUANT:
        known = ", ".join(_name(t) for t in DEQUANT)
        raise LocalmoeError(f"{_name(qtype)} weights cannot be dequantised on the device (it reads {known})")
    shape = tuple(int(s) for s in shape)
    elements, size, fn = DEQUANT[qtype]
    if not shape or shape[-1] <= 0 or shape[-1] % elements:
        raise LocalmoeError(f"{_name(qtype)} rows of {shape[-1] if shape else 0} elements: not a multiple of its "
                            f"block of {elements}")
    n_blocks = math.prod(shape) // elements
    if raw.dtype != torch.uint8 or raw.numel() != n_blocks * size:
        raise LocalmoeError(f"{_name(qtype)} tensor {list(shape)}: expected {n_blocks * size} uint8 bytes, got "
                            f"{raw.numel()} {raw.dtype}")
    out = fn(raw.reshape(n_blocks, size))
    return out.reshape(shape).to(dtype)
