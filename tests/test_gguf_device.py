"""A GGUF's experts packed on the engine's device and dequantised by torch where used (issue #16's GPU path).

On a GPU the native engine keeps each expert as the file's bytes (uint8 in VRAM) and dequantises it for the call
(torch_dequant.py), its dense weights dequantised once to float32. The path is plain torch, so the tests prove it on
the CPU (`device_packed=True` forces it there) against the same oracles as test_gguf_native: the torch dequantisers
bit for bit against gguf's (= llama.cpp's), and the engine on the tiny Q8_0 and Q4_K_M MoEs against llama.cpp on
the files' dequantised copies (exact float32 arithmetic on the same weights) and against the CPU native kernels with
float activations. The last test runs the real GPU path where torch sees CUDA (the device machine); CI has none.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import test_quant_kernels as tqk  # noqa: E402  (random valid blocks with extreme scales)
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402
from gguf_models import ARCHS, PROMPT, QUANTS, STEPS, _native  # noqa: E402  (fixtures: conftest.py)

from localmoe.engine.torch_moe import ggml_quants as gq  # noqa: E402
from localmoe.engine.torch_moe import torch_dequant as td  # noqa: E402
from localmoe.engine.torch_moe.packed import PackedLinear  # noqa: E402
from localmoe.errors import LocalmoeError  # noqa: E402

TYPES = sorted(td.DEQUANT)
# ARCHS: mixtral's q and k rows are reordered from llama.cpp's rope layout on the way in
# QUANTS: Q4_K_M mixes Q4_K, Q5_K, Q6_K and Q8_0
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _check_bit_exact(qtype: int, raw: np.ndarray, device: str = "cpu") -> None:
    want = gguf_dequantize(raw, T(qtype)).reshape(-1)
    row = 2 * td.DEQUANT[qtype][0] if td.DEQUANT[qtype][0] > 1 else 64  # rows of two blocks
    got = td.dequantize(qtype, torch.from_numpy(raw.reshape(-1).copy()).to(device), (want.size // row, row))
    assert got.dtype == torch.float32 and got.device.type == device
    got = got.cpu().numpy().reshape(-1)
    assert not np.isnan(want).any()
    assert np.array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))  # -0.0 stays -0.0


@pytest.mark.parametrize("qtype", TYPES, ids=[gq.type_name(t) for t in TYPES])
@pytest.mark.parametrize("extreme", [True, False], ids=["extreme", "plain"])
def test_torch_dequant_bit_exact_on_random_blocks(qtype, extreme):
    assert set(TYPES) == set(gq.BLOCK)  # every type the native engine reads runs on the device too
    raw = tqk.random_blocks(qtype, 64 if gq.BLOCK[qtype][0] == 256 else 512, seed=100 + qtype, extreme=extreme)
    _check_bit_exact(qtype, raw)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4], ids=lambda t: t.name)
def test_torch_dequant_bit_exact_on_quantised_weights(qtype):
    w = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32) * 0.02
    _check_bit_exact(int(qtype), gguf_quantize(w, qtype).reshape(-1, gq.BLOCK[qtype][1]))


def test_torch_dequant_other_dtype_and_unaligned_bytes():
    """bfloat16 out is the float32 values rounded; bytes at an odd offset of a larger buffer (an expert's down rows
    after its gate and up) read the same."""
    raw = tqk.random_blocks(T.Q6_K, 8, seed=5, extreme=False).reshape(-1)
    buf = torch.from_numpy(np.concatenate([np.zeros(1, np.uint8), raw]))
    f32 = td.dequantize(T.Q6_K, buf[1:], (4, 512))
    assert torch.equal(f32.reshape(-1), torch.from_numpy(gguf_dequantize(raw.reshape(8, -1), T.Q6_K).reshape(-1)))
    assert torch.equal(td.dequantize(T.Q6_K, buf[1:], (4, 512), torch.bfloat16), f32.to(torch.bfloat16))


def test_torch_dequant_refuses_what_it_cannot_read():
    with pytest.raises(LocalmoeError, match="Q2_K weights cannot be dequantised on the device"):
        td.dequantize(int(T.Q2_K), torch.zeros(84, dtype=torch.uint8), (256,))
    with pytest.raises(LocalmoeError, match="expected 34 uint8 bytes, got 33"):
        td.dequantize(int(T.Q8_0), torch.zeros(33, dtype=torch.uint8), (32,))
    with pytest.raises(LocalmoeError, match="not a multiple of its block of 256"):
        td.dequantize(int(T.Q4_K), torch.zeros(144, dtype=torch.uint8), (2, 128))


def _device_engine(path, slots, **kw):
    return _native(path, device_packed=True, expert_slots=slots, **kw)


def _assert_device_path(engine) -> None:
    """Experts held as packed bytes in the fast tier and computed by torch; dense weights float tensors."""
    stats = engine.cache_stats()
    assert stats["expert_dtype"] == "packed" and stats["options"]["device_packed"]
    assert stats["expert_kernel"].startswith("torch") and stats["decode_step"] == "torch"
    assert engine.native_steps == 0 and not any(moe.native for moe in engine.model.moes)
    assert not isinstance(engine.model.output, PackedLinear) and engine.model.output.dtype == torch.float32
    _, resident = engine.store.resident(0)
    assert resident and all(w.on_device and w.mats[0].dtype == torch.uint8 for _, w in resident)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_device_path_logits_are_exact_arithmetic_on_the_files_weights(gguf_moes, reference, arch, quant,
                                                                        float_activations):
    ref = reference[arch, quant]
    seq = [int(t) for t in ref["seq"]]
    scale = float(np.abs(ref["exact"]).max())
    cpu = _native(gguf_moes[arch, quant][0]).logits(seq)  # the CPU native kernels, float activations
    for slots in (None, 1):  # every expert resident, and one slot per layer (each token's experts read from disk)
        engine = _device_engine(gguf_moes[arch, quant][0], slots)
        engine.reset_cache_stats()
        ours = engine.logits(seq)
        assert np.abs(ours - ref["exact"]).max() <= 2e-3 * scale  # test_gguf_native's bound against llama.cpp
        # the same weights, summed in another order: measured ~1e-6 of the largest |logit|
        assert np.abs(ours - cpu).max() <= 1e-5 * scale
        _assert_device_path(engine)
        stats = engine.cache_stats()
        if slots == 1:
            # a miss reads the expert's packed bytes, and the fast tier holds them as read
            layer0 = stats["layers"][0]
            assert stats["misses"] > 0 and layer0["bytes_read"] == layer0["misses"] * _packed_expert_bytes(engine)
            assert stats["slots"] == 1


def _packed_expert_bytes(engine) -> int:
    _, resident = engine.store.resident(0)
    return resident[0][1].nbytes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_device_path_greedy_tokens_match_llama_cpp_for_32_steps_full_and_one_slot(gguf_moes, reference, arch,
                                                                                    quant):
    ref = reference[arch, quant]
    exact_greedy = ref["exact"][len(PROMPT) - 1:].argmax(-1)
    for slots in (None, 1):
        engine = _device_engine(gguf_moes[arch, quant][0], slots)
        tokens, _ = engine.decode_logits(PROMPT, STEPS)
        assert tokens == exact_greedy.tolist()
        _assert_device_path(engine)
        if slots == 1:
            assert engine.cache_stats()["misses"] > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("quant", QUANTS)
def test_device_path_bfloat16_experts(gguf_moes, reference, arch, quant):
    """expert_dtype bfloat16: each expert dequantised to bfloat16 and computed in it (the dense part stays float32).
    Measured within 1.7e-3 of the largest |logit| of exact arithmetic, a twentieth of what llama.cpp's own 8-bit
    activations cost on the same files (3-10%)."""
    ref = reference[arch, quant]
    scale = float(np.abs(ref["exact"]).max())
    gap = np.abs(ref["exact"] - ref["quant"]).max()
    engine = _device_engine(gguf_moes[arch, quant][0], 1, expert_dtype="bfloat16")
    ours = engine.logits([int(t) for t in ref["seq"]])
    assert np.abs(ours - ref["exact"]).max() <= min(5e-3 * scale, gap)
    assert "bfloat16" in engine.cache_stats()["expert_kernel"]
    _assert_device_path(engine)


def test_gguf_expert_dtypes(gguf_moes):
    q, _ = gguf_moes["qwen3_moe", "Q8_0"]
    with pytest.raises(LocalmoeError, match=r"expert_dtype bfloat16 applies to Hugging Face checkpoints only \(and "
                                            r"bfloat16 to a GGUF on a GPU\)"):
        _native(q, expert_dtype="bfloat16")  # the CPU's native kernels compute on the packed bytes
    with pytest.raises(LocalmoeError, match=r"expert_dtype int8 applies to Hugging Face checkpoints only$"):
        _native(q, expert_dtype="int8", device_packed=True)


def test_the_gpu_plan_counts_dense_weights_as_float32(gguf_moes):
    """On a GPU a GGUF's dense weights are dequantised once to float32 (on the CPU they stay packed): the plan must
    count them so, or it would size the fast tier for memory the dense weights take."""
    from localmoe.engine.torch_moe.gguf_checkpoint import read_view
    from localmoe.placement import plan

    config, tensors = read_view(gguf_moes["qwen3_moe", "Q4_K_M"][0])
    cpu, gpu = (plan.plan_checkpoint(config, tensors, 1 << 30, expert_dtype="packed", device=d)
                for d in ("cpu", "cuda"))
    dense = [t for k, t in tensors.items() if not plan._EXPERT_KEY.match(k)]
    assert gpu.dense_bytes == sum(t.numel * 4 for t in dense) > cpu.dense_bytes
    assert gpu.bytes_per_expert == cpu.bytes_per_expert  # the experts stay packed on both


def test_device_packed_is_for_gguf_files_only(tmp_path):
    from localmoe.engine.torch_moe import TorchMoEEngine

    with pytest.raises(LocalmoeError, match="device_packed applies to GGUF files only"):
        TorchMoEEngine(tmp_path, device_packed=True).load()


@needs_cuda
@pytest.mark.parametrize("quant", QUANTS)
def test_gpu_keeps_experts_packed_in_vram(gguf_moes, reference, quant):
    """The real GPU path: packed experts in VRAM (fast tier), the warm tier's pinned copies or disk behind it, the
    same logits and greedy tokens as llama.cpp's exact reference."""
    for qtype in TYPES:
        _check_bit_exact(qtype, tqk.random_blocks(qtype, 64, seed=qtype), device="cuda")
    ref = reference["qwen3_moe", quant]
    seq = [int(t) for t in ref["seq"]]
    scale = float(np.abs(ref["exact"]).max())
    gap = np.abs(ref["exact"] - ref["quant"]).max()
    for slots, warm, dtype in ((None, None, "float32"), (1, None, "float32"), (1, 0, "float32"),
                               (1, None, "bfloat16")):
        engine = _native(gguf_moes["qwen3_moe", quant][0], device="cuda", expert_slots=slots, warm_memory=warm,
                         expert_dtype=dtype)
        diff = np.abs(engine.logits(seq) - ref["exact"]).max()
        if dtype == "bfloat16":
            assert diff <= min(5e-3 * scale, gap)
            continue
        assert diff <= 2e-3 * scale
        tokens, _ = engine.decode_logits(PROMPT, STEPS)
        assert tokens == ref["exact"][len(PROMPT) - 1:].argmax(-1).tolist()
        stats = engine.cache_stats()
        assert stats["device"].startswith("cuda") and stats["expert_dtype"] == "packed"
        _, resident = engine.store.resident(0)
        assert all(w.mats[0].device.type == "cuda" and w.mats[0].dtype == torch.uint8 for _, w in resident)
        if slots == 1:
            assert stats["misses"] + stats["warm_hits"] > 0
