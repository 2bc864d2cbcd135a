"""The hardware and experts screen: what this machine has (RAM, VRAM, disk, memory bandwidth when it was measured
before: opening never measures), and for the model that answered last, which experts it used — a heat map of layers
× experts, shaded by how often the answer routed to each — with what the engine reports of its expert cache.

The native torch engine reports its cache per layer (`cache_stats()`: hits, misses, prefetch hits, bytes read,
stall time, decode path); per-expert use comes from routing telemetry (`engine.routing`, the experts of every
evaluated token per layer), which both engines record when it is on (t here: it costs speed, so it is off until
asked for). The cache also counts hits, misses and prefetch hits per expert (`expert_cache_counts()`), which v
shades the map by in turn. A dense or remote model has neither, and the screen says so in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import ScrollableContainer
from textual.screen import Screen
from textual.widgets import Header, Static

from localmoe.errors import LocalmoeError
from localmoe.ui.footer import FitFooter
from localmoe.units import human_bytes

SHADES = "░▒▓█"  # a cell's share of the hottest cell's uses, in quarters; "·" is an expert the answer never used
UNUSED = "·"
LIVE_INTERVAL_S = 1.0  # how often the view follows an answer being written (engines with an expert cache)


def expert_counts(routing: Sequence[Any], n_layers: int, n_experts: int) -> list[list[int]]:
    """Uses per (layer, expert): how many evaluated tokens (prompt and answer) the router sent to each expert."""
    counts = [[0] * n_experts for _ in range(n_layers)]
    for token in routing:
        for layer, experts in enumerate(token.experts[:n_layers]):
            for expert in experts:
                if 0 <= expert < n_experts:
                    counts[layer][expert] += 1
    return counts


def shade(count: int, hottest: int) -> str:
    if count <= 0 or hottest <= 0:
        return UNUSED
    return SHADES[min(len(SHADES) - 1, (count * len(SHADES) - 1) // hottest)]


def _color(count: int, hottest: int) -> str:
    """Cold blue to hot orange, so the map reads at a glance in colour too."""
    f = count / hottest if hottest else 0.0
    lo, hi = (70, 90, 160), (255, 160, 40)
    return "rgb({},{},{})".format(*(int(a + (b - a) * f) for a, b in zip(lo, hi, strict=True)))


def heat_map(counts: list[list[int]] | None, layer_notes: Sequence[str] = (), what: str = "uses") -> Text:
    """The grid as text: a header of expert numbers (tens over units from 10 experts on), then one line per layer,
    one character per expert, and what the engine reports of that layer after it. Without counts (no telemetry),
    the layers' notes alone."""
    if counts is None:
        label = len(f"L{len(layer_notes) - 1}") + 1
        return Text("\n".join(f"L{layer}".ljust(label) + note for layer, note in enumerate(layer_notes)),
                    no_wrap=True)
    n_layers, n_experts = len(counts), len(counts[0]) if counts else 0
    hottest = max((c for row in counts for c in row), default=0)
    label = len(f"L{n_layers - 1}") + 1
    out = Text(no_wrap=True)
    if n_experts >= 10:
        out.append(" " * label + "".join(str(e // 10 % 10) if e % 10 == 0 else " " for e in range(n_experts)) + "\n",
                   style="dim")
    out.append(" " * label + "".join(str(e % 10) for e in range(n_experts)) + "  expert\n", style="dim")
    for layer, row in enumerate(counts):
        out.append(f"L{layer}".ljust(label), style="dim")
        for count in row:
            out.append(shade(count, hottest), style=_color(count, hottest) if count else "dim")
        note = layer_notes[layer] if layer < len(layer_notes) else ""
        out.append(f"  {sum(row)} {what}" + (f" · {note}" if note else "") + ("\n" if layer < n_layers - 1 else ""))
    return out


def layer_note(s: dict[str, Any]) -> str:
    """One layer of the torch engine's cache statistics in a few words."""
    parts = []
    if s.get("hit_rate") is not None:
        parts.append(f"hit {s['hit_rate']:.0%}")
    parts.append(f"{s.get('misses', 0)} miss")
    if s.get("warm_hits"):
        parts.append(f"{s['warm_hits']} warm")
    if s.get("prefetch_hits") or s.get("prefetches"):
        parts.append(f"{s.get('prefetch_hits', 0)} prefetch hits of {s.get('prefetches', 0)}")
    return " · ".join(parts)


# What the heat map can shade by: uses come from routing telemetry (or, without it, the cache's hits and misses
# together); the rest from the expert cache's counters per expert.
VIEWS = ("uses", "misses", "hits", "prefetch hits")
_COUNTER = {"misses": "misses", "hits": "hits", "prefetch hits": "prefetch_hits"}


def views_of(run: dict[str, Any] | None) -> list[str]:
    """The views this answer's statistics allow, in VIEWS order."""
    if run is None or run.get("shape") is None:
        return []
    per_expert = run.get("per_expert")
    if per_expert:
        return list(VIEWS)
    return ["uses"] if run.get("routing") else []


def view_counts(run: dict[str, Any], view: str) -> list[list[int]] | None:
    """Counts per (layer, expert) for `view`, or None when the answer has none of that kind."""
    n_layers, n_experts, _ = run["shape"]
    per_expert = run.get("per_expert") or []
    if view == "uses":
        if run.get("routing"):
            return expert_counts(run["routing"], n_layers, n_experts)
        if not per_expert:
            return None
        return [[h + m for h, m in zip(layer["hits"], layer["misses"], strict=True)] for layer in per_expert]
    if not per_expert:
        return None
    return [list(layer[_COUNTER[view]]) for layer in per_expert]


def describe_run(run: dict[str, Any] | None, telemetry: bool, answering: bool = False,
                 view: str = "uses") -> tuple[str, list[list[int]] | None, list[str]]:
    """(the summary lines, the counts for the heat map or None, per-layer notes) for the latest answer, its map
    shaded by `view` (one of views_of(run); the first of them when it is not)."""
    if run is None:
        if answering:
            return "The first answer is being written: its experts show here when it ends.", None, []
        return "No answer yet: ask a question, then this shows which experts answered it.", None, []
    model, backend, shape = run["model"], run["backend"], run["shape"]
    if shape is None:
        return (f"No expert statistics: the last answer came from {model} on {backend}, which is not a mixture of "
                "experts."), None, []
    n_layers, n_experts, top_k = shape
    routing, cache = run["routing"], run["experts"]
    layers = cache.get("layers", []) if cache else []
    views = views_of(run)
    if not views and not layers:
        why = "telemetry is on for the next answers" if telemetry else "t turns it on for the next answers"
        return (f"No expert statistics for {model}: {backend} reports the experts it used only with routing "
                f"telemetry ({why}; observing costs some speed)."), None, []
    view = view if view in views else (views[0] if views else "uses")
    lines = [f"Last answer: {model} on {backend}, {n_layers} layers × {n_experts} experts, top-{top_k}."]
    stats = run["stats"]
    if routing:
        decoded = sum(1 for t in routing if t.phase == "decode")
        lines.append(f"Routing telemetry: {len(routing)} tokens evaluated ({len(routing) - decoded} of the prompt, "
                     f"{decoded} of the answer).")
    if views:
        what = "uses (cache hits and misses)" if view == "uses" and not routing else view
        other = f"; v shades by {views[(views.index(view) + 1) % len(views)]}" if len(views) > 1 else ""
        lines.append(f"A cell's shade is its expert's {what} ({SHADES[-1]} most, {UNUSED} none){other}.")
    else:
        lines.append("Per-expert uses need routing telemetry (t: on for the next answers); the layers' cache "
                     "statistics follow.")
    if cache:
        tokens = (stats.prompt_eval_tokens or 0) + (stats.completion_tokens or 0) if stats else 0
        moved = (cache.get("bytes_read") or 0) + (cache.get("bytes_copied") or 0)
        per_token = f"{human_bytes(moved / tokens)} per token" if tokens else "-"
        wall = stats.wall_s if stats and stats.wall_s else None
        stall = f"{(cache.get('stall_s') or 0) / wall:.0%}" if wall else "-"
        hit = f"{cache['hit_rate']:.0%}" if cache.get("hit_rate") is not None else "-"
        lines.append(f"Expert cache: {cache.get('slots')} slots per layer ({cache.get('policy')}"
                     f"{', prefetch' if cache.get('prefetch') else ''}), hit rate {hit}, "
                     f"{cache.get('misses', 0)} misses, {cache.get('prefetch_hits', 0)} prefetch hits; "
                     f"{human_bytes(moved)} moved ({per_token}); stalled {stall} of the answer.")
        lines.append(f"Decode path: {cache.get('decode_step')} step, {cache.get('expert_kernel')} expert kernels, "
                     f"{cache.get('expert_dtype')} experts on {cache.get('device')}"
                     f"{', compiled' if cache.get('compiled') else ''}.")
    elif run.get("plan") is not None:
        plan = run["plan"]  # llama.cpp's placement (placement.plan.Plan): the torch engine reports its cache
        paged = plan.paged_bytes
        where = f"{plan.n_gpu_layers} layers offloaded to the GPU" if plan.n_gpu_layers else "on the CPU"
        lines.append(f"Decode path: llama.cpp {where}; "
                     + (f"{human_bytes(paged)} of weights paged from disk through mmap as tokens need them."
                        if paged else "every weight resident (llama.cpp keeps no expert cache of its own)."))
    counts = view_counts(run, view) if views else None
    return "\n".join(lines), counts, [layer_note(s) for s in layers]


class HardwareScreen(Screen[None]):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("r", "refresh_view", "Refresh"),
        # one key, two labels: the footer says which applies
        Binding("t", "telemetry(True)", "Telemetry on"),
        Binding("t", "telemetry(False)", "Telemetry off"),
        Binding("v", "next_view", "Shade by", tooltip="Shade the heat map by the next count"),
        Binding("b", "measure", "Bandwidth", tooltip="Measure bandwidth"),
    ]

    def __init__(self, chat: Any) -> None:
        """`chat`: the chat screen, whose `last_run` and `telemetry` this shows and sets."""
        super().__init__()
        self.chat = chat
        self.hardware: Any = None
        self.counts: list[list[int]] | None = None
        self.view = VIEWS[0]  # what the heat map's shades count (v cycles through views_of the answer shown)
        self._shown: dict[str, Any] | None = None  # the answer on screen

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("Reading this machine…", id="hw-summary")
        yield Static("", id="experts-summary")
        with ScrollableContainer(id="heatmap"):
            yield Static("", id="heatmap-grid")
        yield FitFooter()

    def on_mount(self) -> None:
        self.title, self.sub_title = "localmoe", "hardware and experts"
        self.query_one("#heatmap", ScrollableContainer).focus()
        self.read_hardware()
        self.show_experts()
        self.set_interval(LIVE_INTERVAL_S, self.follow_answer)

    def follow_answer(self) -> None:
        """While an answer is written on an engine with an expert cache, its counts so far."""
        if not self.chat.generating:
            return
        run = self.chat.live_run()
        if run is not None:
            self.show_experts(run, live=True)

    @work(thread=True, exclusive=True, group="hardware")
    def read_hardware(self, measure: bool = False) -> None:
        """GPU detection can take a moment (NVML): off the UI thread. The bandwidth is measured only when asked."""
        from localmoe.placement import hardware

        try:
            hw = hardware.detect(measure=measure)
            if not measure:
                hw.memory_bandwidth_gbps, hw.bandwidth_cached = hardware.known_bandwidth(hw), True
        except (LocalmoeError, OSError) as exc:
            self.app.call_from_thread(self.query_one("#hw-summary", Static).update,
                                      Text(f"Cannot read this machine: {exc}"))
            return
        self.app.call_from_thread(self.show_hardware, hw)

    def show_hardware(self, hw: Any) -> None:
        self.hardware = hw
        limit = f" (capped at {human_bytes(hw.memory_limit_bytes)})" if hw.memory_limit_bytes else ""
        lines = [f"CPU   {hw.cpu_model} ({hw.physical_cores} cores, {hw.logical_cores} threads, {hw.arch})",
                 f"RAM   {human_bytes(hw.ram_available_bytes)} available of {human_bytes(hw.ram_total_bytes)}{limit}"]
        if not hw.gpus:
            lines.append("VRAM  none: no GPU detected (CPU only)")
        for g in hw.gpus:
            kind = "unified memory" if g.unified_memory else "VRAM"
            lines.append(f"GPU {g.index} {g.name}: {human_bytes(g.vram_free_bytes)} {kind} free of "
                         f"{human_bytes(g.vram_total_bytes)}")
        lines.append(f"Disk  {human_bytes(hw.disk_free_bytes)} free in {hw.data_dir}")
        bw = hw.memory_bandwidth_gbps
        lines.append(f"Memory bandwidth  {bw:.1f} GB/s copy (measured{' earlier' if hw.bandwidth_cached else ''})"
                     if bw else "Memory bandwidth  not measured yet (b measures it, about a second)")
        self.query_one("#hw-summary", Static).update(Text("\n".join(lines)))

    def show_experts(self, run: dict[str, Any] | None = None, live: bool = False) -> None:
        """The latest finished answer, or with `live` the one being written (`run`)."""
        self._shown = run if live else self.chat.last_run
        views = views_of(self._shown)
        if views and self.view not in views:
            self.view = views[0]
        summary, counts, notes = describe_run(self._shown, self.chat.telemetry, self.chat.generating, self.view)
        if live:
            summary = "Answering now, counts so far. " + summary.replace("Last answer: ", "", 1)
        self.counts = counts
        self.query_one("#experts-summary", Static).update(Text(summary))
        grid = self.query_one("#heatmap-grid", Static)
        grid.update(heat_map(counts, notes, self.view) if counts or notes else "")
        grid.display = bool(counts or notes)
        self.refresh_bindings()  # v appears once an answer with more than one view is shown

    def on_chat_screen_answer_finished(self) -> None:
        self.show_experts()

    # -- actions ----------------------------------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "telemetry":
            return bool(parameters[0]) != self.chat.telemetry
        if action == "next_view":  # shown only when the answer on screen has more than one thing to shade by
            return len(views_of(self._shown)) > 1
        return True

    def action_back(self) -> None:
        self.dismiss(None)

    def action_refresh_view(self) -> None:
        self.read_hardware()
        self.show_experts()

    def action_telemetry(self, on: bool) -> None:
        self.chat.telemetry = on
        self.refresh_bindings()
        self.show_experts()
        self.notify("Routing telemetry on: the next answers of a MoE record the experts they use (a little slower)."
                    if on else "Routing telemetry off from the next answer.", title="Experts", markup=False)

    def action_next_view(self) -> None:
        views = views_of(self._shown)
        if len(views) < 2:
            return
        self.view = views[(views.index(self.view) + 1) % len(views) if self.view in views else 0]
        if self.chat.generating and (run := self.chat.live_run()) is not None:
            self.show_experts(run, live=True)
        else:
            self.show_experts()

    def action_measure(self) -> None:
        self.query_one("#hw-summary", Static).update(Text("Measuring the memory bandwidth…"))
        self.read_hardware(measure=True)
