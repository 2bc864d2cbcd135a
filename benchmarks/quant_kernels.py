"""Speed of the kernels for GGUF-quantised weights (quant_kernels.c): lm_qgemv per type against lm_gemv_f32 on
the same logical matrices, an expert's gate+up (2×768 rows of 2048) and its down (2048 rows of 768).

    .venv/bin/python benchmarks/quant_kernels.py [--threads 2] [--reps 5] [--write]

"from memory": the calls cycle through copies of the matrix totalling ≥ 384 MB (≫ the L3), as a decode step reads
experts; "in cache": one copy, again and again (L2/L3-resident: what the arithmetic alone allows). GB/s counts the
packed bytes read; Gw/s logical weights per second. Best of --reps timings of one pass over the copies.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import subprocess
import time

import torch
from common import ROOT, write_section
from gguf import GGMLQuantizationType as T

from localmoe.engine.torch_moe import ggml_quants as gq
from localmoe.engine.torch_moe import kernels

SHAPES = [("gate+up", 1536, 2048), ("down", 2048, 768)]
TYPES = [T.F32, T.Q8_0, T.Q6_K, T.Q5_K, T.Q4_K, T.Q4_0]
TOTAL = 384 << 20


def _copies(qtype: int, n: int, k: int, total: int) -> list[torch.Tensor]:
    rb = gq.row_bytes(qtype, k)
    count = max(1, total // (n * rb))
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        raw = torch.randint(0, 256, (n * rb,), dtype=torch.uint8, generator=gen)
        if qtype == T.F32:  # finite floats, not random bit patterns
            raw = torch.randn(n * k, generator=gen).view(torch.uint8)
        else:  # random bytes make NaN scales; any finite f16 will do for timing
            blocks = raw.view(-1, gq.BLOCK[qtype][1])
            offsets = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}[qtype]
            for off in offsets:
                blocks[:, off: off + 2] = torch.full((blocks.shape[0],), 0.01, dtype=torch.float16).view(
                    torch.uint8).view(-1, 2)
        out.append(raw)
    return out


def _time(lib: ctypes.CDLL, qtype: int, mats: list[torch.Tensor], n: int, k: int, threads: int, reps: int) -> float:
    x = torch.randn(k)
    y = torch.empty(n)
    best = float("inf")
    for _ in range(reps + 1):  # the first pass pages everything in
        t0 = time.perf_counter()
        for m in mats:
            lib.lm_qgemv(qtype, m.data_ptr(), x.data_ptr(), None, y.data_ptr(), n, k, threads)
        best = min(best, (time.perf_counter() - t0) / len(mats))
    return best


MOE_K, MOE_F, MOE_TOP = 2048, 768, 8
MOE_TYPES = [("F32", T.F32, T.F32), ("Q8_0", T.Q8_0, T.Q8_0), ("Q4_K_M", T.Q4_K, T.Q6_K)]


def _moe_layers(lib: ctypes.CDLL, threads: int, reps: int) -> list[tuple[str, str, int, float]]:
    """(experts, activations, bytes per layer, best seconds per layer) for one token through MOE_TOP experts."""
    out = []
    x = torch.randn(MOE_K) * 0.1
    acc = torch.zeros(MOE_K)
    h = torch.empty(MOE_TOP * MOE_F)
    scale = (ctypes.c_float * MOE_TOP)(*([1.0 / MOE_TOP] * MOE_TOP))
    for name, gu_t, down_t in MOE_TYPES:
        gus = _copies(gu_t, 2 * MOE_F, MOE_K, TOTAL // 2)
        downs = _copies(down_t, MOE_K, MOE_F, TOTAL // 2)
        n_layers = min(len(gus), len(downs)) // MOE_TOP
        ptrs = []
        for layer in range(n_layers):
            chosen = range(layer * MOE_TOP, (layer + 1) * MOE_TOP)
            ptrs.append(((ctypes.c_void_p * MOE_TOP)(*(gus[e].data_ptr() for e in chosen)),
                         (ctypes.c_void_p * MOE_TOP)(*(downs[e].data_ptr() for e in chosen))))
        nbytes = MOE_TOP * (gus[0].numel() + downs[0].numel())
        for mode in ("float", "int8") if gu_t != T.F32 else ("float",):
            gq.set_activations(mode)
            best = float("inf")
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                for gp, dp in ptrs:
                    if gu_t == T.F32:
                        lib.lm_moe_decode_f32(MOE_TOP, gp, dp, scale, x.data_ptr(), acc.data_ptr(), h.data_ptr(),
                                              MOE_K, MOE_F, threads)
                    else:
                        lib.lm_moe_decode_q(MOE_TOP, gu_t, down_t, gp, dp, scale, x.data_ptr(), acc.data_ptr(),
                                            h.data_ptr(), MOE_K, MOE_F, threads)
                best = min(best, (time.perf_counter() - t0) / len(ptrs))
            out.append((name, mode, nbytes, best))
            print(f"MoE layer {name} {mode}: {best * 1e3:.2f} ms, {nbytes / best / 1e9:.1f} GB/s", flush=True)
        del gus, downs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lib = kernels.library()
    assert lib is not None, kernels.kernels()
    rows = []
    before = gq.activations()
    for name, n, k in SHAPES:
        f32_mem = None
        for qtype in TYPES:
            nbytes = n * gq.row_bytes(qtype, k)
            mem, cache = _copies(qtype, n, k, TOTAL), _copies(qtype, n, k, 0)
            for mode in ("float", "int8"):
                gq.set_activations(mode)
                if mode == "int8" and not gq.quantises_activations(qtype):
                    continue
                res = {"memory": _time(lib, qtype, mem, n, k, a.threads, a.reps),
                       "cache": _time(lib, qtype, cache, n, k, a.threads, 20 * a.reps)}
                if qtype == T.F32:
                    f32_mem = res["memory"]
                rows.append((name, n, k, T(qtype).name, mode, nbytes, res, f32_mem / res["memory"]))
                print(f"{name} {T(qtype).name} {mode}: {nbytes / res['memory'] / 1e9:.1f} GB/s from memory, "
                      f"{nbytes / res['cache'] / 1e9:.1f} in cache", flush=True)
            del mem, cache
    gq.set_activations(before)
    layers = _moe_layers(lib, a.threads, a.reps)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(li.split(":", 1)[1].strip() for li in open("/proc/cpuinfo") if li.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "## Kernels for GGUF-quantised experts: lm_qgemv per type (issue #16)",
        "",
        f"Command: `.venv/bin/python benchmarks/quant_kernels.py --threads {a.threads} --reps {a.reps} --write` "
        f"({time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, {a.threads} threads, commit {commit}). "
        "Activations: float (the weights unpacked in registers, FMA with float32 x) or int8 (x quantised per 32, "
        "integer dot products). \"from memory\": cycling "
        f"through ≥ {TOTAL >> 20} MB of copies; \"in cache\": one copy again and again. Best of "
        f"{a.reps} passes; F32 is lm_gemv_f32's path (dot1) through lm_qgemv.",
        "",
        "| matrix | type | activations | MB | from memory GB/s | µs | ns/row | Gweights/s | in cache GB/s "
        "| ÷ f32 time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, k, tname, mode, nbytes, res, speedup in rows:
        t = res["memory"]
        lines.append(f"| {name} {n}×{k} | {tname} | {mode} | {nbytes / 1e6:.2f} | {nbytes / t / 1e9:.1f} | "
                     f"{t * 1e6:.0f} | {t / n * 1e9:.0f} | {n * k / t / 1e9:.1f} | {nbytes / res['cache'] / 1e9:.1f} | "
                     f"{speedup:.2f}× faster |")
    lines += [
        "",
        f"One MoE layer's experts per call (lm_moe_decode_q; F32: lm_moe_decode_f32): top-{MOE_TOP} of hidden "
        f"{MOE_K}, expert FFN {MOE_F} (Qwen3-30B-A3B's shape), cycling through ≥ {TOTAL >> 20} MB of layers; "
        "Q4_K_M: gate/up Q4_K, down Q6_K.",
        "",
        "| experts | activations | MB per layer | ms per layer | GB/s | ÷ f32 time |",
        "|---|---|---|---|---|---|",
    ]
    f32_t = next(t for name, _, _, t in layers if name == "F32")
    for name, mode, nbytes, t in layers:
        lines.append(f"| {name} | {mode} | {nbytes / 1e6:.1f} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | "
                     f"{f32_t / t:.2f}× faster |")
    body = "\n".join(lines)
    print(body)
    if a.write:
        write_section("quant_kernels", body)


if __name__ == "__main__":
    main()
