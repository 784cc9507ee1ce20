"""The installed package, not the checkout: one top-level name, the CLI and its data work.

The package is built and installed NON-editably (`pip install --no-deps --target DIR`) from a
copy of the sources, then run with `python -S` (no site-packages processing, so the checkout's
editable install is invisible) from a directory outside the checkout, with DIR first on the path
and the current environment's site-packages after it for the dependencies only.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _package_folders() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return sorted(set(config["package-dir"].values()))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(install dir, env to run it with)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in _package_folders():
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    deps = os.pathsep.join(site.getsitepackages())
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(root)),
        "PYTHONPATH": f"{target}{os.pathsep}{deps}",
        "HF_HUB_OFFLINE": "1",
        "LORASERVE_CACHE": str(root / "cache"),
    }
    return target, env


def _run(installed: tuple[Path, dict[str, str]], *argv: str, cwd: Path) -> str:
    _, env = installed
    result = subprocess.run(
        [sys.executable, "-S", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_exactly_one_top_level_package(installed: tuple[Path, dict[str, str]]) -> None:
    target, _ = installed
    top = sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info"))
    assert top == ["bin", "loraserve"], top


def test_console_script_version_and_help_outside_the_checkout(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    target, _ = installed
    script = str(target / "bin" / "loraserve")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _run(installed, script, "--version", cwd=tmp_path).strip() == f"loraserve {version}"
    assert "usage: loraserve demo" in _run(installed, script, "demo", "--help", cwd=tmp_path)
    assert "usage:" in _run(installed, script, "bench", "--help", cwd=tmp_path)


def test_imports_and_package_data_come_from_the_install(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    target, _ = installed
    code = (
        "import loraserve, loraserve.server.app, loraserve.client.sync, loraserve.adapters.store\n"
        "import loraserve.finetune.demo as demo, loraserve.bench.run\n"
        "import loraserve.testing.tiny_model\n"
        "import sys\n"
        "print(loraserve.__file__)\n"
        "print(demo.DATA_DIR)\n"
        "print(sorted(p.name for p in demo.DATA_DIR.iterdir()))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('server', 'client', 'adapters', 'bench', 'finetune', 'testing')))\n"
    )
    lines = _run(installed, "-c", code, cwd=tmp_path).splitlines()
    assert Path(lines[0]).is_relative_to(target), lines[0]
    assert Path(lines[1]).is_relative_to(target), lines[1]
    assert lines[2] == "['acme_facts.jsonl', 'globex_facts.jsonl']"
    assert lines[3] == "[]"  # no generic top-level names are imported


def test_packages_list_matches_the_package_folders() -> None:
    """pyproject lists every folder with an __init__.py under the mapped folders, and no other."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = config["package-dir"]
    found = set()
    for package, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert sorted(config["packages"]) == sorted(found)
