"""The native kernels for GGUF-quantised weights (quant_kernels.c via ggml_quants.py): dequantisation bit-exact with
the gguf package's (= llama.cpp's) on random blocks with extreme scales, packed matrix-vector products and MoE decode
against float64 products of the dequantised weights, and bad input refused with one-line errors."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import localmoe.engine.torch_moe.kernels as native
from localmoe.engine.torch_moe import ggml_quants as gq
from localmoe.errors import LocalmoeError

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")

TYPES = sorted(gq.BLOCK)
# byte offsets of each block's f16 scale fields (random bytes there would be NaN or infinity)
F16_FIELDS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0], 12: [0, 2], 13: [0, 2], 14: [208]}
EXTREME = np.array([65504.0, -65504.0, 2.0**-24, -(2.0**-24), 1023 * 2.0**-24, 2.0**-14, 0.0, -0.0, 1.0, -3.5],
                   dtype=np.float16)


@pytest.fixture(autouse=True, scope="module")
def library():
    native._library.cache_clear()
    if shutil.which("cc") is not None:
        assert native.available(), native.kernels()
    yield
    native._library.cache_clear()


@pytest.fixture
def float_mode():
    """Float32 activations: the products of the dequantised weights, up to summation order."""
    before = gq.set_activations("float")
    yield
    gq.set_activations(before)


@pytest.fixture
def int8_mode():
    before = gq.set_activations("int8")
    yield
    gq.set_activations(before)


def _f16_values(rng: np.random.Generator, n: int, extreme: bool, scale: float = 0.01) -> np.ndarray:
    values = (rng.standard_normal(n) * scale).astype(np.float16)
    if extreme:  # every extreme value at least once, then at random places
        pick = rng.random(n) < 0.5
        values[pick] = rng.choice(EXTREME, size=int(pick.sum()))
        values[: len(EXTREME)] = EXTREME[: n]
    return values


def random_blocks(qtype: int, n_blocks: int, seed: int, extreme: bool = True, scale: float = 0.01) -> np.ndarray:
    """n_blocks blocks of `qtype` (uint8, one block a row): random quant bytes, controlled scales."""
    rng = np.random.default_rng(seed)
    size = gq.BLOCK[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    if qtype == T.F32:
        values = rng.standard_normal(n_blocks).astype(np.float32)
        if extreme:
            values[: 4] = [3.4e38, -1.2e-38, 1e-45, -0.0][: n_blocks]
        return values.view(np.uint8).reshape(n_blocks, 4)
    if qtype == T.F16:
        return _f16_values(rng, n_blocks, extreme, 1.0).view(np.uint8).reshape(n_blocks, 2)
    if qtype == T.MXFP4:  # e8m0 exponents: subnormal results (0, 1), around 1 (127), up to 2^120 (no infinities)
        raw[:, 0] = rng.choice([0, 1, 2, 100, 120, 126, 127, 128, 130, 248], size=n_blocks) if extreme else 120
        return raw
    for off in F16_FIELDS[qtype]:
        raw[:, off: off + 2] = _f16_values(rng, n_blocks, extreme, scale).view(np.uint8).reshape(n_blocks, 2)
    return raw


def _native_dequant(qtype: int, raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0] * gq.BLOCK[qtype][0]
    return gq.dequantize(qtype, torch.from_numpy(raw.reshape(-1).copy()), (n,)).numpy()


@needs_cc
@pytest.mark.parametrize("qtype", TYPES, ids=[gq.type_name(t) for t in TYPES])
def test_dequant_bit_exact_on_random_blocks(qtype):
    raw = random_blocks(qtype, 64 if gq.BLOCK[qtype][0] == 256 else 512, seed=qtype)
    want = gguf_dequantize(raw, T(qtype)).reshape(-1)
    got = _native_dequant(qtype, raw)
    assert not np.isnan(want).any()
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays -0.0


@needs_cc
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4], ids=lambda t: t.name)
def test_dequant_bit_exact_on_quantised_weights(qtype):
    """Blocks from gguf's own quantiser (llama.cpp's reference rounding), as real files hold them."""
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32) * 0.02
    raw = gguf_quantize(w, qtype)
    assert np.array_equal(_native_dequant(int(qtype), raw.reshape(-1, gq.BLOCK[qtype][1])),
                          gguf_dequantize(raw, qtype).reshape(-1))


def test_lm_qtype_supported_matches_block_table():
    lib = native.library()
    if lib is None:
        pytest.skip(native.kernels())
    for t in range(64):
        assert lib.lm_qtype_supported(t) == int(gq.supported(t)), t


def _matrix(qtype: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n×k of `qtype`: its raw bytes and its dequantised float64 values."""
    raw = random_blocks(qtype, n * k // gq.BLOCK[qtype][0], seed=seed, extreme=False)
    w = gguf_dequantize(raw, T(qtype)).reshape(n, k).astype(np.float64)
    return torch.from_numpy(raw.reshape(-1).copy()), w


# Float activations: each product is the dequantised weight's times x (exact in an FMA), summed in another order,
# and affine types (scale*q - min) take the min as min*sum(x) per 32 elements. Float32 summation of k terms is off by
# ~sqrt(k)·2^-24 of Σ|w·x| typically: measured 1-4e-8 for every type at k = 2048 and 4096. 1e-6 leaves a 25× margin
# and still catches a wrong block layout or scale, which is off by O(1).
RTOL = 1e-6


@needs_cc
@pytest.mark.parametrize("qtype", TYPES, ids=[gq.type_name(t) for t in TYPES])
@pytest.mark.parametrize("n,k", [(13, 256), (7, 768), (36, 2048), (1, 512)])
@pytest.mark.parametrize("threads", [1, 2])
def test_qgemv_matches_dequantised_product(qtype, n, k, threads, float_mode):
    raw, w = _matrix(qtype, n, k, seed=n * 7 + k + qtype)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(k, generator=gen)
    bias = torch.randn(n, generator=gen) if n % 2 else None
    got = gq.qgemv(qtype, raw, x, n, k, bias=bias, threads=threads).double().numpy()
    xd = x.double().numpy()
    want = w @ xd + (bias.double().numpy() if bias is not None else 0.0)
    mag = np.abs(w) @ np.abs(xd) + (np.abs(bias.double().numpy()) if bias is not None else 0.0)
    assert np.all(mag > 0)
    err = np.abs(got - want) / mag
    assert err.max() < RTOL, (err.max(), err.argmax())


def q8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (float32) as the kernels quantise it: int8 blocks of 32, scale max|x|/127, round half to even (float32
    arithmetic throughout, as in qk_quantise8). Returns (the quantised values as float64, each element's scale)."""
    b = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(b * inv)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(-1), np.broadcast_to(d, b.shape).reshape(-1)


@needs_cc
@pytest.mark.parametrize("qtype", TYPES, ids=[gq.type_name(t) for t in TYPES])
@pytest.mark.parametrize("n,k", [(13, 256), (36, 2048)])
@pytest.mark.parametrize("threads", [1, 2])
def test_qgemv_int8_activations(qtype, n, k, threads, int8_mode):
    """8-bit activations (llama.cpp's way): exactly W · (x as quantised) up to float rounding, and so within the
    quantisation's own bound of W · x: |Σ w (x - x̂)| ≤ Σ |w| · scale / 2. Types without an integer kernel keep
    float32 x."""
    raw, w = _matrix(qtype, n, k, seed=n + k + qtype)
    x = torch.randn(k, generator=torch.Generator().manual_seed(k))
    got = gq.qgemv(qtype, raw, x, n, k, threads=threads).double().numpy()
    xd = x.double().numpy()
    if not gq.quantises_activations(qtype):
        assert np.all(np.abs(got - w @ xd) < RTOL * (np.abs(w) @ np.abs(xd)))
        return
    xq, scale = q8(x.numpy())
    assert np.abs(xq - xd).max() > 0  # x did change
    # integer dot products are exact; what is left is the float scales' and the sums' rounding
    assert np.all(np.abs(got - w @ xq) < RTOL * (np.abs(w) @ np.abs(xq)))
    assert np.all(np.abs(got - w @ xd) <= np.abs(w) @ (scale / 2) * 1.001)


def _ref_moe(x, experts, scales, f, q8_x=False, q8_h=False):
    """float64 reference; q8_x, q8_h: x, and each expert's hidden activations (rounded to float32, as the kernel
    holds them), quantised to 8 bits as the kernels do before the gate/up and the down products"""
    xd = torch.from_numpy(q8(x.numpy())[0]) if q8_x else x.double()
    out = torch.zeros(x.shape[-1], dtype=torch.float64)
    for (gu, down), s in zip(experts, scales, strict=True):
        gate, up = (torch.from_numpy(gu) @ xd).split(f)
        h = F.silu(gate) * up
        if q8_h:
            h = torch.from_numpy(q8(h.float().numpy())[0])
        out += s * (torch.from_numpy(down) @ h)
    return out


@needs_cc
@pytest.mark.parametrize("gu_type,down_type", [(T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0), (T.Q5_K, T.Q4_K),
                                               (T.Q4_0, T.Q5_1), (T.F16, T.F32), (T.Q5_0, T.Q4_1)],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["float", "int8"])
def test_moe_decode_matches_dequantised_experts(gu_type, down_type, threads, mode):
    k, f, n = 512, 256, 3
    experts_raw, experts_f = [], []
    for e in range(n):
        gu_raw, gu = _matrix(gu_type, 2 * f, k, seed=100 + e)
        d_raw, d = _matrix(down_type, k, f, seed=200 + e)
        experts_raw.append((gu_raw, d_raw))
        experts_f.append((gu, d))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, k, generator=gen) * 0.1
    start = torch.randn(1, k, generator=gen)
    scales = [0.6, 0.3, 0.1]
    out = start.clone()
    before = gq.set_activations(mode)
    try:
        gq.moe_decode(int(gu_type), int(down_type), x, experts_raw, scales, out, threads=threads)
        int8 = gq.quantises_activations(gu_type) or gq.quantises_activations(down_type)
    finally:
        gq.set_activations(before)
    want = _ref_moe(x.reshape(-1), experts_f, scales, f, q8_x=int8 and gq.quantises_activations(gu_type),
                    q8_h=int8 and gq.quantises_activations(down_type))
    got = (out - start).double().reshape(-1)
    # two float32 products in a row, the down product's input carrying the first's rounding: ~1e-7 of the largest
    # output measured. With 8-bit activations the reference quantises x and h as the kernel does, but h comes from
    # float64 there, float32 here: an element near a rounding boundary can land one step apart (one step × |w|).
    # Measured ~1.5e-7 for every pair here (no element landed a step apart).
    tol = 2e-3 if int8 else 1e-5
    assert torch.allclose(got, want, rtol=0, atol=tol * float(want.abs().max())), (got - want).abs().max()


def test_unsupported_type_is_one_line_error():
    raw = torch.zeros(84, dtype=torch.uint8)
    for call in (lambda: gq.row_bytes(T.Q2_K, 256), lambda: gq.dequantize(T.Q2_K, raw, (256,)),
                 lambda: gq.qgemv(T.Q2_K, raw, torch.zeros(256), 1, 256)):
        with pytest.raises(LocalmoeError, match="Q2_K") as e:
            call()
        assert "\n" not in str(e.value)
    assert not gq.supported(T.Q2_K) and gq.supported(T.Q4_K)
    with pytest.raises(LocalmoeError, match="ggml type 99"):
        gq.row_bytes(99, 256)


def test_row_not_a_multiple_of_the_block_is_an_error():
    with pytest.raises(LocalmoeError, match="Q4_K.*100.*256"):
        gq.row_bytes(T.Q4_K, 100)
    with pytest.raises(LocalmoeError, match="Q8_0"):
        gq.qgemv(T.Q8_0, torch.zeros(34, dtype=torch.uint8), torch.zeros(48), 1, 48)
    with pytest.raises(LocalmoeError, match="bytes"):  # raw holding the wrong number of bytes
        gq.dequantize(T.Q8_0, torch.zeros(33, dtype=torch.uint8), (32,))
    assert gq.row_bytes(T.Q4_K, 512) == 288 and gq.row_bytes(T.Q8_0, 64) == 68


def test_activation_modes():
    if not native.available():
        pytest.skip(native.kernels())
    before = gq.set_activations("float")
    try:
        assert gq.activations() == "float" and not gq.quantises_activations(T.Q4_K)
        assert gq.set_activations("int8") == "float" and gq.activations() == "int8"
        assert not gq.quantises_activations(T.F16) and not gq.quantises_activations(T.Q5_1)
    finally:
        gq.set_activations(before)
    with pytest.raises(LocalmoeError, match="activations"):
        gq.set_activations("int4")


def test_numpy_fallback_without_the_library(monkeypatch):
    """LOCALMOE_KERNELS=torch: the same answers from gguf's numpy dequantisation and torch."""
    raw, w = _matrix(T.Q4_K, 4, 256, seed=3)
    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(native.ENV, "torch")
    native._library.cache_clear()
    try:
        assert not native.available()
        assert np.array_equal(gq.dequantize(T.Q4_K, raw, (4, 256)).numpy(), w.astype(np.float32))
        y = gq.qgemv(T.Q4_K, raw, x, 4, 256).double().numpy()
        assert np.allclose(y, w @ x.double().numpy(), rtol=1e-4, atol=1e-4)
    finally:
        monkeypatch.delenv(native.ENV)
        native._library.cache_clear()


@needs_cc
@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for baseline x86-64")
def test_portable_build_without_avx2(tmp_path):
    """Built for baseline x86-64 (no AVX2, as on older or other CPUs), every type goes through the generic kernel
    (dequantise a block, then dot1): the same exact dequantisation, float32 activations."""
    so = tmp_path / "portable.so"
    done = subprocess.run(["cc", "-O2", "-march=x86-64", "-fopenmp", "-shared", "-fPIC", str(native.SOURCE), "-o",
                           str(so), "-lm"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(so))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.lm_dequant.argtypes = [i, p, p, ctypes.c_long]
    lib.lm_qgemv.argtypes = [i, p, p, p, p, i, i, i]
    lib.lm_qact_int8.argtypes = [i]
    n, k = 5, 512
    for qtype in TYPES:
        assert lib.lm_qact_int8(qtype) == 0
        raw, w = _matrix(qtype, n, k, seed=qtype)
        deq = torch.empty(n * k)
        lib.lm_dequant(qtype, raw.data_ptr(), deq.data_ptr(), n * k)
        assert np.array_equal(deq.numpy(), w.reshape(-1).astype(np.float32)), gq.type_name(qtype)
        x = torch.randn(k, generator=torch.Generator().manual_seed(qtype))
        y = torch.empty(n)
        lib.lm_qgemv(qtype, raw.data_ptr(), x.data_ptr(), None, y.data_ptr(), n, k, 2)
        xd = x.double().numpy()
        assert np.all(np.abs(y.double().numpy() - w @ xd) < RTOL * (np.abs(w) @ np.abs(xd))), gq.type_name(qtype)
