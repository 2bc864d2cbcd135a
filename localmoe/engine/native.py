"""The engine's own CPU kernel for one-token MoE layers (gemv.c), built at first use with the system C compiler.

A decode step's experts are a handful of matrix-vector products of a few MB each; torch runs each as its own call
(a gemm path for one row, a parallel region per call) and reaches ~18 GB/s on them here, against ~22 GB/s for a
plain sum over memory. `lm_moe_decode_f32` runs all of a layer's chosen experts in one parallel region with one
barrier. `DecodeStep` runs a whole one-token step in C when every expert is resident (`lm_step_f32`): there the
Python between the kernels, not the kernels, was the gap to llama.cpp.

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
    lib.lm_step_f32.argtypes = [_P, ctypes.c_float, ctypes.c_float, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int,
                                _P, _P, _P]
    lib.lm_step_f32.restype = None
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


_QK_NORM = {None: 0, "head": 1, "full": 2}
_MAX_TOP_K = 64  # lm_step_f32's per-layer arrays
_CFG_THREADS = 12  # index of the thread count in lm_step_f32's int config (C_THREADS)


class DecodeStep:
    """One-token decode of a whole model in one native call (`lm_step_f32`), for a float32 model on the CPU whose
    experts are all resident in its store. Built from the torch model's own tensors (weights, KV cache, RoPE
    tables), used in place: the torch path and this one can alternate on the same sequence.

    `decode_step` returns None where the step does not apply (see `why_not`); the experts' addresses are read
    once, so the engine uses it only while no expert can move (every slot of every layer filled, none evictable)."""

    def __init__(self, lib: ctypes.CDLL, model: torch.nn.Module, experts: list[list[tuple[Tensor, Tensor]]]) -> None:
        a = model.args
        self._lib, self._model, self.top_k, self.n_layers = lib, model, a.top_k, a.n_layers
        self._keep = experts  # the addresses below point into these

        def ptr(t: Tensor | None) -> int | None:
            return t.data_ptr() if t is not None else None

        layer_ptrs: list[int | None] = []
        for block in model.layers:
            at = block.attention
            layer_ptrs += [ptr(block.attention_norm.weight), ptr(at.wqkv), ptr(at.bqkv),
                           ptr(at.q_norm.weight) if at.q_norm is not None else None,
                           ptr(at.k_norm.weight) if at.k_norm is not None else None, ptr(at.wo),
                           ptr(block.ffn_norm.weight), ptr(block.moe.router),
                           ptr(at.kv_cache.k_cache), ptr(at.kv_cache.v_cache)]
        gate_up = [gu.data_ptr() for layer in experts for gu, _ in layer]
        down = [d.data_ptr() for layer in experts for _, d in layer]
        from localmoe.engine.torch_moe import ARCHS  # torch_moe imports this module

        spec = ARCHS[a.arch]
        renorm = spec.routing == "topk_softmax" or a.norm_topk_prob
        self._cfg = (ctypes.c_int * 13)(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.n_experts, a.top_k,
                                        a.expert_ff, a.vocab_size, a.max_seq_length, a.n_layers,
                                        _QK_NORM[spec.qk_norm], int(renorm), 1)
        self._layers = (_P * len(layer_ptrs))(*layer_ptrs)
        self._gate_up, self._down = (_P * len(gate_up))(*gate_up), (_P * len(down))(*down)
        q_out, kv_out = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self._scratch = torch.zeros(3 * a.dim + 2 * q_out + 2 * kv_out + a.n_experts + a.top_k * a.expert_ff
                                    + a.n_heads * a.max_seq_length)
        self._chosen = (ctypes.c_int * (a.n_layers * a.top_k))()
        self._eps, self._clip = a.norm_eps, a.clip_qkv or 0.0

    @staticmethod
    def why_not(model: torch.nn.Module) -> str | None:
        """Why the native step cannot run this model (None: it can, once its experts are all resident)."""
        from localmoe.engine.torch_moe import ARCHS

        a = model.args
        if ARCHS[a.arch].shared_expert:
            return "shared experts are not in the native step"
        if a.top_k > _MAX_TOP_K or a.head_dim % 2 or a.n_heads % a.n_kv_heads:
            return "shape outside the native step"
        tensors = [model.tok_embeddings, model.output, model.norm.weight, model.cos, model.sin]
        for block in model.layers:
            at = block.attention
            tensors += [at.wqkv, at.wo, block.moe.router, block.attention_norm.weight, block.ffn_norm.weight,
                        at.kv_cache.k_cache, at.kv_cache.v_cache]
            tensors += [t for t in (at.bqkv,) if t is not None]
        for t in tensors:
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
                return "a dense weight is not a contiguous float32 CPU tensor"
        return None

    def __call__(self, token: int, pos: int) -> Tensor:
        """Logits (1, vocab) of `token` at position `pos`; the KV cache gets its keys and values at `pos`."""
        m = self._model
        logits = torch.empty(1, m.args.vocab_size)
        self._cfg[_CFG_THREADS] = torch.get_num_threads()
        self._lib.lm_step_f32(self._cfg, self._eps, self._clip, self._layers, self._gate_up, self._down,
                              m.tok_embeddings[token].data_ptr(), m.norm.weight.data_ptr(), m.output.data_ptr(),
                              m.cos[pos].data_ptr(), m.sin[pos].data_ptr(), pos, logits.data_ptr(), self._chosen,
                              self._scratch.data_ptr())
        return logits

    def chosen(self) -> list[list[int]]:
        """The experts each layer used in the last step, ascending."""
        k = self.top_k
        flat = list(self._chosen)
        return [flat[i * k:(i + 1) * k] for i in range(self.n_layers)]


def decode_step(model: torch.nn.Module, experts: list[list[tuple[Tensor, Tensor]]]) -> DecodeStep | None:
    """A DecodeStep over `experts` (per layer, every expert's (gate_up, down) in id order), or None where the
    native library or the model rules it out."""
    lib = _library()[0]
    if lib is None or DecodeStep.why_not(model) is not None:
        return None
    if any(not usable(model.tok_embeddings[:1], mats) for layer in experts for mats in layer):
        return None
    return DecodeStep(lib, model, experts)
