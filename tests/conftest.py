from __future__ import annotations

from pathlib import Path

import pytest

from localmoe import models


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
