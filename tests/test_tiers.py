"""Promises about tiers and the chat command: the default large tier is the largest installed MoE that fits, and
`localmoe` / `localmoe chat -m` start the app on the model asked for."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from localmoe import cli
from localmoe.errors import LocalmoeError
from localmoe.home import models, paths
from localmoe.placement import plan


def test_the_default_large_tier_is_the_largest_installed_moe_that_fits(home, tiny_moe, smollm, monkeypatch):
    d = paths.models_dir()
    d.mkdir(parents=True)
    shutil.copy(tiny_moe[1], d / "small-moe.gguf")
    with open(tiny_moe[1], "rb") as src, open(d / "big-moe.gguf", "wb") as dst:
        dst.write(src.read() + b"\0" * 4096)  # the same tensors in a larger file: the larger of two MoEs
    shutil.copy(smollm.path, d / "dense.gguf")  # larger than both, but dense: never the large tier
    assert (d / "dense.gguf").stat().st_size > (d / "big-moe.gguf").stat().st_size
    assert models.tier_model("large").id == "big-moe"
    # the most parameters win over the most bytes (a 4-bit file of a bigger model is the smaller file)
    from dataclasses import replace

    from localmoe.placement import layout as layout_mod

    real = layout_mod.read_model_layout
    monkeypatch.setattr(layout_mod, "read_model_layout", lambda p: replace(
        real(p), n_params=real(p).n_params // 2) if Path(p).name == "big-moe.gguf" else real(p))
    assert models.tier_model("large").id == "small-moe"
    monkeypatch.setattr(layout_mod, "read_model_layout", real)
    # nothing fits a tiny budget: a clear error, not a model that cannot run
    monkeypatch.setattr(plan.Budget, "detect", classmethod(lambda cls, vram=None, ram=None: cls(0, 64 * 2**20)))
    with pytest.raises(LocalmoeError, match="fits here"):
        models.tier_model("large")


@pytest.mark.parametrize(("argv", "model"), [([], None), (["chat"], None), (["chat", "-m", "smollm2"], "smollm2")])
def test_the_chat_command_starts_the_app_on_the_model_asked_for(home, argv, model, monkeypatch):
    started = []
    import localmoe.ui.app as app

    monkeypatch.setattr(app, "run_app", lambda model=None: started.append(model) or 0)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cli.main(argv) == 0
    assert started == [model]


def test_no_model_for_any_tier_names_the_command_that_installs_one(home, monkeypatch):
    """Without the embedded model and with no tier configured, `ask` says in one line how this installation gets
    the model (here, a checkout: `make setup`), not a traceback."""
    from localmoe.chat.assistant import Assistant
    from localmoe.home import install

    monkeypatch.setattr(models, "default_model", lambda: (_ for _ in ()).throw(LocalmoeError("no embedded model")))
    with pytest.raises(LocalmoeError) as caught:
        Assistant().available("small")
    assert f"`{install.install_command()}`" in str(caught.value) and "\n" not in str(caught.value)
    assert install.install_command() == "make setup"


@pytest.mark.parametrize("small", ["nosuch-model", "broken"])
def test_a_broken_small_tier_in_settings_is_named_as_the_cause(home, tmp_path, small, capsys):
    """With the embedded model installed, a small tier settings.toml names that does not exist or does not load is
    the reason no model can answer: the one-line error says so (it said "install the embedded model")."""
    if small == "broken":
        bad = tmp_path / "x.gguf"
        bad.write_bytes(b"\x00" * 4096)
        small = str(bad)
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text(f'[tiers]\nsmall = "{small}"\n')
    (home / "settings.toml").chmod(0o600)  # else a notice says it was made private
    # route does not load models: a file that is there but broken is found out by ask
    for argv in (["ask", "hi"], ["route", "hi"]) if small == "nosuch-model" else (["ask", "hi"],):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("localmoe: error: no model can answer: the small tier"), err
        assert "install the embedded model" not in err[0]
        assert ("unknown model 'nosuch-model'" if small == "nosuch-model" else "not a GGUF model file") in err[0]


UNREADABLE_ROUTER = "router.json is unreadable"


def broken_router_and_missing_large_tier(home) -> None:
    """A router file that does not parse (the router's own notice, made when it is built) and a large tier that
    does not exist (the assistant's)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nlarge = "nosuch-model"\n')
    (home / "router.json").write_text("{not json")
    for name in ("settings.toml", "router.json"):
        (home / name).chmod(0o600)


def test_each_notice_is_said_once_by_ask(home):
    """The router's own notice (an unreadable router file) is both the assistant's and its first decision's: `ask`
    says it once, then the fallback, as separate lines. Calibrating with a large tier that does not exist is not
    offered."""
    from helpers import run_cli

    broken_router_and_missing_large_tier(home)
    r = run_cli("ask", "What is 17 * 23?", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if line.startswith("localmoe: notice: ")]
    assert r.stderr.count(UNREADABLE_ROUTER) == 1, r.stderr
    assert "localmoe: notice: no large model is available; the small model answers instead" in notes, notes
    assert "the large tier (nosuch-model) is unavailable" in r.stderr and "calibrat" not in r.stderr, r.stderr
    assert len(notes) == len(set(notes)) == 3, notes
    # a tier named: the router is not asked, and its notice does not apply
    named = run_cli("ask", "What is 17 * 23?", "--max-tokens", "4", "--tier", "small")
    assert named.returncode == 0 and UNREADABLE_ROUTER not in named.stderr, named.stderr


def test_calibration_is_offered_for_a_named_large_tier_only_when_it_exists(home, tiny_moe):
    """The shipped router was never calibrated: a large tier named in settings.toml gets the offer; one that does not
    exist gets its own notice instead, not an offer to calibrate with it."""
    from localmoe.chat.assistant import Assistant

    home.mkdir(parents=True, exist_ok=True)
    offer = f"has not been calibrated with your large tier ({tiny_moe[1]})"
    (home / "settings.toml").write_text(f'[tiers]\nlarge = "{tiny_moe[1]}"\n')
    assert sum(offer in n for n in Assistant().notices) == 1
    (home / "settings.toml").write_text('[tiers]\nlarge = "nosuch-model"\n')
    notices = Assistant().notices
    assert not any("calibrat" in n for n in notices) and any("(nosuch-model) is unavailable" in n for n in notices)
    # a router calibrated with a large tier that is gone since, or named anew and missing: no offer either (it read
    # the missing tier as "the default" and offered to calibrate for that)
    import json
    from importlib.resources import files

    router = json.loads(files("localmoe.assets").joinpath("router", "router.json").read_text())
    router["tiers"] = {"small": None, "small_id": "smollm2-135m-instruct", "large": "gone-model",
                       "large_id": "gone-model", "large_path": "/nowhere/gone-model.gguf"}
    (home / "router.json").write_text(json.dumps(router))
    for large in ("gone-model", "nosuch-model"):
        (home / "settings.toml").write_text(f'[tiers]\nlarge = "{large}"\n')
        notices = Assistant().notices
        assert not any("calibrat" in n for n in notices) and any(f"({large}) is unavailable" in n for n in notices)


def test_the_chat_tells_the_routers_notice_once(home):
    """The chat shows the router's notice when the model is ready; the first decision carries it again (its JSON
    and the routing log keep it), and the chat does not show it a second time."""
    import asyncio

    from test_tui import type_and_send, wait_for

    from localmoe.engine import GenerationConfig
    from localmoe.ui.app import LocalmoeApp
    from localmoe.ui.chat import Answer

    broken_router_and_missing_large_tier(home)
    router_notice = UNREADABLE_ROUTER

    async def run() -> list[str]:
        app = LocalmoeApp(config=GenerationConfig(max_tokens=4, temperature=0.0))
        async with app.run_test(size=(100, 40)) as pilot:
            screen = app.screen
            await wait_for(pilot, lambda: screen.assistant is not None
                           and any(router_notice in n.message for n in app._notifications))
            await type_and_send(pilot, "What is 17 * 23?")
            await wait_for(pilot, lambda: len(screen.query(Answer)) == 1 and screen.query(Answer)[0].done)
            decision = screen.query(Answer)[0].decision
            assert decision is not None and router_notice in decision.notice  # still carried by the decision
            return [n.message for n in app._notifications]

    shown = asyncio.run(run())
    assert sum(router_notice in n for n in shown) == 1, shown
    assert any("no large model is available; the small model answers instead" in n for n in shown), shown


def test_a_broken_large_tier_without_the_embedded_model_names_both_causes(home, monkeypatch):
    from localmoe.chat.assistant import Assistant
    from localmoe.home import install

    monkeypatch.setattr(models, "default_model", lambda: (_ for _ in ()).throw(LocalmoeError("no embedded model")))
    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nlarge = "nosuch-model"\n')
    with pytest.raises(LocalmoeError) as caught:
        Assistant().available("large")
    message = str(caught.value)
    assert "the large tier (nosuch-model) is unavailable" in message and "\n" not in message
    assert f"install the embedded model (`{install.install_command()}`)" in message


def test_the_cascade_with_nothing_larger_says_its_answer_stands_and_warns(home):
    """With no larger tier the cascade's small answer is never judged: its reason says nothing can take over
    (it said the large model would), and a likely-wrong question is marked as under the other strategies."""
    import json

    from helpers import run_cli

    hard = json.loads(run_cli("route", "What is 4821 * 317?", "--json", "--strategy", "cascade").stdout)
    assert hard["tier"] == "small" and "no larger model is installed to take over" in hard["reason"]
    assert hard["score"] >= hard["threshold"] and hard["probably_wrong"] and "likely wrong" in hard["warning"]
    easy = json.loads(run_cli("route", "What is 4821 * 317?", "--json", "--strategy", "cascade",
                              "--preference", "0.99").stdout)
    assert easy["score"] < 0.99 and not easy["probably_wrong"] and easy["warning"] is None


def test_a_question_over_the_limit_is_refused_before_any_notice(home):
    """A pasted 300 KB question is refused in one line; what the router would say of the tiers does not come first."""
    from helpers import run_cli

    home.mkdir(parents=True, exist_ok=True)
    (home / "settings.toml").write_text('[tiers]\nlarge = "nosuch-model"\n')
    (home / "settings.toml").chmod(0o600)
    r = run_cli("ask", "-", input="word " * 60_000)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "localmoe: error: the prompt is 299,999 characters; the limit is 200,000"], r.stderr
