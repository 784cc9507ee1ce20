"""The import rules between loraserve's layers, checked on the source (ast), lazy imports included.

Layers, lowest first; a layer imports only itself and the layers listed for it:

    loraserve.v1         generated protobuf stubs      -> nothing
    loraserve.adapters   validation + durable store    -> nothing else of loraserve
    loraserve.client     gRPC client                   -> v1
    loraserve.testing    tiny-model builder (fixtures) -> nothing else of loraserve
    loraserve.server     gRPC server, engine           -> adapters, v1
    loraserve.finetune   train / eval / inspect / demo -> server, client, adapters, testing, v1
    loraserve.bench      benchmarks                    -> server, client, adapters, testing, v1
    loraserve (cli.py, __main__.py)                    -> anything (entry points)

Every layer may read `loraserve.__version__` (the package root holds nothing else).
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ALLOWED: dict[str, set[str]] = {
    "v1": set(),
    "adapters": set(),
    "client": {"v1"},
    "testing": set(),
    "server": {"adapters", "v1"},
    "finetune": {"server", "client", "adapters", "testing", "v1"},
    "bench": {"server", "client", "adapters", "testing", "v1"},
}
ROOT_MODULES = {"loraserve", "loraserve.__version__"}
"""The package root holds only the version: every layer may read it."""


def _package_dirs() -> dict[str, Path]:
    """Installed package name -> source folder, from pyproject's package-dir."""
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    return {name: ROOT / folder for name, folder in mapping.items()}


def layer_of_module(module: str) -> str | None:
    """`loraserve.server.engine.model` -> "server"; None for modules outside loraserve."""
    parts = module.split(".")
    if parts[0] != "loraserve":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else ""


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `source`, relative imports resolved."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "loraserve":  # `from loraserve import server` imports loraserve.server
                found += [(node.lineno, f"loraserve.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def upward_imports(package_dirs: dict[str, Path]) -> list[str]:
    """Every import that breaks the rules, as `file:line: layer imports module`."""
    problems: list[str] = []
    for package, folder in package_dirs.items():
        layer = layer_of_module(package)
        if layer == "":
            continue  # the entry points (and their v1 sub-folder, mapped separately below)
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            module = ".".join([package, *rel.parts]).removesuffix(".__init__")
            for line, target in imported_modules(
                path.read_text(), module, path.name == "__init__.py"
            ):
                if target in ROOT_MODULES:
                    continue
                other = layer_of_module(target)
                if other is None or other == layer:
                    continue
                if other not in ALLOWED[layer]:  # type: ignore[index]
                    where = path.relative_to(folder.parent)
                    problems.append(f"{where}:{line}: {layer} imports {target}")
    return problems


def test_layers_import_downward_only() -> None:
    dirs = _package_dirs()
    dirs["loraserve.v1"] = ROOT / "loraserve" / "v1"
    assert upward_imports(dirs) == []


@pytest.mark.parametrize(
    "source",
    [
        "from loraserve.server.engine.model import load_base_model\n",
        "def f():\n    import loraserve.client.sync\n",
        "from loraserve import finetune\n",
        "from ..server import app\n",
    ],
)
def test_the_check_catches_an_upward_import(tmp_path: Path, source: str) -> None:
    """An adapters module importing the server, the client or the toolkit is reported."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "store.py").write_text("from loraserve.adapters import errors\n" + source)
    problems = upward_imports({"loraserve.adapters": folder})
    assert len(problems) == 1 and problems[0].startswith("adapters/store.py:")
