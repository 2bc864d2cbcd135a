from __future__ import annotations

import os
from pathlib import Path

# Under pytest-xdist each worker takes its share of the cores for torch's, OpenMP's and llama.cpp's thread pools
# (read when torch is first imported or a model loads, and inherited by the CLI subprocesses): two workers that each
# spin a pool as wide as the machine slow each other down. The kernel tests that exercise several threads set the
# count themselves.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    os.environ.setdefault("OMP_NUM_THREADS", _share)
    os.environ.setdefault("LOCALMOE_THREADS", _share)

import pytest  # noqa: E402
from gguf_models import float_activations, gguf_moes, reference  # noqa: E402, F401  (shared fixtures)

from helpers import built_once  # noqa: E402
from localmoe.home import models, paths  # noqa: E402


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own data dir, so no test sees another's database or the user's."""
    d = tmp_path / "home"
    monkeypatch.setenv("LOCALMOE_HOME", str(d))
    # a notice owed by an earlier test's in-process call would surface in this one's output (each real process
    # starts with none): which test ran before depends on the order, and under xdist on the worker
    paths.tightened.clear()
    return d


@pytest.fixture(scope="session")
def smollm() -> models.ModelRef:
    found = models.embedded_models()
    assert found, "the embedded SmolLM2 model is missing: run `make setup`"
    return found[0]


@pytest.fixture(scope="session")
def tiny_moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random-init Qwen3-MoE (3 layers, 8 experts, top-2) as a HF checkpoint and the same weights as GGUF
    (read-only: built once and kept between runs, see helpers.built_once)."""

    def build(root: Path) -> None:
        import synthetic_moe

        # init_std 0.05: large enough weights that a wrong conversion shows in the logits (see test_synthetic_moe)
        hf = synthetic_moe.build_hf_moe(root / "hf", "qwen3_moe", layers=3, experts=8, top_k=2, init_std=0.05)
        synthetic_moe.hf_to_gguf(hf, root / "tiny-moe.gguf")

    root = built_once(request.config, tmp_path_factory, "tiny_moe", {}, build)
    return root / "hf", root / "tiny-moe.gguf"


# The files that take longest (serial seconds, measured 2026-12-04), run first. `make test` hands whole files to two
# workers in collection order (--no-loadscope-reorder; xdist's own order is by test count, which put a 60 s file of
# two tests last, with one worker idle while the other ran it). A file not named keeps its place after these.
SLOW_FIRST = ("test_torch_moe.py", "test_gguf_native.py", "test_concurrency.py", "test_cli.py", "test_expert_store.py",
              "test_router.py", "test_tui.py", "test_calibrate.py", "test_settings_ui.py", "test_bench.py",
              "test_gguf_device.py", "test_pull.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: a file's tests keep their order
