"""User settings: one TOML file in the data dir. Every key is optional; a missing file means the defaults.

    [tiers]
    small = "smollm2-135m-instruct"   # model id or .gguf path; default: the embedded model
    large = "qwen3-30b-a3b-q4_k_m"    # default: the largest installed MoE the planner says fits
    remote = "http://127.0.0.1:8080/v1"   # optional OpenAI-compatible endpoint; used only when set
    remote_model = "my-model"
    remote_api_key_env = "OPENAI_API_KEY"  # the variable holding the key (the key itself is never stored)
    allow_remote = true       # false: no question ever leaves the machine, whatever else is set

    [router]
    strategy = "learned"      # features | learned | cascade; default: the best on the shipped held-out data
    preference = "balanced"   # quality | balanced | energy, or a number in (0, 1): the threshold itself

    [privacy]
    record = true             # false: the chat and `ask` answer off the record unless told otherwise (nothing stored)

    [energy]
    meter = "auto"            # auto: the best here | rapl | nvml | amdgpu | powermetrics | battery | estimate
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localmoe.errors import LocalmoeError, UsageError
from localmoe.home import paths

FILENAME = "settings.toml"
STRATEGIES = ("features", "learned", "probe", "cascade")
PREFERENCES = ("quality", "balanced", "energy")
AUTO_METER = "auto"
TABLES = ("tiers", "router", "privacy", "energy")
KEYS = {"tiers": ("small", "large", "remote", "remote_model", "remote_api_key_env", "allow_remote"),
        "router": ("strategy", "preference"), "privacy": ("record",), "energy": ("meter",)}


@dataclass
class Settings:
    small: str | None = None
    large: str | None = None
    remote: str | None = None
    remote_model: str | None = None
    remote_api_key_env: str | None = None
    allow_remote: bool = True
    strategy: str | None = None
    preference: str | float = "balanced"
    record: bool = True  # False: new chats and `ask` answers are off the record unless asked otherwise
    meter: str | None = None  # an energy meter's name (localmoe.record.meters.METER_NAMES); None: the best available
    path: Path | None = None
    unknown: tuple[str, ...] = ()  # keys no setting reads ("[router] prefrence"): a typo's default would go unseen

    def unknown_notice(self) -> str | None:
        """One line naming the keys this file has that localmoe does not read, or None."""
        if not self.unknown:
            return None
        return (f"settings {self.path}: {', '.join(self.unknown)} "
                f"{'is not a setting' if len(self.unknown) == 1 else 'are not settings'} (ignored; a typo?)")


def parse_preference(value: str | float) -> str | float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < float(value) < 1:
            raise UsageError(f"router preference {value} must be in (0, 1) or quality/balanced/energy")
        return float(value)
    text = str(value).strip().lower()
    if text in PREFERENCES:
        return text
    try:
        return parse_preference(float(text))
    except ValueError:
        raise UsageError(f"unknown router preference {value!r} (quality, balanced, energy or a number)") from None


def load(path: Path | None = None) -> Settings:
    p = path or paths.data_dir() / FILENAME
    if not p.exists():
        return Settings(path=p)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalmoeError(f"cannot read settings {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise LocalmoeError(f"settings {p} is not valid TOML: {exc}") from None
    for table in TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise LocalmoeError(f"settings {p}: {table} must be a table ([{table}])")
    tiers, router = data.get("tiers", {}), data.get("router", {})
    privacy, energy = data.get("privacy", {}), data.get("energy", {})
    record = privacy.get("record", True)
    if not isinstance(record, bool):  # "false" as a string would be truthy: refuse rather than record
        raise LocalmoeError(f"settings {p}: [privacy] record must be true or false, not {record!r}")
    try:
        meter = parse_meter(energy.get("meter"))
    except LocalmoeError as exc:
        raise LocalmoeError(f"settings {p}: [energy] {exc}") from None
    for key in ("small", "large", "remote", "remote_model", "remote_api_key_env"):
        if not isinstance(tiers.get(key, ""), str):  # a number or a list would fail later, inside a command
            raise LocalmoeError(f"settings {p}: [tiers] {key} must be a string, not {tiers[key]!r}")
    strategy = router.get("strategy")
    remote = tiers.get("remote")
    if remote and not str(remote).startswith(("http://", "https://")):
        raise LocalmoeError(f"settings {p}: [tiers] remote must be an http(s) URL, not {remote!r}")
    allow_remote = tiers.get("allow_remote", True)
    if not isinstance(allow_remote, bool):  # "false" as a string would be truthy: refuse rather than send
        raise LocalmoeError(f"settings {p}: [tiers] allow_remote must be true or false, not {allow_remote!r}")
    if strategy is not None and strategy not in STRATEGIES:
        raise LocalmoeError(f"settings {p}: unknown router strategy {strategy!r} ({', '.join(STRATEGIES)})")
    try:
        preference = parse_preference(router.get("preference", "balanced"))
    except LocalmoeError as exc:  # the file is at fault, not the command line: exit 1, naming the file
        raise LocalmoeError(f"settings {p}: {exc}") from None  # the message names [router] preference itself
    return Settings(
        small=tiers.get("small") or None,
        large=tiers.get("large") or None,
        remote=tiers.get("remote") or None,
        remote_model=tiers.get("remote_model") or None,
        remote_api_key_env=tiers.get("remote_api_key_env") or None,
        allow_remote=allow_remote,
        strategy=strategy,
        preference=preference,
        record=record,
        meter=meter,
        path=p,
        unknown=tuple([*(f"[{t}] {k}" for t in TABLES for k in data.get(t, {}) if k not in KEYS[t]),
                       *(f"{k}" for k in data if k not in TABLES)]),
    )


def meter_names() -> tuple[str, ...]:
    """What `[energy] meter` may name: auto, then every meter localmoe knows (best first)."""
    from localmoe.record.meters import METER_NAMES  # only when a meter is named: it imports psutil

    return (AUTO_METER, *METER_NAMES)


def parse_meter(value: Any) -> str | None:
    """A meter's name as `select_meter` takes it, None for auto (or no value); a one-line error otherwise."""
    if value is None:
        return None
    text = value.strip().lower() if isinstance(value, str) else None
    if text == "" or text == AUTO_METER:
        return None
    names = meter_names()
    if text not in names:
        raise LocalmoeError(f"unknown energy meter {value!r} (meter: {', '.join(names)})")
    return text


def toml_text(data: dict[str, dict[str, Any]]) -> str:
    """Tables as TOML, written afresh (`edited_text` keeps an existing file's comments). JSON's string escapes are
    valid in TOML basic strings."""
    # keys outside any table must come before the first one
    out = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out += [""] if out else []
    for table, values in data.items():
        if isinstance(values, dict) and values:
            out.append(f"[{table}]")
            out += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
            out.append("")
    return "\n".join(out)


_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_-]+)\s*\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def _split_comment(line: str) -> tuple[dict[str, Any], str] | None:
    """A `key = value  # comment` line as its parsed key and value, and its comment ("" if none); None if the line is
    not a whole key-value pair by itself (a value running on over several lines). A "#" inside a string is not a
    comment: the first cut TOML reads is the value's end."""
    cuts = [i for i, ch in enumerate(line) if ch == "#"] + [len(line)]
    for cut in cuts:
        try:
            return tomllib.loads(line[:cut]), line[cut:]
        except tomllib.TOMLDecodeError:
            continue
    return None


def _pruned(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not (isinstance(v, dict) and not v)}


def edited_text(text: str, data: dict[str, Any]) -> str | None:
    """`text` (a TOML file) made to hold `data` by rewriting only the lines of keys whose value changed, removing
    those of keys `data` lacks, and adding new keys under their table: the user's comments, blank lines and order
    stay. None when the file is shaped beyond this (arrays of tables, dotted keys, a value over several lines), or
    when the result would not read back as `data`; the caller then writes the file afresh."""
    lines = text.splitlines()
    table = ""
    at: dict[tuple[str, str], int] = {}
    end: dict[str, int] = {"": -1}  # the line after which a new key of the table goes
    for i, line in enumerate(lines):
        if header := _HEADER.match(line):
            table = header.group(1)
            if table in end:
                return None  # a table opened twice: not valid TOML anyway
            end[table] = i
        elif line.lstrip().startswith("["):
            return None
        elif key := _KEY.match(line):
            at[(table, key.group(1))] = i
            end[table] = i
    wanted = {("", k): v for k, v in data.items() if not isinstance(v, dict)}
    wanted |= {(t, k): v for t, values in data.items() if isinstance(values, dict) for k, v in values.items()}
    out: list[str | None] = list(lines)
    after: dict[int, list[str]] = {}
    new_tables: dict[str, list[str]] = {}
    for (t, k), value in wanted.items():
        line = f"{k} = {json.dumps(value)}"
        if (t, k) in at:
            parsed = _split_comment(lines[at[(t, k)]])
            if parsed is None:
                return None
            if parsed[0].get(k) == value and type(parsed[0].get(k)) is type(value):
                continue
            out[at[(t, k)]] = line + (f"  {parsed[1]}" if parsed[1] else "")
        elif t in end:
            after.setdefault(end[t], []).append(line)
        else:
            new_tables.setdefault(t, []).append(line)
    for spot, i in at.items():
        if spot not in wanted:
            out[i] = None
    result: list[str] = after.get(-1, [])
    for i, line in enumerate(out):
        if line is not None:
            result.append(line)
        result += after.get(i, [])
    for t, added in new_tables.items():
        result += (["", f"[{t}]"] if result and result[-1].strip() else [f"[{t}]"]) + added
    new = "\n".join(result) + "\n"
    try:
        if _pruned(tomllib.loads(new)) != _pruned(data):
            return None
    except tomllib.TOMLDecodeError:
        return None
    return new


def read_raw(path: Path | None = None) -> dict[str, Any]:
    """The file's tables as written (checked by `load` first, so a broken file is refused, not half-read)."""
    p = path or paths.data_dir() / FILENAME
    load(p)
    return tomllib.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def save(data: dict[str, Any], path: Path | None = None) -> Settings:
    """Replace settings.toml with `data` (tables of values) after the checks every command makes: each tier names a
    model `models.resolve` finds, the preference parses, and `load` reads the written file back before it replaces
    the old one. What the UI's screens write through, so none can save a file the CLI would refuse. A one-line
    LocalmoeError otherwise, and the old file stays. Only the lines of changed keys are rewritten: the user's
    comments stay (`edited_text`)."""
    from localmoe.home import models  # models reads the catalog: only a write needs it

    p = path or paths.data_dir() / FILENAME
    data = {t: dict(v) if isinstance(v, dict) else v for t, v in data.items()}
    tiers, router = data.get("tiers", {}), data.get("router", {})
    for tier in ("small", "large"):
        if tiers.get(tier):
            try:
                ref = models.resolve(tiers[tier])
                if ref.path.is_file():  # a GGUF whatever its name (an Ollama blob has none); not a checkpoint dir
                    from localmoe.placement.layout import read_model_layout

                    read_model_layout(ref.path)  # its header: a file `ask` would refuse is refused here too
            except LocalmoeError as exc:
                raise LocalmoeError(f"{tier} tier: {exc}") from None
    if router.get("preference") is not None:
        router["preference"] = parse_preference(router["preference"])  # "0.3" is stored as a number
    try:
        before = p.read_text(encoding="utf-8") if p.is_file() else None
    except (OSError, UnicodeDecodeError):
        before = None
    text = edited_text(before, data) if before is not None else None
    scratch = p.with_name(p.name + ".new")
    try:
        paths.write_private(scratch, toml_text(data) if text is None else text)
        try:
            saved = load(scratch)  # the reader every command uses has the last word
        except LocalmoeError as exc:
            scratch.unlink(missing_ok=True)
            raise LocalmoeError(str(exc).replace(str(scratch), str(p))) from None
        scratch.replace(p)
    except OSError as exc:
        scratch.unlink(missing_ok=True)
        raise LocalmoeError(f"cannot write {p}: {exc.strerror or exc}") from None
    saved.path = p
    return saved


def update(table: str, values: dict[str, Any], path: Path | None = None) -> Settings:
    """Set (or, with None, remove) keys of one table, keeping the rest of the file; checked and written by `save`."""
    data = read_raw(path)
    current = dict(data.get(table, {}))
    for key, value in values.items():
        if value is None or value == "":
            current.pop(key, None)
        else:
            current[key] = value
    data[table] = current
    return save(data, path)
