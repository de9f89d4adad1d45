"""The layout's rules, checked: one installed import name, and `common/` a library that imports
nothing from the apps, the simulations or the command line (docs/DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP_FOLDERS = ("common", "client", "server", "simulations")
# What common/ may not import: the apps, the simulations, the command line (the modules directly
# in fedfuse/), and the pre-relayout top-level names.
FORBIDDEN_FOR_COMMON = ("client", "server", "simulations", "common", "bench", "tests")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement in `path` names, function-level imports included,
    relative imports resolved against the module's package."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = ["fedfuse", *rel.parts[:-1]]  # common/x/y.py is fedfuse.common.x.y
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.append((node.lineno, base))
            # `from fedfuse import cli` names fedfuse.cli
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if base == "fedfuse"]
    return found


def _violations(folder: Path) -> list[str]:
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for line, name in _imports(path):
            top = name.split(".")[0]
            inside = name == "fedfuse.common" or name.startswith("fedfuse.common.")
            if top in FORBIDDEN_FOR_COMMON or (name.startswith("fedfuse.") and not inside):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return bad


def test_common_imports_nothing_from_the_apps_simulations_or_cli():
    assert _violations(ROOT / "common") == []


def test_the_common_import_scan_catches_an_upward_import(tmp_path, monkeypatch):
    # the scan itself must be able to fail: a function-level upward import is found
    fake = tmp_path / "common"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from fedfuse.client import budget\n")
    (fake / "rel.py").write_text("from ..cli import main\n")
    (fake / "cli.py").write_text("from fedfuse import cli\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    found = " ".join(_violations(fake))
    assert "fedfuse.client" in found and "fedfuse.cli" in found


def test_no_test_module_imports_another():
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, name in _imports(path):
            if name.startswith("tests.") and name.split(".")[-1].startswith("test_"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert bad == []


def _top_level_names(dist: str) -> set[str]:
    return {
        name for name, dists in importlib.metadata.packages_distributions().items() if dist in dists
    }


def test_the_installed_distribution_provides_only_fedfuse():
    try:
        importlib.metadata.distribution("fedfuse")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("fedfuse is not installed: pip install -e '.[simulation,dev]'")
    names = _top_level_names("fedfuse")
    assert names == {"fedfuse"}, (
        f"the installed fedfuse provides {sorted(names)}; reinstall (pip install -e .) "
        "if it was installed before the re-layout"
    )


def test_pyproject_installs_every_package_under_fedfuse():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setup["package-dir"] == {
        "fedfuse": "fedfuse",
        **{f"fedfuse.{p}": p for p in APP_FOLDERS},
    }
    on_disk = {"fedfuse"} | {
        "fedfuse." + init.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for top in APP_FOLDERS
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert set(setup["packages"]) == on_disk, "pyproject.toml [tool.setuptools] packages"


def test_flower_components_load_from_the_installed_name():
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedfuse.server.app:app",
        "clientapp": "fedfuse.client.app:app",
    }
