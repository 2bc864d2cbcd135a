"""The torch engine's native CPU kernels (moe_kernels.c): built at first use with the system C compiler, loaded with
ctypes, and the one-token MoE layer kernel.

A decode step's experts are a handful of matrix-vector products of a few MB each; torch runs each as its own call
(a gemm path for one row, a parallel region per call) and reaches ~18 GB/s on them here, against ~22 GB/s for a
plain sum over memory. `lm_moe_decode_f32` runs all of a layer's chosen experts in one parallel region with one
barrier. `lm_step_f32` runs a whole one-token step in C when every expert is resident (step.DecodeStep): there the
Python between the kernels, not the kernels, was the gap to llama.cpp. Its configuration is a C struct mirrored here
by `StepConfig`, whose size is checked against the library's when it loads.

The library is compiled for this CPU (`-march=native`) into the data directory, keyed by the source, the flags and
the CPU, and loaded with ctypes after torch, so that its OpenMP runtime is the one torch already runs. Without a C
compiler or OpenMP, or with `LOCALMOE_KERNELS=torch`, `available()` is False and the engine uses torch alone; the
answer is the same either way up to float rounding.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from localmoe.engine.torch_moe.config import ModelArgs
from localmoe.errors import LocalmoeError
from localmoe.home.paths import data_dir

SOURCE = Path(__file__).with_name("moe_kernels.c")
QUANT_SOURCE = SOURCE.with_name("quant_kernels.c")  # #included by SOURCE: part of the build key
ENV = "LOCALMOE_KERNELS"  # "torch": never build or use the native kernel
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P = ctypes.c_void_p


QK_NORM = {None: 0, "head": 1, "full": 2}  # ModelArgs.qk_norm as StepConfig.qk_norm
# lm_resolve_fn: (layer, its chosen experts, how many) -> 0 once their addresses are in the table
RESOLVE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.c_int)


class StepConfig(ctypes.Structure):
    """`lm_step_config` of moe_kernels.c, field for field: the model's shape and switches for `lm_step_f32`."""

    _fields_ = [(name, ctypes.c_int) for name in (
        "dim", "n_heads", "n_kv_heads", "head_dim", "n_experts", "top_k", "expert_ff", "vocab_size",
        "max_seq_length", "n_layers", "qk_norm", "renormalise", "threads")] + [
        ("eps", ctypes.c_float), ("clip", ctypes.c_float), ("top_p", ctypes.c_float),
        ("gu_types", _P), ("down_types", _P),  # per-layer ggml types of packed experts; None: float32
        ("dense_types", _P), ("head_type", ctypes.c_int),  # packed dense matrices' types (q, k, v, o per layer)
        ("forced", _P),  # a benchmark's replayed experts per layer (n_layers x top_k); None: the routers choose
        ("shared_ff", ctypes.c_int)]

    @classmethod
    def from_args(cls, a: ModelArgs) -> StepConfig:
        return cls(dim=a.dim, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim, n_experts=a.n_experts,
                   top_k=a.top_k, expert_ff=a.expert_ff, vocab_size=a.vocab_size, max_seq_length=a.max_seq_length,
                   n_layers=a.n_layers, qk_norm=QK_NORM[a.qk_norm], renormalise=int(a.renormalise), threads=1,
                   eps=a.norm_eps, clip=a.clip_qkv or 0.0, top_p=0.0, shared_ff=a.shared_ff)


@cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "native") or (None, why not)."""
    if os.environ.get(ENV, "").lower() == "torch":
        return None, f"torch ({ENV}=torch)"
    if sys.platform != "linux":  # the OpenMP check below reads /proc; elsewhere stay with torch's kernels
        return None, "torch (native kernel: Linux only)"
    if "OpenMP" not in torch.__config__.parallel_info():
        return None, "torch (native kernel: this torch build does not use OpenMP)"
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, LocalmoeError, subprocess.SubprocessError) as e:
        return None, f"torch (native kernel not built: {str(e).splitlines()[0][:160]})"
    if len(_mapped("gomp")) > 1:  # our library brought a second OpenMP runtime: two thread pools on the same cores
        return None, "torch (native kernel: a second OpenMP runtime would load)"
    lib.lm_moe_decode_f32.argtypes = [ctypes.c_int, _P, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.lm_moe_decode_f32.restype = None
    lib.lm_step_config_size.argtypes = []
    lib.lm_step_config_size.restype = ctypes.c_size_t
    c_size, py_size = lib.lm_step_config_size(), ctypes.sizeof(StepConfig)
    if c_size != py_size:  # the source and its mirror here disagree: the step would read the wrong fields
        return None, f"torch (native kernel: lm_step_config is {c_size} bytes in C, StepConfig {py_size})"
    lib.lm_step_f32.argtypes = [ctypes.POINTER(StepConfig), _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int, _P, _P, _P,
                                RESOLVE]
    lib.lm_step_f32.restype = ctypes.c_int
    i = ctypes.c_int
    lib.lm_qtype_supported.argtypes = [i]
    lib.lm_qtype_supported.restype = i
    lib.lm_dequant.argtypes = [i, _P, _P, ctypes.c_long]
    lib.lm_dequant.restype = None
    lib.lm_qgemv.argtypes = [i, _P, _P, _P, _P, i, i, i]
    lib.lm_qgemv.restype = None
    lib.lm_moe_decode_q.argtypes = [i, i, i, _P, _P, _P, _P, _P, _P, i, i, i]
    lib.lm_moe_decode_q.restype = None
    lib.lm_qset_activations.argtypes = [i]
    lib.lm_qset_activations.restype = i
    lib.lm_qact_int8.argtypes = [i]
    lib.lm_qact_int8.restype = i
    return lib, "native"


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _build() -> Path:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise LocalmoeError(f"no C compiler ({cc})")
    source = SOURCE.read_bytes() + QUANT_SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    out_dir = data_dir() / "kernels"
    out = out_dir / f"moe_kernels-{key}.so"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    # compiled under a temporary name and renamed: a concurrent process never loads a half-written library
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *_FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise LocalmoeError((done.stderr.strip() or f"{cc} exited with {done.returncode}").splitlines()[0])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _mapped(name: str) -> set[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    return {os.path.realpath(line.split()[-1]) for line in lines if name in line.rsplit("/", 1)[-1]}


def library() -> ctypes.CDLL | None:
    """The loaded library, or None where torch's kernels run instead (`kernels()` says why)."""
    return _library()[0]


def available() -> bool:
    return library() is not None


def kernels() -> str:
    """What computes one-token float32 experts: "native", or "torch (why)"."""
    return _library()[1]


def moe_decode(x: Tensor, experts: list[tuple[Tensor, Tensor]], scales: list[float], out: Tensor) -> None:
    """out += Σ scale × down · (silu(gate · x) × (up · x)) over `experts` for one token.

    x, out: (1, hidden) float32; each expert is (gate and up stacked (2f, hidden), down (hidden, f)), float32,
    contiguous, on the CPU. The caller checks `usable`."""
    lib = library()
    assert lib is not None
    n = len(experts)
    f = experts[0][1].shape[1]
    gate_up = (_P * n)(*(gu.data_ptr() for gu, _ in experts))
    down = (_P * n)(*(d.data_ptr() for _, d in experts))
    scale = (ctypes.c_float * n)(*scales)
    h = torch.empty(n * f, dtype=torch.float32)
    lib.lm_moe_decode_f32(n, gate_up, down, scale, x.data_ptr(), out.data_ptr(), h.data_ptr(), x.shape[-1], f,
                          torch.get_num_threads())


def usable(x: Tensor, mats: tuple[Tensor, ...]) -> bool:
    """Whether `moe_decode` can take this token and this expert's (gate_up, down)."""
    gu, down = mats
    return (isinstance(gu, Tensor) and gu.dtype == torch.float32 and down.dtype == torch.float32
            and gu.device.type == "cpu" and gu.is_contiguous() and down.is_contiguous()
            and gu.shape[0] == 2 * down.shape[1] and gu.shape[1] == down.shape[0] == x.shape[-1])


# --- prompt processing (prefill): many tokens through the same weights ---------------------------------------------

_scratch = threading.local()  # per thread: two engines may prefill at once, each on its own thread


def _prefill_library() -> ctypes.CDLL | None:
    """The library with the prefill kernels' signatures declared (once per loaded library), or None."""
    lib = library()
    if lib is not None and not getattr(lib, "_lm_prefill", False):
        i = ctypes.c_int
        lib.lm_prefill_scratch.argtypes = [i, i, i]
        lib.lm_prefill_scratch.restype = ctypes.c_size_t
        lib.lm_linear_f32.argtypes = [_P, _P, _P, _P, i, i, i, i, _P, i]
        lib.lm_linear_f32.restype = None
        lib.lm_expert_prefill_f32.argtypes = [_P, _P, _P, _P, _P, i, _P, i, i, _P, i]
        lib.lm_expert_prefill_f32.restype = None
        lib._lm_prefill = True
    return lib


_SCRATCH_KEPT = 1 << 22  # floats (16 MiB): a long prompt's larger buffer is not held after its call


def _scratch_for(lib: ctypes.CDLL, m: int, k: int, f: int) -> Tensor:
    """The kernels' packed panels, reused between calls (a new one page-faults afresh) up to _SCRATCH_KEPT."""
    n = lib.lm_prefill_scratch(m, k, f)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=torch.float32)
        if n <= _SCRATCH_KEPT:
            _scratch.buf = buf
    return buf


def _cpu_f32(t: object) -> bool:
    return isinstance(t, Tensor) and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()


def linear_usable(x: Tensor, w: object, bias: Tensor | None = None) -> bool:
    """Whether `linear` can take activations x (..., k) and weights w (n, k)."""
    return (_prefill_library() is not None and _cpu_f32(x) and _cpu_f32(w) and w.dim() == 2  # type: ignore[union-attr]
            and x.shape[-1] == w.shape[1] and (bias is None or _cpu_f32(bias)))  # type: ignore[union-attr]


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., k) · wᵀ (+ bias), as F.linear, for several rows of x at once. The caller checks `linear_usable`."""
    lib = _prefill_library()
    assert lib is not None
    n, k = w.shape
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    y = torch.empty(*x.shape[:-1], n, dtype=torch.float32)
    if m:
        scratch = _scratch_for(lib, m, k, 0)  # held here until the call returns
        lib.lm_linear_f32(w.data_ptr(), bias.data_ptr() if bias is not None else None, rows.data_ptr(), y.data_ptr(),
                          m, n, k, n, scratch.data_ptr(), torch.get_num_threads())
    return y


def expert_usable(x: Tensor, mats: tuple[object, ...]) -> bool:
    """Whether `expert_prefill` can take activations x (tokens, hidden) and this expert's (gate_up, down)."""
    gu, down = mats
    return (_prefill_library() is not None and _cpu_f32(x) and x.dim() == 2 and _cpu_f32(gu) and _cpu_f32(down)
            and gu.shape[0] == 2 * down.shape[1] and gu.shape[1] == down.shape[0] == x.shape[1])  # type: ignore


def expert_prefill(x: Tensor, mats: tuple[Tensor, Tensor], tokens: Tensor, scales: Tensor, out: Tensor) -> None:
    """out[tokens[i]] += scales[i] × down · (silu(gate · x[tokens[i]]) × (up · x[tokens[i]])) for one expert.

    x, out: (tokens, hidden) float32 on the CPU, contiguous; tokens: int32 row numbers, no repeats; scales: float32,
    as many. The caller checks `expert_usable`."""
    lib = _prefill_library()
    assert lib is not None
    gu, down = mats
    m, (k, f) = tokens.numel(), down.shape
    if not m:
        return
    tokens, scales = tokens.to(torch.int32).contiguous(), scales.to(torch.float32).contiguous()
    scratch = _scratch_for(lib, m, k, f)  # held here until the call returns
    lib.lm_expert_prefill_f32(gu.data_ptr(), down.data_ptr(), x.data_ptr(), tokens.data_ptr(), scales.data_ptr(), m,
                              out.data_ptr(), k, f, scratch.data_ptr(), torch.get_num_threads())
