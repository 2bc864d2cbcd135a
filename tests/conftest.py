from __future__ import annotations

from pathlib import Path

import pytest

from localmoe.home import models


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir, so no test sees another's database or the user's."""
    d = tmp_path / "home"
    monkeypatch.setenv("LOCALMOE_HOME", str(d))
    return d


@pytest.fixture(scope="session")
def smollm() -> models.ModelRef:
    found = models.embedded_models()
    assert found, "the embedded SmolLM2 model is missing: run `make setup`"
    return found[0]


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-init Qwen3-MoE (3 layers, 8 experts, top-2) as a HF checkpoint and the same weights as GGUF."""
    import synthetic_moe

    root = tmp_path_factory.mktemp("tiny_moe")
    # init_std 0.05: large enough weights that a wrong conversion shows in the logits (see test_synthetic_moe)
    hf = synthetic_moe.build_hf_moe(root / "hf", "qwen3_moe", layers=3, experts=8, top_k=2, init_std=0.05)
    return hf, synthetic_moe.hf_to_gguf(hf, root / "tiny-moe.gguf")
