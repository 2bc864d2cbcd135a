"""The `localmoe` command: a thin layer over the core. Errors become one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from localmoe import __version__
from localmoe.errors import LocalmoeError, UsageError
from localmoe.units import human_bytes


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


class _Parser(argparse.ArgumentParser):
    """argparse that refuses bad input in one line (exit 2), in JSON under --json, and suggests the closest
    command for a misspelt one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if "invalid choice" in message and "argument COMMAND" in message:
            import difflib
            import re

            m = re.search(r"invalid choice: '([^']*)'", message)
            names = sorted(self._subcommands())
            close = difflib.get_close_matches(m.group(1), names, n=1) if m else []
            message = f"unknown command {m.group(1)!r}" if m else message
            if close:
                message += f" (did you mean {close[0]!r}?)"
        _report_error(f"{message} (see `{self.prog} --help`)", json_out="--json" in _ARGV)
        raise SystemExit(2)

    def _subcommands(self) -> list[str]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return list(action.choices)
        return []


def _report_error(message: str, json_out: bool = False) -> None:
    """The one way a command fails: one line on stderr (and a JSON error object on stdout under --json)."""
    if json_out:
        print(json.dumps({"status": "error", "error": message}))
    print(f"localmoe: error: {message}", file=sys.stderr)


def _confirmed(what: str, declined: str) -> bool:
    """Ask `what? [y/N]` on the terminal; False (after saying `declined`) unless the answer is yes. A script must
    pass --yes: nobody is there to answer."""
    if not sys.stdin.isatty():
        raise UsageError(f"{what}: needs a confirmation; run it in a terminal or add --yes")
    sys.stderr.write(f"{what}? [y/N] ")
    sys.stderr.flush()
    if sys.stdin.readline().strip().lower() in ("y", "yes"):
        return True
    print(declined, file=sys.stderr)
    return False


def _whole_number(text: str, lo: int, hi: int | None = None, what: str = "a whole number", note: str = "") -> int:
    """An argparse value in [lo, hi], or a one-line reason it is not (`note` follows the bound it breaks)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if hi is not None and not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"{value} is outside {lo}-{hi}{note}")
    if value < lo:
        raise argparse.ArgumentTypeError(f"{value} is below {lo}{note}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 5:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{value} is outside 0-5 (0 = greedy)")
    return value


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=False))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_ask(args: argparse.Namespace) -> int:
    from localmoe.chat.display import stats_line
    from localmoe.chat.session import Session
    from localmoe.engine import GenerationConfig

    prompt = _prompt_arg(args)
    overrides = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                   ("seed", args.seed)) if v is not None}
    options = _engine_options(args)
    if args.backend and not args.model:
        raise LocalmoeError("--backend needs --model (a .gguf file or a checkpoint directory)")
    if options and not args.model:
        raise LocalmoeError(f"{_first_flag(options)} needs --model (a Hugging Face checkpoint directory)")
    from localmoe.home import settings

    user_settings = settings.load()
    off_record = args.no_log or not (args.log or user_settings.record)  # [privacy] record = false: --log records
    if off_record and (args.cont or args.conversation is not None):
        # continuing means reading the history from the database, and a follow-up usually wants the record too
        if args.no_log:
            raise UsageError("--no-log cannot continue a recorded conversation (-c/--conversation)")
        raise UsageError("recording is off ([privacy] record = false in settings.toml): add --log to continue a "
                         "recorded conversation and record this answer")
    args.no_log = off_record
    recorder = None
    if args.no_log:
        from localmoe.record.recorder import Recorder

        recorder = Recorder.in_memory()  # the same path through the code, with nothing reaching the database
    if args.model:  # an explicit model: no routing
        from localmoe.home import models

        if args.tier:
            raise LocalmoeError("--model and --tier exclude each other")
        ref = models.resolve(args.model)
        if args.backend:  # the engine asked for, even where the planner would choose the other one
            ref = models.with_backend(ref, args.backend)
        ref = _check_torch_options(options, ref)
        session = Session(ref, engine_options=options, recorder=recorder, meter=user_settings.meter)
        session.config = GenerationConfig(**{**models.generation_defaults(ref), **overrides})
        target, closer, route = session, session.close, None
        notices = [*session.warnings, *filter(None, [user_settings.unknown_notice()])]
    else:
        from localmoe.chat.assistant import Assistant

        assistant = Assistant(overrides=overrides, strategy=args.strategy, preference=args.preference,
                              recorder=recorder, user_settings=user_settings)
        target, closer = assistant, assistant.close
        notices = list(assistant.notices)
    reply = None
    try:
        if args.cont or args.conversation is not None:
            _resume(target, args.conversation)
        reply = target.ask(prompt, tier=args.tier) if not args.model else target.ask(prompt)
        if not args.model:
            notices = list(target.notices)  # tiers resolve while routing: their notices exist only now
            if args.tier:  # a tier named: the router was not asked, so what it has to say does not apply
                notices = [n for n in notices if n not in target.router.notices]
        route = getattr(reply, "decision", None)
        if route is not None:  # the router's own notices are the assistant's too: each is said once
            notices += route.notices
        if route is not None:
            reply.on_escalate = lambda r: print(f"\nlocalmoe: {r.decision.reason}; the large model answers:"
                                                + (f"\nlocalmoe: notice: {r.remote_notice}" if r.remote_notice
                                                   else ""), file=sys.stderr, flush=True)
        for notice in dict.fromkeys(n for n in notices if n):
            print(f"localmoe: notice: {notice}", file=sys.stderr)
        if args.json:
            reply.run()
            out = reply.to_dict()
            if args.no_log:  # ids of a scratch database would name rows that do not exist
                out.update(conversation_id=None, message_id=None)
            _print_json({**out, "recorded": not args.no_log})
        else:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()  # the answer before the notes about it, also when stdout is a pipe
            if route is not None and route.warning:
                print(f"localmoe: warning: {route.warning}", file=sys.stderr)
            final = reply.reply if route is not None else reply
            if final is not None and final.stats is not None and final.stats.stop_reason == "repetition":
                print(f"localmoe: note: stopped a loop ({final.stats.repetition}); the answer keeps its first "
                      "round", file=sys.stderr)
            if final is not None and final.stats is not None and final.stats.dropped_exchanges:
                n = final.stats.dropped_exchanges
                print(f"localmoe: note: the conversation outgrew {final.model}'s context: its {n} oldest "
                      f"exchange{'s' if n > 1 else ''} left the prompt (still recorded)", file=sys.stderr)
            if final is not None and final.stats is not None and final.stats.stop_reason == "length":
                print(f"localmoe: note: cut off at {final.stats.completion_tokens} tokens (--max-tokens N allows "
                      "more)", file=sys.stderr)
            if sys.stderr.isatty():
                line = stats_line(final.model, final.stats, final.status, final.energy, final.experts, route)
                print(f"\x1b[2m{line}\x1b[0m", file=sys.stderr)
    except KeyboardInterrupt:
        # say what was kept: nothing off the record, the question alone before the answer began
        if args.no_log:
            kept = "nothing is recorded: recording is off"
        elif reply is None:
            kept = "before the answer began"
        else:
            kept = "the question and the partial answer are recorded"
        print(f"\nlocalmoe: interrupted ({kept})", file=sys.stderr)
        if args.json and reply is not None:
            try:
                out = {**reply.to_dict(), "status": "interrupted", "recorded": not args.no_log}
            except Exception:  # noqa: BLE001 - a reply cut short before its stats: the status alone
                out = {"status": "interrupted", "recorded": not args.no_log}
            if args.no_log:
                out.update(conversation_id=None, message_id=None)
            _print_json(out)
        return 130
    finally:
        closer()
    return 0


def _resume(target: Any, conversation_id: int | None) -> None:
    """Put a recorded conversation (the latest chat one when no id is given) into the asker's context."""
    rec = target.recorder
    cid = conversation_id if conversation_id is not None else rec.latest_conversation_id()
    if cid is None:
        raise UsageError("there is no conversation to continue yet: ask without -c first")
    messages = rec.conversation_messages(cid)
    if not messages:
        raise UsageError(f"there is no conversation {cid} (see `localmoe logs`)")
    target.conversation.resume(cid, messages)


def cmd_route(args: argparse.Namespace) -> int:
    from localmoe.chat.assistant import Assistant

    prompt = _prompt_arg(args)
    assistant = Assistant(strategy=args.strategy, preference=args.preference)
    try:
        decision = assistant.route(prompt, tier=None, load=False)
    finally:
        assistant.close()
    # what the assistant found while loading (a misspelt setting, a missing tier) that the decision does not carry
    extra = [n for n in assistant.notices if n not in decision.notices]
    if args.json:
        out = decision.to_dict()
        if extra:
            out["notice"] = "; ".join([*extra, *filter(None, [out.get("notice")])])
        if decision.strategy in ("features", "learned", "probe", "cascade"):
            # what each named preference would set the threshold to, so a user can see what they choose between
            out["preferences"] = assistant.router.preferences(decision.strategy)
            bought = assistant.router.preference_outcomes(decision.strategy)
            # where the thresholds come from: a user reads "quality" differently when no large answer was graded
            out["preferences_from"] = ("recorded outcomes of both tiers" if bought else
                                       "the fixed table (no large tier's answers recorded; `localmoe router "
                                       "calibrate` measures them)")
            if bought:
                out["preference_outcomes"] = bought
        _print_json(out)
        return 0
    print(f"{decision.tier} ({decision.model}) · {decision.strategy} · score {decision.score:.2f} vs threshold "
          f"{decision.threshold:.2f} · {decision.latency_ms:.1f} ms")
    print(decision.reason)
    for notice in [*extra, *decision.notices]:
        print(f"notice: {notice}")
    return 0


def cmd_router_train(args: argparse.Namespace) -> int:
    from localmoe.home import models, paths
    from localmoe.home.paths import data_dir
    from localmoe.record.recorder import Recorder
    from localmoe.routing import calibrate
    from localmoe.routing import train as router_train
    from localmoe.routing.probe import Prober
    from localmoe.routing.router import ROUTER_FILE, TokenEmbedder

    out = Path(args.out) if args.out else data_dir() / ROUTER_FILE
    if not args.shipped and (run_id := calibrate.calibration_of(out)) is not None:
        with Recorder() as rec:
            result = calibrate.retrain(rec, run_id, router_out=out)
        print(f"retrained the router calibrated on run {run_id} ({result['n']} questions on your tiers) with "
              f"{sum(result['training_labels'].values())} labels ("
              + ", ".join(f"{n} {src}" for src, n in result["training_labels"].items()) + "); "
              f"default strategy: {result['default_strategy']}; written to {out}")
        return 0
    small = models.default_model()
    rows = router_train.shipped_labels()
    if not args.shipped:
        with Recorder() as rec:
            rows += router_train.collected_labels(rec, small.id)
    trained = router_train.train(rows, TokenEmbedder(small.path), prober=Prober(small.path))
    try:
        if args.out:
            out.write_text(json.dumps(trained, indent=1))
        else:
            paths.write_private(out, json.dumps(trained, indent=1))
    except OSError as exc:
        raise LocalmoeError(f"cannot write {out}: {exc.strerror or exc}") from None
    ev = trained["evaluation"]
    print(f"trained on {ev['n_train']} labels, evaluated on {ev['n_test']} held out "
          f"(sources: {', '.join(trained['sources'])}); small-tier accuracy {ev['small_accuracy']:.1%}")
    rows_out = [[name, f"{auc:.3f}", f"{ev['large_share'].get(name, 0):.0%}", f"{ev['apgr'].get(name, 0):.3f}"]
                for name, auc in ev["auc"].items()]
    print(_table(rows_out, ["STRATEGY", "HELD-OUT AUC", "LARGE SHARE (balanced)", "APGR"]))
    shares = [share for share, _ in next(iter(ev["curve"].values()))]
    print("accuracy vs share of questions sent to the large tier (held out; a large tier that is always right):")
    print(_table([[name] + [f"{acc:.0%}" for _, acc in pts] for name, pts in ev["curve"].items()],
                 ["STRATEGY"] + [f"{s:.0%}" for s in shares]))
    print(f"default strategy: {trained['default_strategy']}; written to {out}")
    return 0


def cmd_router_calibrate(args: argparse.Namespace) -> int:
    from localmoe.record.recorder import Recorder
    from localmoe.routing import calibrate

    tty = sys.stderr.isatty()

    def on_start(run_id: int, questions: int, tiers: calibrate.Tiers) -> None:
        print(f"localmoe: calibration run {run_id}: {questions} questions on the small tier ({tiers.small.id}) and "
              f"the large tier ({tiers.large.id}), greedy", file=sys.stderr)
        if questions < calibrate.RECOMMENDED:
            print(f"localmoe: note: {questions} questions give rough thresholds ({calibrate.RECOMMENDED}+ "
                  "recommended)", file=sys.stderr)

    def progress(done: int, total: int, tier: str) -> None:
        bar = "█" * (30 * done // max(total, 1))
        what = "the small tier reads each question" if tier == "probe" else f"{tier} tier"
        line = f"calibrating {bar:<30} {done}/{total} ({what})"
        print(f"\r{line}" if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)

    with Recorder() as rec:
        try:
            result = calibrate.run(rec, suite=args.suite, limit=args.limit, resume=args.resume,
                                   progress=progress, on_start=on_start)
        except KeyboardInterrupt:
            print("\nlocalmoe: calibration interrupted; the answers so far are kept. Continue with "
                  "`localmoe router calibrate --resume`.", file=sys.stderr)
            return 130
        finally:
            if tty:
                print(file=sys.stderr)
    if args.json:
        _print_json(result)
        return 0
    t = result["tiers"]
    estimate = "" if result["measured"] else ", estimated"
    print(f"calibrated on {result['n']} questions (run {result['run_id']}; joules: {result['meter']}{estimate})")
    for tier in ("small", "large"):
        print(f"  {tier} tier {t[tier + '_id']}: {result[tier + '_accuracy']:.0%} right, "
              f"{result[tier + '_joules']:.3g} J/question")
    print("accuracy · joules per question (actual large share) as more questions go to the large tier:")
    headers, rows = calibrate.curve_rows(result)
    print(_table(rows, headers))
    print("preferences (threshold: large share, accuracy, joules per question):")
    print(_table([[name] + [f"{p[k]['threshold']:.3f}: {p[k]['large_share']:.0%}, {p[k]['accuracy']:.0%}, "
                            f"{p[k]['joules']:.3g} J" for k in ("quality", "balanced", "energy")]
                  for name, p in result["preferences"].items()], ["STRATEGY", "QUALITY", "BALANCED", "ENERGY"]))
    labels = ", ".join(f"{n} {src}" for src, n in result["training_labels"].items())
    print(f"retrained on {labels}; default strategy {result['default_strategy']}; written to {result['router']}")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from collections import Counter

    from localmoe.chat.session import Session
    from localmoe.engine import GenerationConfig
    from localmoe.experts.trace import Trace

    prompt = _prompt_arg(args)
    options = _engine_options(args)
    if options:
        from localmoe.home import models

        model = _check_torch_options(options, models.resolve(args.model) if args.model else models.default_model())
    session = Session(model if options else args.model, engine_options={"telemetry": True, **options})
    try:
        engine = session.engine
        shape = engine.moe_shape()
        if shape is None:
            raise LocalmoeError(f"{session.model.id} is a dense model: it has no experts to trace")
        # the catalog's sampling only: no penalty or loop guard, so a trace records the model's own choices
        session.config = GenerationConfig(**{**session.model.defaults, "max_tokens": args.max_tokens,
                                             **({"temperature": args.temperature} if args.temperature is not None
                                                else {})})
        reply = session.ask(prompt).run()
        trace = Trace(session.model.id, engine.backend, *shape, list(engine.routing))
        trace.save(args.out)
    finally:
        session.close()
    counts = Counter(e for t in trace.tokens for layer in t.experts for e in layer)
    hot = ", ".join(f"{e}×{n}" for e, n in counts.most_common(5))
    # the last generated token is sampled but never evaluated: it routes nothing and has no record
    phases = Counter(t.phase for t in trace.tokens)
    print(f"traced {len(trace.tokens)} tokens × {trace.n_layers} layers ({phases['prompt']} prompt, "
          f"{phases['decode']} generated and evaluated of {reply.stats.completion_tokens}) → {args.out}")
    print(f"most used experts (all layers): {hot}")
    return 0


def _prompt_arg(args: argparse.Namespace) -> str:
    """The prompt from the positional argument ('-': standard input) or --prompt-file, never both."""
    if getattr(args, "prompt_file", None):
        if args.prompt:
            raise LocalmoeError("give the prompt as an argument or with --prompt-file, not both")
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise LocalmoeError(f"cannot read prompt file {args.prompt_file}: {exc}") from None
        except UnicodeDecodeError as exc:
            raise UsageError(f"prompt file {args.prompt_file} is not UTF-8 text (byte {exc.object[exc.start]:#04x} "
                             f"at offset {exc.start})") from None
    elif args.prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8-sig")  # a byte-order mark is not part of the question
        except UnicodeDecodeError as exc:
            raise UsageError(f"standard input is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                             f"{exc.start})") from None
    else:
        prompt = args.prompt or ""
    try:
        prompt.encode("utf-8")  # an argument in another encoding arrives with surrogates for its odd bytes
    except UnicodeEncodeError:
        raise UsageError("the prompt is not UTF-8 text") from None
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    return prompt.strip()  # the newline `echo` ends a piped question with is not part of it


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """Torch-engine options given on the command line (each only when set), checked by TorchOptions."""
    from localmoe.engine.torch_moe.options import TorchOptions

    names = [f.name for f in TorchOptions.flags()]
    options = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    TorchOptions(**options)  # a bad value is one line now, not after a model has loaded
    return options


def _first_flag(options: dict[str, Any]) -> str:
    return "--" + next(iter(options)).replace("_", "-")


def _check_torch_options(options: dict[str, Any], ref: Any) -> Any:
    """The ref the options run on: torch-engine options on a GGUF MoE the native engine runs ask for that engine;
    on a model another engine runs (or pinned to llama.cpp) they are a mistake, said in one line, not ignored."""
    if not options or ref.backend == "torch":
        return ref
    if not ref.pinned and ref.backend == "llama.cpp" and ref.path.suffix.lower() == ".gguf":
        from localmoe.home import models

        try:
            return models.with_backend(ref, "torch")
        except LocalmoeError as exc:
            raise UsageError(f"{_first_flag(options)} applies to the torch engine, and {exc}") from None
    raise LocalmoeError(f"{_first_flag(options)} applies to the torch engine (checkpoint directories and GGUF MoE "
                        f"models), not to {ref.backend}")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """One flag per TorchOptions field that has help text; None when not given, so the engine's default applies."""
    from localmoe.engine.torch_moe.options import TorchOptions

    kinds: dict[Any, dict[str, Any]] = {"bytes": {"type": _size}, float: {"type": float},
                                        "switch": {"action": argparse.BooleanOptionalAction},
                                        "flag": {"action": "store_true"}}
    g = p.add_argument_group("torch engine (checkpoint directories, GGUF MoE models; on a GGUF they ask for it)")
    for f in TorchOptions.flags():
        extra = dict(kinds[f.metadata["type"]]) if "type" in f.metadata else {}
        if "choices" in f.metadata:
            extra["choices"] = f.metadata["choices"]
        g.add_argument("--" + f.name.replace("_", "-"), default=None, help=f.metadata["help"], **extra)


def cmd_cache_sim(args: argparse.Namespace) -> int:
    from localmoe.experts import cachesim
    from localmoe.experts.trace import Trace

    trace = Trace.load(args.trace)
    policies = [p for p in args.policies.split(",") if p] if args.policies else list(cachesim.POLICIES)
    unknown = sorted(set(policies) - set(cachesim.POLICIES))
    if unknown:
        raise LocalmoeError(f"unknown policy {unknown[0]!r} (choose from {', '.join(cachesim.POLICIES)})")
    rows = cachesim.report(trace, args.capacity, policies=policies,
                           prefetch_options=(None, "previous") if args.prefetch else (None,))
    if args.json:
        _print_json({"trace": args.trace, "model": trace.model, "backend": trace.backend,
                     "tokens": len(trace.tokens), "n_layers": trace.n_layers, "n_experts": trace.n_experts,
                     "top_k": trace.top_k, "rows": rows})
        return 0
    print(f"{args.trace}: {len(trace.tokens)} tokens × {trace.n_layers} layers, {trace.n_experts} experts, "
          f"top-{trace.top_k} ({trace.backend}, {trace.model})")
    table = [[str(r["capacity"]), r["policy"], r.get("prefetch") or "-", f"{r['hit_rate']:.3f}",
              f"{r['vs_belady']:.3f}" if r.get("vs_belady") is not None else "-"] for r in rows]
    print(_table(table, ["SLOTS/LAYER", "POLICY", "PREFETCH", "HIT RATE", "÷ BELADY"]))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from localmoe.home import inventory

    if args.available:
        return _models_available(args)
    if args.spec:
        raise UsageError(f"{args.spec!r}: a hub repository is planned with `localmoe models --available {args.spec}`")
    entries = inventory.local_models()
    if args.json:
        _print_json([{**m.ref.to_dict(), "layout": m.layout.to_dict() if m.layout else None, "error": m.error,
                      "config": m.config} for m in entries])
        return 0
    if not entries:
        print("no models installed")
        return 0
    rows, problems = [], []
    for m in entries:
        if m.config is not None:
            c = m.config
            experts = f"{c['experts']} (top-{c['top_k']})" if c["experts"] else "dense"
            rows.append([m.id, m.source, c["architecture"], str(c["layers"]), experts, c["dtype"],
                         human_bytes(c["bytes"]), str(c["context"])])
            continue
        if m.error is not None:
            rows.append([m.id, m.source, "unreadable (see below)", "", "", "", "", ""])
            problems.append(f"{m.id}: {m.error}")
            continue
        experts = f"{m.experts} (top-{m.top_k})" if m.is_moe else "dense"
        rows.append([m.id, m.source, m.architecture, str(m.layers), experts, m.quant, human_bytes(m.size_bytes),
                     str(m.context)])
    print(_table(rows, ["ID", "SOURCE", "ARCH", "LAYERS", "EXPERTS", "QUANT", "SIZE", "CONTEXT"]))
    for line in problems:
        print(f"unreadable: {line}")
    from localmoe.home import models

    for ref in models.shadowed_models():  # a model that can be neither used nor removed by its name
        print(f"hidden: {ref.path} has the id {ref.id!r} of a model listed above: rename it to use it")
    return 0


def _models_available(args: argparse.Namespace) -> int:
    """`models --available`: the catalog against this machine, from the catalog's facts alone (nothing fetched)."""
    from localmoe.home import inventory
    from localmoe.placement.plan import Budget

    budget = Budget.detect(vram=args.vram, ram=args.ram)
    if args.spec:
        # a hub model planned from its headers alone (a catalog name: its rows of the catalog listing)
        from localmoe.home import catalog, inventory, pull

        if not args.spec.startswith("hf:"):
            entry, _ = catalog.lookup(args.spec)
            found = [m for m in inventory.catalog_models(budget) if m.candidate and m.candidate.entry is entry]
            if args.json:
                _print_json({"models": [{**m.candidate.to_dict(), "installed": m.installed} for m in found]})
                return 0
            for m in found:
                print(f"{m.id}: {human_bytes(m.size_bytes)}, {m.verdict.label if m.verdict else '?'} on {budget.where}"
                      + (f" ({m.verdict.reason})" if m.verdict and m.verdict.reason else ""))
            return 0
        t = pull.parse(args.spec)
        pull.resolve_remote(t)
        m = inventory.remote_model(t, budget)
        v = m.verdict
        assert v is not None
        if args.json:
            _print_json({"budget": {"vram_bytes": budget.vram_bytes, "ram_bytes": budget.ram_bytes,
                                    "unified": budget.unified, "source": budget.source},
                         "model": {"id": m.id, "kind": t.kind, "repo": t.repo, "file": t.filename, "bytes": t.total,
                                   "files": [f.filename for f in t.files], "architecture": m.architecture,
                                   "layers": m.layers, "experts": m.experts, "experts_per_token": m.top_k,
                                   "quant": m.quant, "context": m.context, "engine": m.engine,
                                   "engine_reason": m.engine_reason, "verdict": v.to_dict(),
                                   "header_bytes_read": t.header_bytes, "pull": m.pull_command}})
            return 0
        what = {"checkpoint": f"a safetensors checkpoint, {len(t.parts)} files",
                "gguf": f"{len(t.parts)} shards" if t.parts else t.filename}[t.kind]
        experts = f"{m.experts} experts (top-{m.top_k})" if m.is_moe else "dense"
        print(f"hf:{t.repo}: {what}, {human_bytes(t.total)} ({pull.endpoint()})")
        print(f"model: {m.architecture}, {m.layers} layers, {experts}, {m.quant}, context {m.context}")
        print(f"on {budget.where}: {v.label}" + (f" ({v.reason})" if v.reason else "")
              + (f"; engine {m.engine}" if m.engine not in ("none", "auto") else ""))
        gpu = f"{human_bytes(budget.vram_bytes)} VRAM, " if budget.vram_bytes and not budget.unified else ""
        print(f"planned for {gpu}{human_bytes(budget.ram_bytes)} RAM from the headers alone "
              f"({human_bytes(t.header_bytes)} read); get it: {m.pull_command}")
        return 0
    found = inventory.catalog_models(budget)
    best = next((m for m in found if m.recommended), None)
    if args.json:
        _print_json({"budget": {"vram_bytes": budget.vram_bytes, "ram_bytes": budget.ram_bytes,
                                "unified": budget.unified, "source": budget.source},
                     "models": [{**m.candidate.to_dict(), "installed": m.installed} for m in found],
                     "recommended_large": best.candidate.to_dict() if best else None})
        return 0
    rows = []
    for m in found:
        experts = f"{m.experts} (top-{m.top_k})" if m.is_moe else "dense"
        size = human_bytes(m.size_bytes) + (" est." if m.size_estimated else "")
        mark = "*" if m.recommended else "+" if m.installed else ""
        rows.append([mark, m.id, m.candidate.entry.tier, size, experts, m.verdict.label])
    print(_table(rows, ["", "NAME", "TIER", "SIZE", "EXPERTS", f"ON {budget.where.upper()}"]))
    for m in found:
        if m.verdict.kind == "refused":
            print(f"refused: {m.id}: {m.verdict.reason}")
    gpu = f"{human_bytes(budget.vram_bytes)} VRAM, " if budget.vram_bytes and not budget.unified else ""
    print(f"planned for {gpu}{human_bytes(budget.ram_bytes)} RAM{' (unified)' if budget.unified else ''} "
          "from the catalog's sizes (est. = estimated from parameters); + installed")
    if best:
        print(f"* recommended large tier for {budget.where}: {best.id} ({best.verdict.label}) — "
              f"`localmoe pull {best.candidate.entry.id}`")
    else:
        print(f"no catalog MoE runs on {budget.where}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from localmoe.home import inventory, pull

    r = pull.pull(args.spec, inventory.plan_target, dry_run=args.dry_run, progress=not args.json, force=args.force)
    t = r.target
    if args.json:
        _print_json({"status": "dry-run" if r.dry_run else "ok", **r.to_dict()})
        return 0
    for note in r.notes:
        print(note)
    if r.notes and r.path:
        return 0
    v = r.verdict
    verdict = f"{v.label}" + (f" ({v.reason})" if v and v.reason else "") if v else "?"
    size = human_bytes(t.total) if t.total is not None else "?"
    n_sums = sum(1 for f in t.files if f.sha256)
    if r.dry_run:
        if t.kind == "checkpoint":
            names = ", ".join(f.filename for f in t.parts[:8]) + (" …" if len(t.parts) > 8 else "")
            print(f"would fetch {len(t.parts)} files of the checkpoint hf:{t.repo} ({size}) from {pull.endpoint()} "
                  f"into {t.dest}: {names}")
        elif t.parts:
            print(f"would fetch {t.repo}/{t.filename} and its {len(t.parts) - 1} other shards ({size} in all) from "
                  f"{pull.endpoint()} as {t.id}")
        else:
            print(f"would fetch {t.repo}/{t.filename} ({size}) from {pull.endpoint()} as {t.id}")
        print(f"on this machine: {verdict}")
        if not t.parts:
            print(f"checksum: {'SHA-256 ' + t.sha256 if t.sha256 else 'none published: the file will not be verified'}")
        else:
            print(f"checksums: SHA-256 published for {n_sums} of {len(t.parts)} files")
        return 0
    resumed = f", resumed at {human_bytes(r.resumed_from)}" if r.resumed_from else ""
    check = "SHA-256 verified" if t.sha256 else "no checksum published: not verified"
    if t.parts:
        check = ("SHA-256 verified" if n_sums == len(t.parts) else f"{n_sums} of {len(t.parts)} files SHA-256 "
                 "verified (no checksum published for the rest)") + f"; {len(t.parts)} files"
    print(f"pulled {t.id} ({size}{resumed}; {check}) into {r.path}")
    print(f"on this machine: {verdict}")
    if r.large_tier_set:
        print(f"{t.id} is now the large tier (settings.toml [tiers] large); hard questions go to it")
    print(f"try: localmoe ask --model {t.id} \"QUESTION\"")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from localmoe.home import library, paths

    ref = library.import_model(args.path, copy=args.copy, name=args.name)
    if args.json:
        _print_json({"status": "ok", "copied": args.copy, **ref.to_dict()})
        return 0
    how = "copied into" if args.copy else "linked from its place into"
    # models/, where the link or copy is (a checkpoint's ref names the folder the link resolves to)
    print(f"imported {ref.id} ({how} {paths.models_dir()}); try: localmoe ask --model {ref.id} \"QUESTION\"")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from localmoe.home import library

    r = library.plan_removal(args.name)
    what = r.describe()
    if not args.yes and not _confirmed(what, "nothing removed"):
        return 0
    library.remove(r)
    if args.json:
        _print_json({"status": "ok", "id": r.ref.id, "action": r.action, "freed_bytes": r.frees,
                     "path": str(r.path)})
    else:
        done = {"delete": f"deleted, {human_bytes(r.frees)} freed", "unlink": "link removed, the file kept",
                "forget": "forgotten, the file kept"}[r.action]
        print(f"{r.ref.id}: {done}")
    return 0


def cmd_hw(args: argparse.Namespace) -> int:
    from localmoe.placement import hardware

    hw = hardware.detect()
    if args.json:
        _print_json(hw.to_dict())
        return 0
    print(f"CPU      {hw.cpu_model} ({hw.physical_cores} cores, {hw.logical_cores} threads, {hw.arch})")
    print(f"RAM      {human_bytes(hw.ram_available_bytes)} available of {human_bytes(hw.ram_total_bytes)}")
    print(f"Swap     {human_bytes(hw.swap_free_bytes)} free of {human_bytes(hw.swap_total_bytes)}")
    if not hw.gpus:
        print("GPU      none detected (CPU only)")
    for g in hw.gpus:
        print(f"GPU {g.index}    {g.name}: {human_bytes(g.vram_free_bytes)} free of "
              f"{human_bytes(g.vram_total_bytes)} ({g.source})")
    print(f"Disk     {human_bytes(hw.disk_free_bytes)} free in {hw.data_dir}")
    cached = " (cached)" if hw.bandwidth_cached else ""
    print(f"Memory   {hw.memory_bandwidth_gbps} GB/s copy bandwidth{cached}")
    return 0


def _size(text: str) -> int:
    from localmoe.units import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    from localmoe.home import models
    from localmoe.placement import plan
    from localmoe.placement.layout import read_model_layout

    ref = models.resolve(args.model)
    if ref.backend == "torch":  # a Hugging Face checkpoint directory: expert slots per tier from a memory budget
        import json

        if args.backend == "llama.cpp":
            raise UsageError(f"{args.model} is a checkpoint directory: it runs on the torch backend, not llama.cpp")
        config = json.loads((ref.path / "config.json").read_text())
        tensors = plan.checkpoint_tensors(ref.path)
        # With a GPU (detected, or --vram) its memory is the fast tier and RAM the pinned warm tier.
        b = plan.Budget.detect(vram=args.vram, ram=args.ram)
        device = "cpu" if b.vram_bytes <= 0 else "mps" if b.unified else "cuda"
        fast = b.ram_bytes if device == "cpu" else b.vram_bytes
        budget, source = (fast, b.source) if args.fast_memory is None else (args.fast_memory, "override")
        cp = plan.plan_checkpoint(config, tensors, budget, ctx=args.ctx, model=str(ref.path), budget_source=source,
                                  expert_dtype=args.expert_dtype or "float32", device=device,
                                  warm_budget_bytes=b.ram_bytes if device == "cuda" else 0)
        if args.json:
            _print_json({"model": ref.to_dict(), "plan": cp.to_dict()})
        else:
            print(plan.describe_checkpoint(cp))
        return 0 if cp.fits else 3
    if args.expert_dtype:
        raise UsageError("--expert-dtype applies to checkpoint directories: a GGUF's experts stay in its quantisation")
    layout = read_model_layout(ref.path)
    budget = plan.Budget.detect(vram=args.vram, ram=args.ram)
    # Which engine answers (#16): llama.cpp while the experts fit in memory, the native expert cache when not.
    try:
        choice = plan.choose_engine(layout, budget, args.ctx, backend=args.backend, fast_memory=args.fast_memory)
    except LocalmoeError as exc:
        if args.backend != "torch":
            raise
        # --backend torch on a file the native engine does not run: bad input
        raise UsageError(f"{ref.id} cannot run on the torch backend: "
                         f"{str(exc).removesuffix('; use the llama.cpp backend')}") from None
    # The native engine's expected decode speed: `plan` displays, so it may measure the disk (once per device).
    plan.with_speed(choice, ref.path)
    if args.json:
        _print_json({"model": {**ref.to_dict(), "backend": choice.backend or ref.backend},
                     "layout": layout.to_dict(), "engine": choice.to_dict(), "plan": choice.plan.to_dict()})
    else:
        print(plan.describe_choice(choice, layout))
    return 0 if choice.fits else 3


def cmd_bench(args: argparse.Namespace) -> int:
    from localmoe.bench import report
    from localmoe.bench import runner as bench
    from localmoe.record.recorder import Recorder

    sub = getattr(args, "bench_cmd", None)
    if sub == "router":
        return _bench_router(args)
    with Recorder() as rec:
        if sub == "list":
            runs = bench.list_runs(rec)
            if args.json:
                _print_json(runs)
            else:
                print(_table([[str(r["id"]), r["suite"], r["status"], str(r["items"]), r["started_at"][:19],
                               r["meter"] or ""] for r in runs], ["RUN", "SUITE", "STATUS", "ITEMS", "STARTED",
                                                                 "METER"]) if runs else "no benchmark runs yet")
            return 0
        if sub == "compare":
            cmp = bench.compare(rec, args.run_a, args.run_b)
            if args.json:
                _print_json(cmp)
                return 0
            for side in ("a", "b"):
                h = cmp[side]
                print(f"run {h['run_id']} ({h['suite']}, {h['started_at'][:19]}, {h['machine']}, {h['meter']})")
            rows = []
            for r in cmp["rows"]:
                a, b, d = r["a"] or {}, r["b"] or {}, r["delta"] or {}
                rows.append([r["model"], r["policy"]] + [
                    f"{report.fmt(k, a.get(k))} → {report.fmt(k, b.get(k))}"
                    + ((f" ({d[k] * 100:+.1f} pts)" if k == "accuracy" else f" ({d[k]:+.3g})") if k in d else "")
                    for k in ("accuracy", "joules_per_query", "avg_watts", "ipw")])
            print(_table(rows, ["MODEL", "POLICY", "ACCURACY", "J/QUERY", "AVG W", "IPW"]))
            for note in cmp["notes"]:
                print(f"localmoe: warning: not like for like: {note}", file=sys.stderr)
            return 0

        progress = None
        started: dict[str, int] = {}

        def on_start(run_id: int, suite: Any) -> None:
            started["run"] = run_id
            for err in suite.errors:
                print(f"localmoe: warning: {suite.source}: {err} (skipped)", file=sys.stderr)

        if not args.json and sys.stderr.isatty():
            def progress(done: int, total: int, label: str) -> None:
                width = 30
                bar = "█" * (width * done // max(total, 1))
                print(f"\r{label:<40} {bar:<{width}} {done}/{total}", end="", file=sys.stderr, flush=True)

        models_arg = [m for m in (args.models or "").split(",") if m]
        policies = [p for p in (args.policies or "").split(",") if p] or None
        if args.resume is not None:
            given = [flag for flag, value in (("--suite", args.suite), ("--models", args.models),
                                              ("--policies", args.policies), ("--limit", args.limit),
                                              ("--max-tokens", args.max_tokens), ("--idle", args.idle))
                     if value is not None]
            if given:  # a run answered half one way and half another would compare nothing
                raise UsageError(f"--resume {args.resume} asks the rest as the run was started; drop "
                                 f"{', '.join(given)}")
        if args.report:
            report.check_report_path(args.report)
        try:
            run_id = bench.run(rec, suite=args.suite, model_names=models_arg, policies=policies, limit=args.limit,
                               max_tokens=args.max_tokens, resume=args.resume, idle_seconds=args.idle,
                               progress=progress, on_start=on_start)
        except KeyboardInterrupt:
            if "run" in started:
                print(f"\nlocalmoe: benchmark run {started['run']} interrupted; finished items are kept. "
                      f"Continue with `localmoe bench --resume {started['run']}`.", file=sys.stderr)
                if args.json:  # what was finished, marked interrupted: a script still has something to read
                    _print_json(bench.results(rec, started["run"]))
                return 130
            raise
        if progress:
            print(file=sys.stderr)
        res = bench.results(rec, run_id)
    if args.report:
        report.write_html(res, args.report)
    if args.json:
        _print_json(res)
        return 0
    print(f"run {run_id}: suite {res['suite']}, {res['machine']}")
    print(_table(report.table_rows(res), [label.upper() for _, label in report.columns(res)]))
    print(report.energy_note(res))
    if args.report:
        print(f"report written to {args.report}")
    return 0


CPT_LEVELS = (0.5, 0.8)  # RouteLLM's call-performance thresholds reported by `bench router`


def _bench_router(args: argparse.Namespace) -> int:
    import numpy as np

    from localmoe.home.settings import STRATEGIES
    from localmoe.routing import evaluate as router_eval
    from localmoe.routing import train as router_train
    from localmoe.routing.router import Router

    wanted = [s for s in (args.strategies or "").split(",") if s] or list(STRATEGIES)
    if unknown := [s for s in wanted if s not in STRATEGIES]:
        raise UsageError(f"unknown strategy {unknown[0]!r} ({', '.join(STRATEGIES)})")
    rows = router_train.read_labels(args.labels)
    if args.held_out:
        # the split `router train` fits on (stratified by category, first seed): in-distribution, unseen rows
        _, test_idx = router_eval.split(len(rows), seed=router_train.EVAL_SEEDS[0],
                                        strata=[r["category"] for r in rows])
        rows = [rows[i] for i in test_idx]
    y = np.array([r["small_wrong"] for r in rows], dtype=float)
    small, large = 1 - y, np.array([r["large_correct"] for r in rows])
    router = Router()
    if router.trained is not None and any(r["probe"] is not None for r in rows):
        for r in rows:  # signals stored with the labels (router_probe_labels.py): what training fitted on
            if r["probe"] is not None:
                router.prober.remember(r["question"], np.array(r["probe"]))
    out: dict[str, Any] = {"suite": args.labels, "held_out": bool(args.held_out), "n": len(rows),
                           "small_accuracy": float(small.mean()), "large_accuracy": float(large.mean()),
                           "strategies": {}, "baselines": {},
                           "perfect_cpt": {f"{lv:.0%}": router_eval.cpt(y, small, large, lv) for lv in CPT_LEVELS}}
    for name in wanted:
        if name == "cascade":
            if any(r["mean_logprob"] is None for r in rows) or router.trained is None:
                continue
            # after the answer, as it escalates: its confidence with the probe's reading of the question
            scores = np.array([router.cascade_score(r["mean_logprob"], r["min_logprob"], r["question"])
                               for r in rows])
        else:
            if name in ("learned", "probe") and name not in (router.trained or {}):
                continue
            scores = np.array([router.routed_score(r["question"], name) for r in rows])
        points = router_eval.operating_points(scores, small, large)
        shares = {}
        for pref in ("quality", "balanced", "energy"):
            router.preference = pref
            shares[pref] = float(np.mean(scores >= router.threshold(name)))
        out["strategies"][name] = {
            "auc": router_eval.auc(scores, y) if len(set(y)) == 2 else None,
            "apgr": router_eval.apgr(scores, small, large),
            "large_share": shares,
            "accuracy_at_share": {f"{s:.1f}": router_eval.accuracy_at_share(points, s)
                                  for s in router_train.SHARES},
            "cpt": {f"{lv:.0%}": router_eval.cpt(scores, small, large, lv) for lv in CPT_LEVELS},
        }
    for name, count in router_eval.BASELINES.items():
        scores = np.array([count(r["question"]) for r in rows])
        points = router_eval.operating_points(scores, small, large)
        out["baselines"][name] = {
            "auc": router_eval.auc(scores, y) if len(set(y)) == 2 else None,
            "apgr": router_eval.apgr(scores, small, large),
            "accuracy_at_share": {f"{s:.1f}": router_eval.accuracy_at_share(points, s)
                                  for s in router_train.SHARES},
            "cpt": {f"{lv:.0%}": router_eval.cpt(scores, small, large, lv) for lv in CPT_LEVELS},
        }
    if args.json:
        _print_json(out)
        return 0
    split = " (held-out split)" if args.held_out else ""
    print(f"{out['n']} questions{split}; small tier {out['small_accuracy']:.1%}, "
          f"large tier {out['large_accuracy']:.1%}")
    rows_out = []
    for kind, table in (("", out["strategies"]), ("baseline: ", out["baselines"])):
        for name, r in table.items():
            acc = r["accuracy_at_share"]
            shares = (" / ".join(f"{r['large_share'][p]:.0%}" for p in ("quality", "balanced", "energy"))
                      if "large_share" in r else "-")
            rows_out.append([kind + name, f"{r['auc']:.3f}" if r["auc"] is not None else "-", f"{r['apgr']:.3f}",
                             " / ".join(f"{r['cpt'][k]:.2f}" for k in ("50%", "80%")), shares,
                             " ".join(f"{acc[k]:.0%}" for k in ("0.0", "0.2", "0.4", "0.6", "0.8", "1.0"))])
    print(_table(rows_out, ["STRATEGY", "AUC", "APGR", "CPT 50%/80%", "LARGE SHARE (quality/balanced/energy)",
                            "ACCURACY AT 0/20/40/60/80/100% LARGE"]))
    perfect = out["perfect_cpt"]
    print(f"a perfect router: CPT 50%/80% {perfect['50%']:.2f}/{perfect['80%']:.2f}; a random one about 0.50/0.80")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from localmoe.record.recorder import Recorder

    if args.delete is not None or args.before is not None or args.all:
        if args.query is not None:
            raise UsageError("-q searches; it does not go with --delete, --before or --all")
        return _delete_logs(args)
    if args.yes:
        raise UsageError("--yes goes with --delete, --before or --all")
    if args.query is not None:
        return _search_logs(args)
    with Recorder() as rec:
        rows = rec.recent_exchanges(args.n)[::-1]  # oldest first in text and JSON alike: the latest ends the output
    for r in rows:
        if r.get("measured") is not None:
            r["measured"] = bool(r["measured"])
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no exchanges recorded yet")
        return 0
    for r in rows:
        rate = f"{r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else ""
        joules = f"{'' if r['measured'] else '~'}{r['joules']:.1f} J" if r.get("joules") is not None else ""
        status = r.get("status") or ""
        if status == "complete" and r.get("stop_reason") in ("length", "repetition"):
            status = {"length": f"length (cut off at {r.get('completion_tokens')} tokens)",
                      "repetition": "repetition (stopped a loop)"}[r["stop_reason"]]
        meta = " · ".join(x for x in (r["created_at"][:19].replace("T", " "), r.get("model") or "",
                                      status, rate, joules) if x)
        print(f"# {meta}  (conversation {r['conversation_id']})")
        print(f"> {r['prompt']}")
        print(r["answer"] or "(no answer)")
        print()
    return 0


def _search_logs(args: argparse.Namespace) -> int:
    """`logs -q TERM`: the messages that contain every word of TERM, best match first (the chat's search too)."""
    from localmoe.record.recorder import Recorder, fts_query

    if not fts_query(args.query):
        raise UsageError("-q needs a word to search for")
    with Recorder() as rec:
        rows = rec.search_messages(args.query, args.n)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print(f"no message matches {args.query!r}")
        return 0
    for r in rows:
        who = "> " if r["role"] == "user" else ""
        print(f"# {r['created_at'][:19].replace('T', ' ')} · {r['role']}  (conversation {r['conversation_id']}: "
              f"{r['title'] or 'untitled'})")
        print(f"{who}{' '.join(r['snippet'].split())}")
        print()
    return 0


def _delete_logs(args: argparse.Namespace) -> int:
    """`logs --delete/--before/--all`: the conversations and everything tied to them, then a smaller file."""
    from localmoe.record.recorder import Recorder

    with Recorder() as rec:
        found = rec.conversations_matching(ids=args.delete, before=args.before)
        if args.delete is not None:
            missing = sorted(set(args.delete) - {c["id"] for c in found})
            if missing:
                raise UsageError(f"there is no conversation {missing[0]} (see `localmoe logs`)")
        n_messages = sum(c["messages"] for c in found)
        if not found:
            if args.json:
                _print_json({"deleted": {"conversations": 0, "messages": 0}, "conversation_ids": []})
            else:
                print("no conversations to delete")
            return 0
        what = f"delete {len(found)} conversation{'s' * (len(found) != 1)} ({n_messages} messages)"
        if not args.yes and not _confirmed(what, "nothing deleted"):
            return 0
        size = _db_size(rec.path)
        counts = rec.delete_conversations([c["id"] for c in found])
        rec.vacuum()
        after = _db_size(rec.path)
    if args.json:
        _print_json({"deleted": counts, "conversation_ids": [c["id"] for c in found], "bytes_before": size,
                     "bytes_after": after})
        return 0
    tied = sum(n for table, n in counts.items() if table not in ("conversations", "messages"))
    print(f"deleted {counts['conversations']} conversation{'s' * (counts['conversations'] != 1)}, "
          f"{counts['messages']} messages and {tied} rows tied to them; the database went from {human_bytes(size)} "
          f"to {human_bytes(after)}")
    return 0


def _db_size(path: Path) -> int:
    """The database with its WAL: deleted text lives in both until the vacuum."""
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


def _iso_date(text: str) -> str:
    from datetime import date

    try:
        if len(text) != 10:
            raise ValueError
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date written YYYY-MM-DD") from None


def cmd_chat(args: argparse.Namespace) -> int:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("the chat needs a terminal; without one, use `localmoe ask \"QUESTION\"`")
    model = getattr(args, "model", None)
    if model:  # a model that cannot load is refused here, not shown as an empty chat
        from localmoe.home import models

        models.check_loadable(models.resolve(model))
    from localmoe.ui.app import run_app

    return run_app(model=model)


def cmd_serve(args: argparse.Namespace) -> int:
    from localmoe.server.app import serve

    return serve(host=args.host, port=args.port, api_key_env=args.api_key_env, queue=args.queue,
                 strategy=args.strategy, preference=args.preference, cors_origins=args.cors_origins)


def _queue_size(text: str) -> int:
    return _whole_number(text, 0, note=" (0: no request waits)")


def _port(text: str) -> int:
    return _whole_number(text, 0, 65535, what="a port number")


def build_parser() -> argparse.ArgumentParser:
    from localmoe.home.settings import STRATEGIES

    p = _Parser(
        prog="localmoe",
        description="Local, offline chat with Mixture-of-Experts models. With no command, starts the chat UI.",
    )
    p.add_argument("--version", action="version", version=f"localmoe {__version__}")
    p.set_defaults(func=cmd_chat)
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    a = sub.add_parser("ask", help="answer one prompt and record it", description="Answer one prompt, streaming "
                       "it to stdout, and record the exchange.")
    a.add_argument("prompt", nargs="?", help="the question ('-' reads standard input)")
    a.add_argument("--prompt-file", help="read the question from this file")
    a.add_argument("-m", "--model", help="model id, path to a .gguf file, or a Hugging Face MoE checkpoint "
                   "directory (torch backend); default: the router picks a tier")
    a.add_argument("--backend", choices=["llama.cpp", "torch"],
                   help="use this engine instead of the planner's choice (torch: a checkpoint directory or a GGUF "
                   "MoE given with --model)")
    a.add_argument("--json", action="store_true", help="print one JSON object with the answer and its stats")
    a.add_argument("--max-tokens", type=_positive_int, help="stop after this many tokens (default 512)")
    a.add_argument("--temperature", type=_temperature, help="sampling temperature (0 = greedy)")
    a.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    a.add_argument("--tier", choices=["small", "large", "remote"], help="skip the router: answer on this tier")
    a.add_argument("-c", "--continue", dest="cont", action="store_true",
                   help="continue the latest conversation (the model sees its earlier questions and answers)")
    a.add_argument("--conversation", type=_positive_int, metavar="ID",
                   help="continue this conversation (ids are in `localmoe logs`)")
    record = a.add_mutually_exclusive_group()
    record.add_argument("--no-log", action="store_true",
                        help="off the record: answer without storing the question or the answer anywhere")
    record.add_argument("--log", action="store_true",
                        help="record this answer even when settings.toml turns recording off ([privacy] record)")
    a.add_argument("--strategy", choices=STRATEGIES, help="router strategy")
    a.add_argument("--preference", help="quality | balanced | energy, or a threshold in (0, 1)")
    _add_engine_options(a)
    a.set_defaults(func=cmd_ask)

    rt = sub.add_parser("route", help="show where the router would send a prompt, without answering",
                        description="Print the router's decision: tier, model, strategy, score, threshold, reason.")
    rt.add_argument("prompt", help="the question to route ('-': read it from standard input)")
    rt.add_argument("--strategy", choices=STRATEGIES,
                    help="router strategy (default: settings.toml [router] strategy)")
    rt.add_argument("--preference", help="quality | balanced | energy, or a threshold in (0, 1)")
    rt.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    rt.set_defaults(func=cmd_route)

    ro = sub.add_parser("router", help="train the router", description="Router maintenance.")
    rosub = ro.add_subparsers(dest="router_cmd", metavar="{train,calibrate}", required=True)
    tr = rosub.add_parser("train", help="fit the router on labelled outcomes",
                          description="Fit the features, learned and cascade strategies on the shipped labels plus "
                          "this machine's benchmark results and user signals; print held-out AUC.")
    tr.add_argument("--shipped", action="store_true", help="use only the shipped labels")
    tr.add_argument("--out", help="where to write the router (default: <data dir>/router.json)")
    tr.set_defaults(func=cmd_router_train)
    ca = rosub.add_parser("calibrate", help="fit the router to your small and large tiers on this machine",
                          description="Answer a calibration suite on the small and the large tier (greedy, energy "
                          "metered, each answer graded), retrain every strategy on those outcomes, set the quality/"
                          "balanced/energy thresholds from them, write <data dir>/router.json and print accuracy "
                          "against large share and joules. Ctrl-C keeps the answers: --resume continues.")
    ca.add_argument("--suite", help="built-in suite name or a JSONL file (default: router-train, 1331 questions)")
    ca.add_argument("--limit", type=_positive_int,
                    help="only the first N questions (default: 300 of router-train, all of a suite you name)")
    ca.add_argument("--resume", action="store_true", help="continue the interrupted calibration")
    ca.add_argument("--json", action="store_true", help="print the outcome summary, thresholds and curves as JSON")
    ca.set_defaults(func=cmd_router_calibrate)

    t = sub.add_parser("trace", help="record which experts each token uses",
                       description="Answer a prompt with routing telemetry on and write the experts every token "
                       "used in every layer to a JSONL trace (input of cache simulation).")
    t.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    t.add_argument("--prompt-file", help="read the prompt from this file")
    t.add_argument("-m", "--model", help="MoE model id, path to a .gguf file, or a Hugging Face MoE checkpoint "
                   "directory (torch engine)")
    t.add_argument("-o", "--out", default="trace.jsonl", help="trace file to write (default trace.jsonl)")
    t.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate (default 128)")
    t.add_argument("--temperature", type=_temperature, help="sampling temperature (0 = greedy)")
    _add_engine_options(t)
    t.set_defaults(func=cmd_trace)

    cs = sub.add_parser("cache-sim", help="replay a routing trace through expert-cache policies",
                        description="Per-layer expert caches replayed over a trace: hit rates of LRU, LFU, LFRU "
                        "beside the offline optimum (Belady) and the segment-level bound SCH(16, capacity).")
    cs.add_argument("trace", help="a trace written by `localmoe trace`")
    cs.add_argument("--capacity", action="append", default=[], metavar="N[x]", required=True,
                    help="slots per layer, or a multiple of experts-per-token (2x); repeatable")
    cs.add_argument("--policies", help="comma-separated subset of lru,lfu,lfru,belady")
    cs.add_argument("--prefetch", action="store_true", help="also show the 'previous token' prefetch")
    cs.add_argument("--json", action="store_true", help="print JSON instead of text")
    cs.set_defaults(func=cmd_cache_sim)

    m = sub.add_parser("models", help="list installed models", description="List embedded and installed "
                       "models with their layout (architecture, layers, experts, quantisation). With --available: "
                       "every catalog model and quantisation, planned on this machine before any download.")
    m.add_argument("spec", nargs="?", metavar="hf:OWNER/REPO[/FILE]",
                   help="with --available: plan this hub model from its headers alone (range requests), or one "
                   "catalog NAME")
    m.add_argument("--json", action="store_true", help="print JSON instead of text")
    m.add_argument("--available", action="store_true",
                   help="the catalog against this machine: fits in VRAM / in RAM / runs from disk / refused")
    m.add_argument("--vram", type=_size, help="with --available: free VRAM to plan for (default: detected)")
    m.add_argument("--ram", type=_size, help="with --available: available RAM to plan for (default: detected)")
    m.set_defaults(func=cmd_models)

    pu = sub.add_parser("pull", help="download a model from the catalog or the Hugging Face hub",
                        description="Download a catalog model (NAME[:QUANT], see `localmoe models --available`) or "
                        "a GGUF model of a hub repository (hf:OWNER/REPO[/FILE.gguf]; a split GGUF's shards all "
                        "come), or a repository's safetensors checkpoint (hf:OWNER/REPO with config.json and "
                        "*.safetensors, no GGUF) for the native engine, into the data dir's models/, after "
                        "planning it on this machine and checking the free disk space. An interrupted pull "
                        "resumes where it stopped; each file is verified against the hub's SHA-256. Honours "
                        "HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN.")
    pu.add_argument("spec", metavar="NAME[:QUANT] | hf:OWNER/REPO[/FILE]", help="what to download")
    pu.add_argument("--dry-run", action="store_true", help="show what would be fetched and whether it fits; "
                    "download nothing")
    pu.add_argument("--force", action="store_true", help="download even when the planner says it cannot run here")
    pu.add_argument("--json", action="store_true", help="print the result as JSON (no progress line)")
    pu.set_defaults(func=cmd_pull)

    im = sub.add_parser("import", help="add a GGUF file or checkpoint folder that is already on disk",
                        description="Make a GGUF file or a Hugging Face checkpoint folder usable by name: linked "
                        "into the data dir's models/ (the file stays where it is), or copied with --copy.")
    im.add_argument("path", help="a .gguf file or a checkpoint folder (config.json + safetensors)")
    im.add_argument("--copy", action="store_true", help="copy it instead of linking to it")
    im.add_argument("--name", help="the id to use (default: the file or folder name)")
    im.add_argument("--json", action="store_true", help="print the result as JSON")
    im.set_defaults(func=cmd_import)

    rmp = sub.add_parser("rm", help="remove a model (deletes only files localmoe downloaded or copied)",
                         description="Remove a model: a pulled or copied file is deleted (the space it frees is "
                         "shown first); an imported link is removed and a discovered model (LM Studio, Ollama, hub "
                         "cache) is forgotten, their files left in place.")
    rmp.add_argument("name", help="the model's id (see `localmoe models`)")
    rmp.add_argument("--yes", action="store_true", help="remove without asking (needed without a terminal)")
    rmp.add_argument("--json", action="store_true", help="print the result as JSON")
    rmp.set_defaults(func=cmd_rm)

    h = sub.add_parser("hw", help="show this machine's hardware", description="Show CPU, RAM, GPUs, disk "
                       "and measured memory bandwidth.")
    h.add_argument("--json", action="store_true", help="print JSON instead of text")
    h.set_defaults(func=cmd_hw)

    pl = sub.add_parser("plan", help="show which engine runs a model and where its tensors would live",
                        description="Plan a GGUF model on this machine (or on the budgets given). First the engine "
                        "that answers it and why: llama.cpp while the experts fit in VRAM/RAM, the native engine's "
                        "expert cache for a GGUF MoE whose experts do not (llama.cpp would page them through mmap). "
                        "llama.cpp: GPU layers, which layers' experts stay in RAM, mmap/mlock, the largest context "
                        "that fits, or why it cannot run. The native engine (and checkpoint directories): expert "
                        "slots per layer in fast memory, the rest on disk, bytes read per token, and for a GGUF its "
                        "expected decode speed (an estimate at uniform routing from the disk read bandwidth of the "
                        "file's device, measured on the file once and cached, and the memory bandwidth). Exits 3 when "
                        "the model does not fit.")
    pl.add_argument("model", help="model id, path to a .gguf file, or a Hugging Face MoE checkpoint directory")
    pl.add_argument("--fast-memory", type=_size, help="native engine: bytes for dense weights, KV cache and expert "
                    "slots, e.g. 2GiB; default: detected free RAM")
    pl.add_argument("--backend", choices=["llama.cpp", "torch"],
                    help="plan this engine instead of the one the planner chooses")
    pl.add_argument("--vram", type=_size, help="free VRAM to plan for, e.g. 8GiB (0 = CPU only); default: detected")
    pl.add_argument("--ram", type=_size, help="available RAM to plan for, e.g. 16GiB; default: detected")
    pl.add_argument("--ctx", type=_positive_int, help="context length in tokens (default: 4096 or what fits)")
    pl.add_argument("--expert-dtype", choices=["float32", "bfloat16", "int8"],
                    help="checkpoints: how the engine holds experts (default float32)")
    pl.add_argument("--json", action="store_true", help="print JSON instead of text")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="benchmark accuracy and energy (intelligence per watt)",
                       description="Run a suite of questions with verifiable answers on models/policies and "
                       "report accuracy, joules, watts and IPW. Also: `bench list`, `bench compare RUN RUN`.")
    b.add_argument("--suite", help="built-in suite name, a JSONL file, or hf:gsm8k|hf:mmlu|hf:arc (default: quick)")
    b.add_argument("--models", help="comma-separated model ids or .gguf paths (default: the default model)")
    b.add_argument("--policies", help="comma-separated: direct (default: each model answers), small, large "
                   "(one tier), routed (the router picks per question), cascade (small first, large when unsure)")
    b.add_argument("--limit", type=_positive_int, help="at most N items of the suite")
    b.add_argument("--max-tokens", type=_positive_int, help="answer length limit (default 128)")
    b.add_argument("--idle", type=float, metavar="SECONDS",
                   help="measure idle power this long first and also record idle-subtracted joules")
    b.add_argument("--resume", type=int, metavar="RUN",
                   help="continue an interrupted run, as it was started (suite, models, policies, limit, length)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--report", metavar="FILE.html", help="also write an HTML report with an accuracy/energy plot")
    b.set_defaults(func=cmd_bench)
    bsub = b.add_subparsers(dest="bench_cmd", metavar="{list,compare,router}")
    br = bsub.add_parser("router", help="evaluate the router on questions with per-tier correctness labels",
                         description="AUC for predicting small-tier failure, large-call share per preference, "
                         "accuracy at each operating point, APGR and CPT(50%)/CPT(80%) (RouteLLM), beside "
                         "baselines that only count digits or characters. The file is JSONL with "
                         "`question`, `small_correct` and optionally `large_correct` (default 1), `mean_logprob`, "
                         "`min_logprob` (for the cascade), `probe` (the small model's three signals of the question, "
                         "as benchmarks/router_probe_labels.py stores them; read live where absent).")
    br.add_argument("--suite", dest="labels", required=True, help="labelled JSONL file")
    br.add_argument("--held-out", action="store_true",
                    help="only the rows `router train` holds out (its first stratified split): with the shipped "
                    "labels, the in-distribution test set of the shipped router")
    br.add_argument("--strategies", help="comma-separated strategies to evaluate (default: all of features, "
                    "learned, probe, cascade; probe and cascade read every question with the small model, ~0.2 s "
                    "each, unless the file stores its signals)")
    br.add_argument("--json", action="store_true", help="print the evaluation as JSON")
    bl = bsub.add_parser("list", help="list benchmark runs")
    bl.add_argument("--json", action="store_true", help="print the runs as JSON")
    bc = bsub.add_parser("compare", help="compare two runs")
    bc.add_argument("run_a", type=int, help="a run id (see `bench list`)")
    bc.add_argument("run_b", type=int, help="the run to compare it with")
    bc.add_argument("--json", action="store_true", help="print the comparison as JSON")

    lg = sub.add_parser("logs", help="show or delete recorded exchanges",
                        description="Show recent recorded exchanges, or delete conversations with everything tied "
                        "to them (stats, energy, routing decisions, labels); the database is then compacted.")
    lg.add_argument("-n", type=_positive_int, default=10, help="how many (default 10)")
    lg.add_argument("--json", action="store_true", help="print JSON instead of text")
    lg.add_argument("-q", "--query", metavar="TERM",
                    help="search every recorded message for TERM (each word, as a prefix), best match first")
    forget = lg.add_mutually_exclusive_group()
    forget.add_argument("--delete", type=_positive_int, nargs="+", metavar="ID",
                        help="delete these conversations (ids as shown by `localmoe logs`)")
    forget.add_argument("--before", type=_iso_date, metavar="YYYY-MM-DD",
                        help="delete the conversations whose last message is older than this day (UTC)")
    forget.add_argument("--all", action="store_true", help="delete every chat conversation")
    lg.add_argument("--yes", action="store_true", help="delete without asking (needed without a terminal)")
    lg.set_defaults(func=cmd_logs)

    sv = sub.add_parser("serve", help="serve an OpenAI-compatible API (localmoe/auto: the router as a model)",
                        description="Serve /v1/chat/completions (streaming and not), /v1/models and /health. The "
                        "model localmoe/auto routes each request as `localmoe ask` does; installed models answer "
                        "by id. One answer at a time, the rest queued; every request is recorded.")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; anything else "
                    "needs --api-key-env)")
    sv.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0 picks a free one)")
    sv.add_argument("--api-key-env", metavar="VAR", help="require the key held in environment variable VAR "
                    "(clients send it as 'Authorization: Bearer KEY')")
    sv.add_argument("--queue", type=_queue_size, default=16, metavar="N", help="requests that may wait for the model; "
                    "more are answered 429 with Retry-After (default 16)")
    sv.add_argument("--strategy", choices=STRATEGIES, help="router strategy for "
                    "localmoe/auto")
    sv.add_argument("--preference", help="quality | balanced | energy, or a threshold in (0, 1)")
    sv.add_argument("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
                    help="also let web pages from ORIGIN (scheme://host[:port], or * for any) call the API; pages "
                    "on this machine (localhost, 127.0.0.1, [::1]) may by default; repeatable")
    sv.set_defaults(func=cmd_serve)

    c = sub.add_parser("chat", help="start the chat UI (the default)", description="Start the terminal chat UI.")
    c.add_argument("-m", "--model", help="model id or path to a .gguf file")
    c.set_defaults(func=cmd_chat)
    return p


_ARGV: list[str] = []  # this invocation's arguments, for the parser's errors (which argparse raises mid-parse)


def main(argv: list[str] | None = None) -> int:
    _ARGV[:] = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    json_out = bool(getattr(args, "json", False))
    try:
        return _run(func, args, json_out)
    finally:
        _privacy_notice()


def _privacy_notice() -> None:
    from localmoe.home import paths

    if paths.tightened:
        print(f"localmoe: notice: made {', '.join(dict.fromkeys(paths.tightened))} readable by you only "
              "(conversations are private)", file=sys.stderr)
        paths.tightened.clear()


def _check_environment() -> None:
    # said first: deep inside a tier's set-up the same error would read as "no model available"
    if os.environ.get("LOCALMOE_THREADS"):
        from localmoe.engine.base import default_threads

        default_threads()


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, json_out: bool) -> int:
    try:
        _check_environment()
        return func(args)
    except LocalmoeError as exc:
        _report_error(str(exc), json_out)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nlocalmoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug of ours: still one line, with a way to get the details
        if os.environ.get("LOCALMOE_DEBUG"):
            raise
        _report_error(f"internal error: {type(exc).__name__}: {exc} (set LOCALMOE_DEBUG=1 for the traceback)",
                      json_out)
        return 70
