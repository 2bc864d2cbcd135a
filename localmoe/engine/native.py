"""The engine's own CPU kernel for one-token MoE layers (gemv.c), built at first use with the system C compiler.

A decode step's experts are a handful of matrix-vector products of a few MB each; torch runs each as its own call
(a gemm path for one row, a parallel region per call) and reaches ~18 GB/s on them here, against ~22 GB/s for a
plain sum over memory. `lm_moe_decode_f32` runs all of a layer's chosen experts in one parallel region with one
barrier. Everything else stays with torch: for the attention and output matrices torch's kernels are as fast.

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
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from localmoe.errors import LocalmoeError
from localmoe.paths import data_dir

SOURCE = Path(__file__).with_name("gemv.c")
ENV = "LOCALMOE_KERNELS"  # "torch": never build or use the native kernel
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_P = ctypes.c_void_p


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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([cc, *_FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    out_dir = data_dir() / "kernels"
    out = out_dir / f"gemv-{key}.so"
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


def available() -> bool:
    return _library()[0] is not None


def kernels() -> str:
    """What computes one-token float32 experts: "native", or "torch (why)"."""
    return _library()[1]


def moe_decode(x: Tensor, experts: list[tuple[Tensor, Tensor]], scales: list[float], out: Tensor) -> None:
    """out += Σ scale × down · (silu(gate · x) × (up · x)) over `experts` for one token.

    x, out: (1, hidden) float32; each expert is (gate and up stacked (2f, hidden), down (hidden, f)), float32,
    contiguous, on the CPU. The caller checks `usable`."""
    lib = _library()[0]
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
