"""The `localmoe` command: a thin layer over the core. Errors become one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from localmoe import __version__
from localmoe.errors import LocalmoeError
from localmoe.units import human_bytes


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=False))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_ask(args: argparse.Namespace) -> int:
    from localmoe.engine import GenerationConfig
    from localmoe.session import Session

    prompt = args.prompt if args.prompt != "-" else sys.stdin.read()
    if not prompt.strip():
        raise LocalmoeError("the prompt is empty")
    session = Session(args.model)
    for warning in session.warnings:
        print(f"localmoe: warning: {warning}", file=sys.stderr)
    overrides = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                   ("seed", args.seed)) if v is not None}
    session.config = GenerationConfig(**{**session.model.defaults, **overrides})
    try:
        reply = session.ask(prompt)
        if args.json:
            reply.run()
            _print_json(reply.to_dict())
        else:
            for piece in reply:
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if sys.stderr.isatty():
                s = reply.stats
                rate = f"{s.tokens_per_s:.1f} tok/s" if s.tokens_per_s else "-"
                ttft = f"{s.ttft_s:.2f}s" if s.ttft_s is not None else "-"
                energy = ""
                if reply.energy is not None:
                    e = reply.energy
                    energy = f" · {'' if e.measured else '~'}{e.joules:.1f} J ({e.meter})"
                print(f"\x1b[2m{reply.model} · {s.completion_tokens} tokens · {rate} · first token {ttft}{energy}"
                      "\x1b[0m", file=sys.stderr)
    finally:
        session.close()
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from collections import Counter

    from localmoe.engine import GenerationConfig
    from localmoe.session import Session
    from localmoe.trace import Trace

    if not args.prompt.strip():
        raise LocalmoeError("the prompt is empty")
    session = Session(args.model, engine_options={"telemetry": True})
    try:
        layout = session.engine.layout
        if not layout.is_moe:
            raise LocalmoeError(f"{session.model.id} is a dense model: it has no experts to trace")
        session.config = GenerationConfig(**{**session.model.defaults, "max_tokens": args.max_tokens,
                                             **({"temperature": args.temperature} if args.temperature is not None
                                                else {})})
        reply = session.ask(args.prompt).run()
        trace = Trace(session.model.id, session.engine.backend, layout.n_layers, layout.n_experts,
                      layout.n_experts_used, list(session.engine.routing))
        trace.save(args.out)
    finally:
        session.close()
    counts = Counter(e for t in trace.tokens for layer in t.experts for e in layer)
    hot = ", ".join(f"{e}×{n}" for e, n in counts.most_common(5))
    print(f"traced {len(trace.tokens)} tokens × {trace.n_layers} layers "
          f"({reply.stats.prompt_tokens} prompt, {reply.stats.completion_tokens} generated) → {args.out}")
    print(f"most used experts (all layers): {hot}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from localmoe import models
    from localmoe.layout import read_layout

    entries = []
    for ref in models.list_models():
        try:
            layout, error = read_layout(ref.path), None
        except LocalmoeError as exc:
            layout, error = None, str(exc)
        entries.append((ref, layout, error))
    if args.json:
        _print_json([{**ref.to_dict(), "layout": lay.to_dict() if lay else None, "error": err}
                     for ref, lay, err in entries])
        return 0
    if not entries:
        print("no models installed")
        return 0
    rows = []
    for ref, lay, err in entries:
        if lay is None:
            rows.append([ref.id, ref.source, f"unreadable: {err}", "", "", "", "", ""])
            continue
        experts = f"{lay.n_experts} (top-{lay.n_experts_used})" if lay.is_moe else "dense"
        rows.append([ref.id, ref.source, lay.architecture, str(lay.n_layers), experts, lay.quantization,
                     human_bytes(lay.file_bytes), str(lay.context_length)])
    print(_table(rows, ["ID", "SOURCE", "ARCH", "LAYERS", "EXPERTS", "QUANT", "SIZE", "CONTEXT"]))
    return 0


def cmd_hw(args: argparse.Namespace) -> int:
    from localmoe import hardware

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
    from localmoe import models, plan
    from localmoe.layout import read_layout

    ref = models.resolve(args.model)
    layout = read_layout(ref.path)
    budget = plan.Budget.detect(vram=args.vram, ram=args.ram)
    p = plan.make_plan(layout, budget, args.ctx)
    if args.json:
        _print_json({"model": ref.to_dict(), "layout": layout.to_dict(), "plan": p.to_dict()})
    else:
        print(plan.describe(p, layout))
    return 0 if p.fits else 3


def cmd_bench(args: argparse.Namespace) -> int:
    from localmoe import bench, report
    from localmoe.recorder import Recorder

    sub = getattr(args, "bench_cmd", None)
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
                    + (f" ({d[k]:+.3g})" if k in d else "")
                    for k in ("accuracy", "joules_per_query", "avg_watts", "ipw")])
            print(_table(rows, ["MODEL", "POLICY", "ACCURACY", "J/QUERY", "AVG W", "IPW"]))
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
        try:
            run_id = bench.run(rec, suite=args.suite, model_names=models_arg, policies=policies, limit=args.limit,
                               max_tokens=args.max_tokens, resume=args.resume, idle_seconds=args.idle,
                               progress=progress, on_start=on_start)
        except KeyboardInterrupt:
            if "run" in started:
                print(f"\nlocalmoe: benchmark run {started['run']} interrupted; finished items are kept. "
                      f"Continue with `localmoe bench --resume {started['run']}`.", file=sys.stderr)
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
    print(_table(report.table_rows(res), [label.upper() for _, label in report.COLUMNS]))
    print(report.energy_note(res))
    if args.report:
        print(f"report written to {args.report}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from localmoe.recorder import Recorder

    with Recorder() as rec:
        rows = rec.recent_exchanges(args.n)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no exchanges recorded yet")
        return 0
    for r in reversed(rows):
        rate = f"{r['tokens_per_s']:.1f} tok/s" if r.get("tokens_per_s") else ""
        joules = f"{'' if r['measured'] else '~'}{r['joules']:.1f} J" if r.get("joules") is not None else ""
        meta = " · ".join(x for x in (r["created_at"][:19].replace("T", " "), r.get("model") or "",
                                      r.get("status") or "", rate, joules) if x)
        print(f"# {meta}  (conversation {r['conversation_id']})")
        print(f"> {r['prompt']}")
        print(r["answer"] or "(no answer)")
        print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from localmoe.ui.app import run_app

    return run_app(model=getattr(args, "model", None))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="localmoe",
        description="Local, offline chat with Mixture-of-Experts models. With no command, starts the chat UI.",
    )
    p.add_argument("--version", action="version", version=f"localmoe {__version__}")
    p.set_defaults(func=cmd_chat)
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    a = sub.add_parser("ask", help="answer one prompt and record it", description="Answer one prompt, streaming "
                       "it to stdout, and record the exchange.")
    a.add_argument("prompt", help="the question ('-' reads standard input)")
    a.add_argument("-m", "--model", help="model id or path to a .gguf file (default: the embedded model)")
    a.add_argument("--json", action="store_true", help="print one JSON object with the answer and its stats")
    a.add_argument("--max-tokens", type=int, help="stop after this many tokens (default 512)")
    a.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    a.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    a.set_defaults(func=cmd_ask)

    t = sub.add_parser("trace", help="record which experts each token uses",
                       description="Answer a prompt with routing telemetry on and write the experts every token "
                       "used in every layer to a JSONL trace (input of cache simulation).")
    t.add_argument("prompt")
    t.add_argument("-m", "--model", help="MoE model id or path to a .gguf file")
    t.add_argument("-o", "--out", default="trace.jsonl", help="trace file to write (default trace.jsonl)")
    t.add_argument("--max-tokens", type=int, default=128)
    t.add_argument("--temperature", type=float)
    t.set_defaults(func=cmd_trace)

    m = sub.add_parser("models", help="list installed models", description="List embedded and installed "
                       "models with their layout (architecture, layers, experts, quantisation).")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    h = sub.add_parser("hw", help="show this machine's hardware", description="Show CPU, RAM, GPUs, disk "
                       "and measured memory bandwidth.")
    h.add_argument("--json", action="store_true")
    h.set_defaults(func=cmd_hw)

    pl = sub.add_parser("plan", help="show where a model's tensors would live on this machine",
                        description="Plan a GGUF model on this machine (or on the budgets given): GPU layers, "
                        "which layers' experts stay in RAM, mmap/mlock, the largest context that fits, or why it "
                        "cannot run. Exits 3 when the model does not fit.")
    pl.add_argument("model", help="model id or path to a .gguf file")
    pl.add_argument("--vram", type=_size, help="free VRAM to plan for, e.g. 8GiB (0 = CPU only); default: detected")
    pl.add_argument("--ram", type=_size, help="available RAM to plan for, e.g. 16GiB; default: detected")
    pl.add_argument("--ctx", type=int, help="context length in tokens (default: 4096 or what fits)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    b = sub.add_parser("bench", help="benchmark accuracy and energy (intelligence per watt)",
                       description="Run a suite of questions with verifiable answers on models/policies and "
                       "report accuracy, joules, watts and IPW. Also: `bench list`, `bench compare RUN RUN`.")
    b.add_argument("--suite", default="quick", help="built-in suite name, a JSONL file, or hf:gsm8k|hf:mmlu|hf:arc")
    b.add_argument("--models", help="comma-separated model ids or .gguf paths (default: the default model)")
    b.add_argument("--policies", help="comma-separated: direct (default), small, large")
    b.add_argument("--limit", type=int, help="at most N items of the suite")
    b.add_argument("--max-tokens", type=int, default=128, help="answer length limit (default 128)")
    b.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                   help="measure idle power this long first and also record idle-subtracted joules")
    b.add_argument("--resume", type=int, metavar="RUN", help="continue an interrupted run")
    b.add_argument("--json", action="store_true")
    b.add_argument("--report", metavar="FILE.html", help="also write an HTML report with an accuracy/energy plot")
    b.set_defaults(func=cmd_bench)
    bsub = b.add_subparsers(dest="bench_cmd", metavar="{list,compare}")
    bl = bsub.add_parser("list", help="list benchmark runs")
    bl.add_argument("--json", action="store_true")
    bc = bsub.add_parser("compare", help="compare two runs")
    bc.add_argument("run_a", type=int)
    bc.add_argument("run_b", type=int)
    bc.add_argument("--json", action="store_true")

    lg = sub.add_parser("logs", help="show recent exchanges", description="Show recent recorded exchanges.")
    lg.add_argument("-n", type=int, default=10, help="how many (default 10)")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_logs)

    c = sub.add_parser("chat", help="start the chat UI (the default)", description="Start the terminal chat UI.")
    c.add_argument("-m", "--model", help="model id or path to a .gguf file")
    c.set_defaults(func=cmd_chat)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except LocalmoeError as exc:
        print(f"localmoe: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\nlocalmoe: interrupted (the question and the partial answer are recorded)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug of ours: still one line, with a way to get the details
        if os.environ.get("LOCALMOE_DEBUG"):
            raise
        print(f"localmoe: internal error: {type(exc).__name__}: {exc} (set LOCALMOE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 70
