"""Routing traces: which experts every token used in every layer, the input of cache simulation and the UI.

One format for both engines, JSON lines: a header object, then one object per evaluated token:

    {"format": "localmoe-trace", "version": 1, "model": "...", "backend": "llama.cpp",
     "n_layers": 8, "n_experts": 32, "top_k": 4}
    {"pos": 0, "token": 1, "phase": "prompt", "experts": [[3, 17, 5, 9], ...one list per layer]}

Experts are listed in the router's order (highest weight first). A layer the engine did not compute for a token
is an empty list: llama.cpp runs the last layer of a prompt batch only for the token whose logits it needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localmoe.errors import LocalmoeError

FORMAT = "localmoe-trace"
VERSION = 1


@dataclass
class TraceToken:
    pos: int
    token: int
    phase: str  # prompt | decode
    experts: list[list[int]]  # [layer][k]; [] where the layer was not computed for this token


@dataclass
class Trace:
    model: str
    backend: str
    n_layers: int
    n_experts: int
    top_k: int
    tokens: list[TraceToken] = field(default_factory=list)

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "backend": self.backend,
                "n_layers": self.n_layers, "n_experts": self.n_experts, "top_k": self.top_k}

    def save(self, path: str | Path) -> None:
        p = Path(path)
        tmp = p.with_name(p.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.header()) + "\n")
                for t in self.tokens:
                    f.write(json.dumps(asdict(t), separators=(",", ":")) + "\n")
            tmp.replace(p)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise LocalmoeError(f"cannot write trace {p}: {exc.strerror or exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        p = Path(path)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
            head = json.loads(lines[0]) if lines else {}
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise LocalmoeError(f"cannot read trace {p}: {exc}") from None
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise LocalmoeError(f"{p} is not a localmoe routing trace")
        if not isinstance(head.get("version", 0), int):
            raise LocalmoeError(f"{p}: bad trace header (version {head['version']!r})")
        if head.get("version", 0) > VERSION:
            raise LocalmoeError(f"{p} was written by a newer localmoe (trace version {head['version']})")
        try:
            trace = cls(str(head["model"]), str(head["backend"]), int(head["n_layers"]), int(head["n_experts"]),
                        int(head["top_k"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalmoeError(f"{p}: bad trace header ({exc})") from None
        for n, line in enumerate(lines[1:], start=2):
            try:
                token = TraceToken(**json.loads(line))
            except (ValueError, TypeError) as exc:
                raise LocalmoeError(f"{p}:{n}: bad trace line ({exc})") from None
            # a replay of impossible routing would report cache figures for a model that does not exist
            layers = token.experts if isinstance(token.experts, list) else None
            if layers is None or len(layers) != trace.n_layers or not all(
                    isinstance(ids, list) and all(type(e) is int and 0 <= e < trace.n_experts for e in ids)
                    for ids in layers):
                raise LocalmoeError(f"{p}:{n}: bad trace line (experts must be {trace.n_layers} lists of expert ids "
                                    f"below {trace.n_experts}, as the header says)")
            trace.tokens.append(token)
        return trace
