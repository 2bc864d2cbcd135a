"""How the torch engine runs a checkpoint: one `TorchOptions` value, checked once when it is made.

The engine takes it (or the same names as keyword arguments), `cache_stats()` reports it, and the CLI builds its
`--fast-memory`, `--cache-policy`, ... flags from the fields that carry help text. Imports no torch, so that the CLI
can build its parser without loading it.
"""

from __future__ import annotations

import re
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from localmoe.errors import LocalmoeError
from localmoe.placement.plan import EXPERT_DTYPE_BYTES

CACHE_POLICIES = ("lru", "lfu", "lfru", "fifo")  # expert_store.POLICIES
EXPERT_DTYPES = tuple(EXPERT_DTYPE_BYTES)
DENSE_DTYPES = ("float32", "int8")
KERNELS = ("native", "torch")
_DEVICE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A field with a command-line flag: `help`, and optionally `choices` or `type` ("bytes", "switch" for an
    on/off flag, "flag" for an on-only flag, or a callable such as float)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TorchOptions:
    expert_slots: int | None = None  # fast-tier experts per layer; default: from the plan's memory budget
    fast_memory: int | None = _option(
        None, "bytes for dense weights, KV cache and expert slots in the fast tier (e.g. 2GiB; default: detected "
        "free VRAM or RAM)", type="bytes")
    warm_memory: int | None = None  # bytes of pinned RAM for a GPU's warm tier; default: the free RAM
    cache_policy: str = _option("lru", "expert cache policy (default lru)", choices=CACHE_POLICIES)
    expert_dtype: str = _option("float32", "how cached experts are held and computed (default float32)",
                                choices=EXPERT_DTYPES)
    dense_dtype: str = _option(
        "float32", "int8: also quantise the attention projections and the output head (CPU; default float32)",
        choices=DENSE_DTYPES)
    device: str | None = _option(None, "cpu, cuda, cuda:N or mps (default: CUDA when present)")
    expert_top_p: float | None = _option(
        None, "adaptive expert count: per token the fewest top experts whose router probabilities reach this mass "
        "(at most the model's k)", type=float)
    # None: on the CPU when not all experts fit and the native decode step cannot run (there an exact prediction
    # saves reads; the native step, which does not prefetch, is faster still); off on a GPU, where it measured
    # slower even when right, and when every expert is resident
    prefetch: bool | None = _option(
        None, "prefetch the next layer's predicted experts in a background thread, per layer while its predictions "
        "are mostly right; decodes on the torch path (default: on the CPU when not all experts fit in memory and "
        "the native kernels are off)", type="switch")
    # None: when every expert fits (then the native decode step takes over once they are in); with a partial cache
    # it would only fill slots that the first answers fill anyway
    load_all: bool | None = _option(
        None, "read the experts into memory in a background thread at load, so answering starts at once and is "
        "fast once they are in (default: when they all fit)", type="switch")
    compile: bool = _option(
        False, "torch.compile the dense part of each layer: faster decoding after a one-off compile of tens of "
        "seconds (needs a C++ compiler on the CPU)", type="flag")
    kernels: str = _option(
        "native", "native: the engine's own C kernels for float32 on the CPU, where they build (default; "
        "LOCALMOE_KERNELS=torch turns them off too); torch: torch's kernels only", choices=KERNELS)
    # A GGUF's GPU path, on whatever device (no flag: the tests force it on the CPU, which has no GPU): experts kept
    # as the file's bytes in the fast tier and dequantised by torch where used (torch_dequant.py) to float32, or
    # bfloat16 with expert_dtype bfloat16, dense weights dequantised once to float32, no native kernels. On a GPU a
    # GGUF always runs this way; False on the CPU: the native packed kernels.
    device_packed: bool = False

    def __post_init__(self) -> None:
        if self.expert_slots is not None and self.expert_slots < 1:
            raise LocalmoeError(f"expert_slots must be at least 1, got {self.expert_slots}")
        if self.cache_policy not in CACHE_POLICIES:
            raise LocalmoeError(f"unknown expert cache policy {self.cache_policy!r} "
                                f"(known: {', '.join(CACHE_POLICIES)})")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise LocalmoeError(f"unknown expert dtype {self.expert_dtype!r} (known: {', '.join(EXPERT_DTYPES)})")
        if self.dense_dtype not in DENSE_DTYPES:
            raise LocalmoeError(f"unknown dense dtype {self.dense_dtype!r} (float32 or int8)")
        if self.device is not None and not _DEVICE.fullmatch(self.device):
            raise LocalmoeError(f"unsupported device {self.device!r} (cpu, cuda, cuda:N or mps)")
        if self.expert_top_p is not None and not 0 < self.expert_top_p <= 1:
            raise LocalmoeError(f"expert_top_p must be in (0, 1], got {self.expert_top_p}")
        if self.kernels not in KERNELS:
            raise LocalmoeError(f"unknown kernels {self.kernels!r} (native or torch)")

    @staticmethod
    def flags() -> list[Field[Any]]:
        """The fields that are command-line flags, in the order `--help` lists them."""
        return [f for f in fields(TorchOptions) if "help" in f.metadata]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
