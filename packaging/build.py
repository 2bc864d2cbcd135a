"""Build localmoe's wheel from this checkout and print its path.

    python packaging/build.py [--out dist] [--isolated]

Only what the wheel is made of (pyproject.toml, README.md, LICENSE, localmoe/, ui/, assets/) is copied to a temporary
directory and built there, so a build never writes build/ or *.egg-info into the checkout, where the editable install
and other builds live. By default the build uses this interpreter's setuptools (offline); `--isolated` lets pip fetch
the build requirements into a clean environment, as a release build should.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "localmoe", "ui", "assets")


def build(out: Path, *, isolated: bool = False, python: str = sys.executable) -> Path:
    """The wheel, built into `out`; raises SystemExit with pip's last lines when the build fails."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="localmoe-build-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
            else:
                shutil.copy2(path, src / name)
        wheels = Path(tmp) / "wheels"
        cmd = [python, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(wheels), str(src)]
        if not isolated:
            cmd.insert(4, "--no-build-isolation")
        done = subprocess.run(cmd, capture_output=True, text=True)
        built = sorted(wheels.glob("localmoe-*.whl"))
        if done.returncode != 0 or len(built) != 1:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise SystemExit(f"build.py: the wheel did not build:\n{tail}")
        target = out / built[0].name
        shutil.copy2(built[0], target)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "dist", help="where the wheel goes (default dist/)")
    p.add_argument("--isolated", action="store_true", help="fetch the build requirements into a clean environment")
    args = p.parse_args()
    print(build(args.out, isolated=args.isolated))
    return 0


if __name__ == "__main__":
    sys.exit(main())
