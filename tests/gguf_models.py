"""The tiny quantised MoE GGUFs that test_gguf_native and test_gguf_device share, and llama.cpp's logits on them.

The fixtures are registered in conftest.py, so that a worker running both files builds the models and computes the
references once (a fixture imported into a test module is a second fixture of that module, computed again).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import built_once

PROMPT = [1, 20, 300, 4000, 50, 6, 700, 8000]
STEPS = 32
ARCHS = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")
QUANTS = ("Q8_0", "Q4_K_M")


@pytest.fixture(scope="session")
def gguf_moes(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Path]]:
    """(arch, quant) -> (the quantised GGUF, its f32 dequantised copy); read-only, built once and kept between runs
    (helpers.built_once): building them is most of this file's time."""

    def build(root: Path) -> None:
        import synthetic_moe  # here, not at the top: conftest imports this module, and torch with it otherwise

        for arch in ARCHS:
            # dimensions multiples of 256: the K-quants' super-blocks (otherwise llama-quantize falls back to others)
            hf = synthetic_moe.build_hf_moe(root / arch / "hf", arch, layers=3, experts=8, top_k=2, hidden=256,
                                            expert_ff=256, heads=4, kv_heads=4 if arch == "olmoe" else 2,  # no GQA
                                            head_dim=64, init_std=0.02,
                                            router_std=0.1)  # decisive routers: no top-k near-ties to flip
            f32 = synthetic_moe.hf_to_gguf(hf, root / arch / "f32.gguf")
            for quant in QUANTS:
                q = synthetic_moe.llama_quantize(f32, root / arch / f"{quant}.gguf", quant)
                synthetic_moe.dequantized_copy(q, root / arch / f"{quant}-deq.gguf")
            f32.unlink()  # 120 MB each: only the quantised files are used
            shutil.rmtree(hf)  # nor is the checkpoint

    root = built_once(request.config, tmp_path_factory, "gguf_moes", {"archs": ARCHS, "quants": QUANTS}, build)
    return {(arch, quant): (root / arch / f"{quant}.gguf", root / arch / f"{quant}-deq.gguf")
            for arch in ARCHS for quant in QUANTS}


@pytest.fixture
def float_activations():
    """The packed kernels with float32 activations: exact products of the dequantised weights."""
    from localmoe.engine.torch_moe import ggml_quants

    before = ggml_quants.set_activations("float")
    yield
    ggml_quants.set_activations(before)


def _native(path: Path, **kw):
    from localmoe.engine.torch_moe import TorchMoEEngine

    engine = TorchMoEEngine(path, **kw)
    engine.load()
    return engine


@pytest.fixture(scope="session")
def reference(gguf_moes) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """llama.cpp's logits on the quantised file and on its dequantised copy, over the prompt and our greedy tokens."""
    from localmoe.engine import load
    from localmoe.engine.torch_moe import ggml_quants

    out = {}
    before = ggml_quants.set_activations("float")  # the greedy tokens of exact arithmetic
    try:
        decoded = {key: _native(q).decode_logits(PROMPT, STEPS)[0] for key, (q, _) in gguf_moes.items()}
    finally:
        ggml_quants.set_activations(before)
    for key, (q, deq) in gguf_moes.items():
        tokens = decoded[key]
        seq = PROMPT + tokens[:-1]
        out[key] = {"tokens": np.array(tokens), "seq": np.array(seq),
                    "quant": load(q, logits_all=True).logits(seq), "exact": load(deq, logits_all=True).logits(seq)}
    return out
