"""8-bit weights for the torch engine on the CPU: per-output-row symmetric int8 (absmax / 127), as llama.cpp's q8_0
keeps a scale per block of a row, computed by torch's x86/fbgemm dynamic-quantised linear (activations quantised
per call to 8 bits too, as llama.cpp's q8_0 dot products do). On this kind of CPU that matmul reads a quarter of
float32's bytes and runs 2-6x faster; torch's weight-only int8 kernel is slower than float32 for one token.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import Tensor

from localmoe.engine.torch_moe.handles import Handles


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """int8 weights and one float32 scale per output row (symmetric, absmax / 127)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(torch.float32).contiguous()


class Int8Linear:
    """y = x · Wᵀ with W held as packed int8 (fbgemm/onednn/qnnpack, whichever torch's quantized engine is)."""

    __slots__ = ("packed", "out_features", "nbytes", "handle", "__weakref__")

    def __init__(self, w: Tensor) -> None:
        q, scale = quantize_rows(w.float())
        n = w.shape[0]
        with warnings.catch_warnings():
            # torch deprecates quantized tensors in favour of torchao (not a dependency here); when they go,
            # int8_linear_available() turns False and experts fall back to the weight-only kernel
            warnings.simplefilter("ignore", UserWarning)
            qt = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(n, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qt, None)
        self.out_features = n
        self.nbytes = q.numel() + 4 * n
        self.handle = _LINEARS.add(self)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # packed params are an object torch.compile cannot trace: an opaque op
            return torch.ops.localmoe.int8_linear(x, self.handle, self.out_features)
        return torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, _REDUCE_RANGE)


_LINEARS = Handles()


@torch.library.custom_op("localmoe::int8_linear", mutates_args=())
def _int8_linear(x: Tensor, handle: int, out_features: int) -> Tensor:
    return _LINEARS[handle](x)


@_int8_linear.register_fake
def _(x: Tensor, handle: int, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


# Full 8-bit activations halve the error, but AVX2's int8 dot product (vpmaddubsw) can saturate its int16 sums with
# them: only AVX-512 machines (VNNI-class kernels) get the full range; others use torch's safe 7-bit default.
_REDUCE_RANGE = torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX")


@cache
def int8_linear_available() -> bool:
    """Whether this torch build can pack and run a dynamic int8 linear here."""
    try:
        Int8Linear(torch.ones(2, 4))(torch.ones(1, 4))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True
