"""The models screen through Textual's pilot, against a real data dir holding the embedded SmolLM2 and a real tiny MoE
GGUF: what it lists is what `localmoe models` computes, a tier set there is written to settings.toml and answers the
next question, and it stays readable on small and large terminals."""

from __future__ import annotations

import asyncio
import io
import shutil
import tomllib

from rich.console import Console
from test_tui import type_and_send, wait_for
from textual.widgets import DataTable

from localmoe.engine import GenerationConfig
from localmoe.home import inventory, settings
from localmoe.placement.plan import Budget
from localmoe.ui.app import LocalmoeApp
from localmoe.ui.chat import Answer, ChatScreen
from localmoe.ui.models_screen import COLUMNS, ModelsScreen, short_verdict


def screen_lines(app) -> list[str]:
    """What the terminal shows, as text (how export_screenshot renders the screen, without the SVG)."""
    console = Console(width=app.size.width, height=app.size.height, file=io.StringIO(), force_terminal=True,
                      record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True))
    return console.export_text().splitlines()


def notifications(app) -> list[str]:
    return [n.message for n in app._notifications]


def install(home, tiny_moe) -> None:
    (home / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_moe[1], home / "models" / "tiny-moe.gguf")


async def open_models(pilot, app) -> ModelsScreen:
    await pilot.press("f4")
    await wait_for(pilot, lambda: isinstance(app.screen, ModelsScreen) and app.screen.rows)
    return app.screen


def move_to(screen: ModelsScreen, model_id: str) -> None:
    screen.query_one(DataTable).move_cursor(row=[m.id for m in screen.rows].index(model_id))


def test_lists_local_and_catalog_models_and_sets_the_large_tier_the_next_question_uses(home, tiny_moe):
    install(home, tiny_moe)
    # the large tier names the dense model at first; the preference sends every question to the large tier
    (home / "settings.toml").write_text('[tiers]\nallow_remote = false\nlarge = "smollm2-135m-instruct"\n'
                                        '[router]\npreference = 0.001\nstrategy = "features"\n')
    expected = {m.id: m for m in inventory.local_models(Budget.detect())}
    assert set(expected) == {"smollm2-135m-instruct", "tiny-moe"}

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(80, 24)) as pilot:
            chat = app.screen
            await pilot.pause()
            assert "Models" in {c.title for c in app.get_system_commands(chat)}
            screen = await open_models(pilot, app)
            assert {"Set small", "Set large", "Pull command"} <= {c.title for c in app.get_system_commands(screen)}
            by_id = {m.id: m for m in screen.rows}
            table = screen.query_one(DataTable)
            for model_id, want in expected.items():  # what `localmoe models` computes, with the same verdict
                got = by_id[model_id]
                assert (got.source, got.engine, got.layers, got.experts, got.top_k, got.quant, got.size_bytes) == (
                    want.source, want.engine, want.layers, want.experts, want.top_k, want.quant, want.size_bytes)
                assert got.verdict == want.verdict and got.verdict.kind in ("vram", "ram")
                row = table.get_row_at([m.id for m in screen.rows].index(model_id))
                assert str(row[COLUMNS.index("Verdict")]) == short_verdict(got)
            assert by_id["tiny-moe"].layout_text() == "3L 8E k2" and by_id["smollm2-135m-instruct"].experts == 0
            catalog = [m for m in screen.rows if m.source == "catalog"]
            assert catalog and all(m.verdict is not None and m.pull_command for m in catalog)

            # on 80 columns the verdict and the engine stay on screen, for the embedded model and the MoE alike
            lines = screen_lines(app)
            for model_id in expected:
                line = next(v for v in lines if v.split() and v.split()[0] == model_id)  # the id whole
                assert short_verdict(by_id[model_id]) in line and "llama.cpp" in line

            # a catalog file that is not installed cannot be a tier: one line, nothing written
            qwen = next(m for m in catalog if not m.installed)
            move_to(screen, qwen.id)
            await pilot.pause()
            assert f"localmoe pull {qwen.id}" in str(screen.query_one("#model-detail").render())
            await pilot.press("l")
            await pilot.pause()
            [error] = [n for n in notifications(app) if "not installed" in n]
            assert "\n" not in error and f"localmoe pull {qwen.id}" in error
            assert settings.load().large == "smollm2-135m-instruct"

            move_to(screen, "tiny-moe")
            await pilot.press("l")
            await wait_for(pilot, lambda: settings.load().large == "tiny-moe")
            tier_cell = table.get_row_at([m.id for m in screen.rows].index("tiny-moe"))[COLUMNS.index("Tier")]
            assert tier_cell == "large"
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen) and chat.assistant is not None)

            await type_and_send(pilot, "Which city is the capital of Japan?")
            await wait_for(pilot, lambda: chat.query(Answer) and chat.query(Answer)[0].done)
            answer = chat.query(Answer)[0]
            assert answer.decision.tier == "large" and answer.model == "tiny-moe"

    asyncio.run(run())
    written = tomllib.loads((home / "settings.toml").read_text())
    assert written["tiers"] == {"allow_remote": False, "large": "tiny-moe"}  # the rest of the file kept
    assert written["router"] == {"preference": 0.001, "strategy": "features"}


def test_a_tier_the_checks_refuse_is_one_line_and_the_file_stays(home, tiny_moe):
    """The file went away after the screen listed it: settings.update's own check (models.resolve) refuses."""
    install(home, tiny_moe)

    async def run() -> None:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(200, 60)) as pilot:
            screen = await open_models(pilot, app)
            # on 200 columns every column is in view, the id whole
            header = next(v for v in screen_lines(app) if "Model" in v and "Verdict" in v)
            assert all(c in header for c in COLUMNS)
            await pilot.resize_terminal(80, 24)  # the id column gives the room back: the layout is in view again
            await pilot.pause()
            line = next(v for v in screen_lines(app) if v.split() and v.split()[0] == "tiny-moe")
            assert "fits in RAM" in line or "fits in VRAM" in line
            assert "llama.cpp" in line and "3L 8E k2" in line
            move_to(screen, "tiny-moe")
            (home / "models" / "tiny-moe.gguf").unlink()
            await pilot.press("s")
            await pilot.pause()
            [error] = [n for n in notifications(app) if "small tier" in n]
            assert "unknown model 'tiny-moe'" in error and "\n" not in error
            assert not (home / "settings.toml").exists()
            await pilot.press("escape")
            await wait_for(pilot, lambda: isinstance(app.screen, ChatScreen))

    asyncio.run(run())


def test_the_engine_column_is_the_planners_choice(home, tiny_moe):
    """Where llama.cpp cannot hold the MoE and the native expert cache can, the row names the engine create_engine
    will load (torch) with that engine's verdict and reason, as `localmoe plan` says."""
    from localmoe.placement import plan

    install(home, tiny_moe)
    native = plan.native_gguf_plan(*plan.native_gguf_view(str(tiny_moe[1])), Budget(0, 8 * 1024**3))
    budget = Budget(0, plan.RAM_RESERVE + native.fast_bytes + 8 * 1024**2, source="override")
    [moe] = [m for m in inventory.local_models(budget) if m.id == "tiny-moe"]
    assert moe.engine == "torch" and moe.verdict.kind == "ram"
    assert moe.engine_reason.startswith("llama.cpp cannot run it here")
    [roomy] = [m for m in inventory.local_models(Budget(0, 8 * 1024**3)) if m.id == "tiny-moe"]
    assert roomy.engine == "llama.cpp" and roomy.verdict.label == "fits in RAM"


def test_d_downloads_a_catalog_file_with_a_progress_bar_and_lists_it_installed(home, tiny_moe, monkeypatch):
    import socket

    from hub_standin import StandinHub, tiny_catalog_entry
    from textual.widgets import ProgressBar, Static

    from localmoe.home import catalog, pull

    data = tiny_moe[1].read_bytes()
    repo, name = "test-org/tiny-moe-GGUF", "tiny-moe-F32.gguf"
    entry = tiny_catalog_entry(data, repo, name)
    shipped = catalog.entries()
    monkeypatch.setattr(catalog, "entries", lambda: (*shipped, entry))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(pull, "CHUNK", 4096)
    seen: list[tuple[int, int]] = []
    real = pull.download
    monkeypatch.setattr(pull, "download", lambda t, progress=True, on_progress=None: real(
        t, progress, lambda d, n: (seen.append((d, n)), on_progress(d, n))))

    async def run(endpoint: str) -> tuple[ModelsScreen, str, float | None, list[str]]:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        app = LocalmoeApp(config=GenerationConfig(max_tokens=8, temperature=0.0))
        async with app.run_test(size=(100, 30)) as pilot:
            screen = await open_models(pilot, app)
            row = next(m for m in screen.rows if m.candidate is not None and m.candidate.entry.id == "tiny-moe")
            move_to(screen, row.id)
            await pilot.press("d")
            await wait_for(pilot, lambda: screen.pulling is None and any(
                m.candidate is not None and m.candidate.entry.id == "tiny-moe" and m.installed
                for m in screen.rows) or str(screen.query_one("#pull-status", Static).render()).startswith(
                "Pull failed"))
            bar = screen.query_one("#pull-bar", ProgressBar)
            status = str(screen.query_one("#pull-status", Static).render())
            # a failed pull leaves no bar that still looks busy; a finished one shows it full
            assert bar.display == (not status.startswith("Pull failed")), status
            return screen, status, bar.percentage, screen_lines(app)

    with StandinHub({repo: {name: data}}) as h:
        screen, status, pct, _ = asyncio.run(run(h.url))
    assert pct == 1.0 and status.startswith("Pulled tiny-moe")
    assert seen and seen[-1] == (len(data), len(data)) and [d for d, _ in seen] == sorted({d for d, _ in seen})
    pulled = [p for p in (home / "models").glob("*.gguf")]
    assert len(pulled) == 1 and pulled[0].read_bytes() == data
    row = next(m for m in screen.rows if m.candidate is not None and m.candidate.entry.id == "tiny-moe")
    assert row.installed

    pulled[0].unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    screen, status, _, lines = asyncio.run(run(f"http://127.0.0.1:{port}"))
    assert status.startswith("Pull failed: cannot reach the hub at http://127.0.0.1:") and "\n" not in status
    assert not any("Traceback" in line for line in lines)
