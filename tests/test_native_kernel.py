"""The native one-token expert kernel (localmoe/engine/torch_moe/moe_kernels.c via kernels.py): built here with the
system compiler, checked against torch on awkward shapes, and against the engine's torch path on a real tiny
checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import localmoe.engine.torch_moe.kernels as native
from localmoe.engine.torch_moe import TorchMoEEngine

PROMPT = [5, 17, 300, 42, 42, 7, 1, 250, 99, 123, 64, 8, 8, 201, 77, 3, 150, 11]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture(autouse=True)
def fresh_library():
    """Each test decides afresh whether the kernel builds (its environment may differ), and leaves no decision."""
    native._library.cache_clear()
    yield
    native._library.cache_clear()


@pytest.fixture(scope="module")
def kernel_home(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels-home")


@pytest.fixture
def shared_kernel_build(kernel_home, monkeypatch):
    """One data dir for the tests that only compute with the kernel: each still decides afresh (fresh_library), and
    finds the library this module built from the current source instead of compiling it again (seconds per test).
    The tests of the build itself keep their own data dir."""
    monkeypatch.setenv("LOCALMOE_HOME", str(kernel_home))


def _reference(x, experts, scales):
    out = torch.zeros(1, x.shape[-1], dtype=torch.float64)
    for (gu, down), s in zip(experts, scales, strict=True):
        gate, up = F.linear(x.double(), gu.double()).chunk(2, dim=-1)
        out += s * F.linear(F.silu(gate) * up, down.double())
    return out


@needs_cc
@pytest.mark.parametrize("hidden,ff,n", [(64, 32, 4), (37, 13, 3), (5, 3, 1), (130, 66, 5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_moe_decode_matches_torch(hidden, ff, n, threads, shared_kernel_build):
    """Shapes that are not multiples of the 4-row blocks, more threads than some shares have rows; the kernel adds
    to what `out` holds."""
    assert native.available(), native.kernels()
    gen = torch.Generator().manual_seed(hidden * 100 + ff)
    experts = [(torch.randn(2 * ff, hidden, generator=gen), torch.randn(hidden, ff, generator=gen)) for _ in range(n)]
    x = torch.randn(1, hidden, generator=gen)
    scales = [0.5 - 0.1 * i for i in range(n)]
    start = torch.randn(1, hidden, generator=gen)
    out = start.clone()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.moe_decode(x, experts, scales, out)
    finally:
        torch.set_num_threads(before)
    want = start.double() + _reference(x, experts, scales)
    assert want.abs().max() > 1.0
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-4)


@needs_cc
def test_kernel_is_built_once_and_shares_torchs_openmp(home):
    assert native.kernels() == "native"
    built = list((home / "kernels").glob("moe_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.available()
    assert built[0].stat().st_mtime_ns == stamp  # the cached library, not a rebuild
    assert len(native._mapped("gomp")) == 1  # one OpenMP runtime in the process: torch's


def test_without_a_compiler_the_engine_keeps_torchs_kernels(tiny_moe, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert not native.available()
    assert native.kernels() == "torch (native kernel not built: no C compiler (/nonexistent/cc))"
    engine = TorchMoEEngine(tiny_moe[0])
    engine.decode_logits(PROMPT, 2)
    assert engine.cache_stats()["expert_kernel"].startswith("torch (native kernel not built")
    engine.close()


def test_a_compiler_error_is_one_line_and_the_engine_keeps_torch(tiny_moe, monkeypatch, tmp_path):
    cc = tmp_path / "cc"
    cc.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\necho second line >&2\nexit 1\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    assert native.kernels() == "torch (native kernel not built: cc: error: unrecognized option)"
    assert not list((tmp_path / "home" / "kernels").glob("*"))  # no half-written library left behind


@needs_cc
def test_engine_with_native_kernel_equals_torch_kernels(tiny_moe, monkeypatch, shared_kernel_build):
    """The same checkpoint decoded with the native kernel and with LOCALMOE_KERNELS=torch: the same greedy tokens,
    logits equal up to float rounding (each is checked against transformers in test_torch_moe)."""
    runs = {}
    for kernels in ("native", "torch"):
        native._library.cache_clear()
        monkeypatch.setenv(native.ENV, kernels)
        engine = TorchMoEEngine(tiny_moe[0], expert_slots=1, prefetch=False)  # same requests: no timing
        chosen, rows = engine.decode_logits(PROMPT, 8)
        runs[kernels] = (chosen, rows, engine.cache_stats())
        engine.close()
    assert runs["native"][2]["expert_kernel"] == "native"
    assert runs["torch"][2]["expert_kernel"] == "torch (LOCALMOE_KERNELS=torch)"
    assert runs["native"][0] == runs["torch"][0]
    assert np.abs(runs["native"][1]).max() > 0.5
    np.testing.assert_allclose(runs["native"][1], runs["torch"][1], rtol=0, atol=2e-5)
    assert runs["native"][2]["misses"] == runs["torch"][2]["misses"]  # the cache saw the same requests
