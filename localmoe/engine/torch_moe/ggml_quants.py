"""GGUF (ggml) quantised weights for the torch engine: block layouts, exact dequantisation, and thin wrappers over the
native kernels that compute with experts kept quantised (quant_kernels.c, built into the same library as
moe_kernels.c; see kernels.py).

Quantised experts are kept as the raw bytes of their GGUF tensors (uint8 tensors, rows contiguous): an expert's
gate and up rows then its down rows, each row `row_bytes(type, k)` bytes. `dequantize` gives float32 weights equal
bit for bit to `gguf.quants.dequantize` (llama.cpp's dequantisation). `qgemv` and `moe_decode` quantise the
activations to 8 bits per block of 32 and use integer dot products, as llama.cpp does (`set_activations("int8")`,
the default: twice as fast on K-quants), or compute with float32 activations (`set_activations("float")`: the
dequantised matrices' products up to float summation order). Without the native library every function here falls
back to gguf's numpy dequantisation and torch (float32).
"""
from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from torch import Tensor

from localmoe.engine.torch_moe import kernels
from localmoe.errors import LocalmoeError

# ggml type id -> (elements, bytes) of one block; the types quant_kernels.c computes with
BLOCK: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    39: (32, 17),  # MXFP4
}


def type_name(qtype: int) -> str:
    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"ggml type {qtype}"


def supported(qtype: int) -> bool:
    return qtype in BLOCK


def row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of k elements of `qtype`."""
    if qtype not in BLOCK:
        raise LocalmoeError(f"{type_name(qtype)} weights are not supported by the native engine "
                            f"(supported: {', '.join(type_name(t) for t in BLOCK)})")
    elements, size = BLOCK[qtype]
    if k <= 0 or k % elements:
        raise LocalmoeError(f"{type_name(qtype)} rows of {k} elements: not a multiple of its block of {elements}")
    return k // elements * size


def _raw(raw: Tensor, nbytes: int, what: str) -> Tensor:
    if raw.dtype != torch.uint8 or raw.device.type != "cpu":
        raise LocalmoeError(f"{what}: expected raw uint8 bytes on the CPU, got {raw.dtype} on {raw.device}")
    if raw.numel() != nbytes:
        raise LocalmoeError(f"{what}: {raw.numel()} bytes, expected {nbytes}")
    return raw.contiguous()


def _f32(t: Tensor) -> Tensor:
    return t.to(device="cpu", dtype=torch.float32).contiguous()


ACTIVATIONS = ("int8", "float")


def set_activations(mode: str) -> str:
    """Which activations the native packed kernels use from now on, process-wide: "int8" (x quantised to 8 bits per
    block of 32, integer dot products: llama.cpp's way and speed) or "float" (float32 x: the exact products of the
    dequantised weights up to summation order). Returns the mode before; without the library, "float" (the fallback
    is always exact)."""
    if mode not in ACTIVATIONS:
        raise LocalmoeError(f"activations {mode!r}: expected one of {', '.join(ACTIVATIONS)}")
    lib = kernels.library()
    if lib is None:
        return "float"
    return "int8" if lib.lm_qset_activations(int(mode == "int8")) else "float"


def activations() -> str:
    lib = kernels.library()
    return "int8" if lib is not None and lib.lm_qset_activations(-1) else "float"


def quantises_activations(qtype: int) -> bool:
    """Whether the native kernels quantise x to 8 bits for weights of `qtype` under the current mode (only the types
    with an integer kernel on this CPU do; the others always compute with float32 x)."""
    lib = kernels.library()
    return lib is not None and bool(lib.lm_qact_int8(qtype))


def dequantize(qtype: int, raw: Tensor, shape: Sequence[int]) -> Tensor:
    """The float32 tensor of `shape` (its last dimension a row) that `raw` (uint8) holds in `qtype`."""
    shape = tuple(int(s) for s in shape)
    rows = math.prod(shape[:-1])
    rb = row_bytes(qtype, shape[-1])
    raw = _raw(raw, rows * rb, f"{type_name(qtype)} tensor {list(shape)}")
    lib = kernels.library()
    if lib is not None:
        out = torch.empty(shape, dtype=torch.float32)
        lib.lm_dequant(qtype, raw.data_ptr(), out.data_ptr(), rows * shape[-1])
        return out
    data = gguf_dequantize(raw.numpy().reshape(rows, rb), GGMLQuantizationType(qtype))
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(shape)


def qgemv(qtype: int, raw: Tensor, x: Tensor, n: int, k: int, bias: Tensor | None = None,
          threads: int | None = None) -> Tensor:
    """y (n,) = W · x (+ bias) for W the n × k matrix of `qtype` held in `raw`; x: k floats."""
    raw = _raw(raw, n * row_bytes(qtype, k), f"{type_name(qtype)} matrix {n}×{k}")
    x = _f32(x).reshape(-1)
    if x.numel() != k:
        raise LocalmoeError(f"qgemv: x has {x.numel()} elements, the matrix {k} columns")
    if bias is not None:
        bias = _f32(bias).reshape(-1)
    lib = kernels.library()
    if lib is None:
        y = dequantize(qtype, raw, (n, k)) @ x
        return y + bias if bias is not None else y
    y = torch.empty(n, dtype=torch.float32)
    lib.lm_qgemv(qtype, raw.data_ptr(), x.data_ptr(), bias.data_ptr() if bias is not None else None, y.data_ptr(),
                 n, k, threads or torch.get_num_threads())
    return y


def moe_decode(gu_type: int, down_type: int, x: Tensor, experts: Sequence[tuple[Tensor, Tensor]],
               scales: Sequence[float], out: Tensor, threads: int | None = None) -> None:
    """out += Σ scale × down · (silu(gate · x) × (up · x)) over packed `experts` for one token.

    x, out: (1, hidden) or (hidden,) float32, contiguous, on the CPU (out is added to in place); each expert is
    (gate and up: 2f rows of `gu_type`, down: hidden rows of f elements of `down_type`) as raw uint8 bytes."""
    if not experts:
        return
    k = x.shape[-1]
    gu_row = row_bytes(gu_type, k)
    f = experts[0][0].numel() // (2 * gu_row)
    down_row = row_bytes(down_type, f)
    packed = [(_raw(gu, 2 * f * gu_row, f"expert {i} gate_up"), _raw(d, k * down_row, f"expert {i} down"))
              for i, (gu, d) in enumerate(experts)]
    if len(scales) != len(packed):
        raise LocalmoeError(f"moe_decode: {len(packed)} experts, {len(scales)} scales")
    if not (out.dtype == torch.float32 and out.is_contiguous() and out.numel() == k and out.device.type == "cpu"):
        raise LocalmoeError("moe_decode: out must be a contiguous float32 CPU tensor of the hidden size")
    xf = _f32(x).reshape(-1)
    lib = kernels.library()
    if lib is None:
        acc = torch.zeros(k, dtype=torch.float32)
        for (gu, d), s in zip(packed, scales, strict=True):
            gate, up = (dequantize(gu_type, gu, (2 * f, k)) @ xf).chunk(2)
            acc += s * (dequantize(down_type, d, (k, f)) @ (F.silu(gate) * up))
        out.view(-1).add_(acc)
        return
    n = len(packed)
    gate_up = (ctypes.c_void_p * n)(*(gu.data_ptr() for gu, _ in packed))
    down = (ctypes.c_void_p * n)(*(d.data_ptr() for _, d in packed))
    scale = (ctypes.c_float * n)(*scales)
    h = torch.empty(n * f, dtype=torch.float32)
    lib.lm_moe_decode_q(n, gu_type, down_type, gate_up, down, scale, xf.data_ptr(), out.data_ptr(), h.data_ptr(),
                        k, f, threads or torch.get_num_threads())
