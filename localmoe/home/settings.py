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
        raise LocalmoeError(f"settings {p}: [router] {exc}") from None
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
    """Tables as TOML. JSON's string escapes are valid in TOML basic strings; comments are not kept."""
    # keys outside any table must come before the first one
    out = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out += [""] if out else []
    for table, values in data.items():
        if isinstance(values, dict) and values:
            out.append(f"[{table}]")
            out += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
            out.append("")
    return "\n".join(out)


def read_raw(path: Path | None = None) -> dict[str, Any]:
    """The file's tables as written (checked by `load` first, so a broken file is refused, not half-read)."""
    p = path or paths.data_dir() / FILENAME
    load(p)
    return tomllib.loads(p.read_text(encoding="utf-8")) if p.exists() else {}


def save(data: dict[str, Any], path: Path | None = None) -> Settings:
    """Replace settings.toml with `data` (tables of values) after the checks every command makes: each tier names a
    model `models.resolve` finds, the preference parses, and `load` reads the written file back before it replaces
    the old one. What the UI's screens write through, so none can save a file the CLI would refuse. A one-line
    LocalmoeError otherwise, and the old file stays."""
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
    scratch = p.with_name(p.name + ".new")
    try:
        paths.write_private(scratch, toml_text(data))
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
