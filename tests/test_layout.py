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


PACKAGE_FOLDERS = ("fedfuse", *APP_FOLDERS)


def _module_name(path: Path, root: Path) -> str:
    """fedfuse/cli.py -> fedfuse.cli; server/app.py -> fedfuse.server.app; a package's
    __init__.py -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] != "fedfuse":
        parts.insert(0, "fedfuse")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: Path, module: str, is_package: bool) -> set[str]:
    """The modules `path` imports when it is loaded: import statements outside function and
    class bodies, those under a module-level `if`/`try` (TYPE_CHECKING included) too."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    todo = list(ast.parse(path.read_text(), filename=str(path)).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            todo += [
                n
                for block in ("body", "orelse", "finalbody", "handlers")
                for n in getattr(node, block, [])
            ]
        elif isinstance(node, ast.ExceptHandler):
            todo += node.body
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
    return found


def _import_cycles(root: Path) -> list[list[str]]:
    """Every cycle among the package's modules (module-level imports), each as the modules on
    it, from strongly connected components (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for top in PACKAGE_FOLDERS:
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            name = _module_name(path, root)
            graph[name] = _module_level_imports(path, name, path.name == "__init__.py")
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in sorted(graph[m]):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            component = []
            while True:
                d = stack.pop()
                component.append(d)
                if d == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles_among_the_packages_modules():
    cycles = _import_cycles(ROOT)
    assert cycles == [], "modules that import each other (module level): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_cycle_scan_finds_a_cycle(tmp_path):
    # the scan itself must be able to fail: a cycle through a relative import and a
    # TYPE_CHECKING import (a hidden one) is found; a function-level import is not an edge
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("")
    (tmp_path / "server" / "a.py").write_text("from .b import thing\n")
    (tmp_path / "server" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fedfuse.server import a\n"
    )
    (tmp_path / "server" / "c.py").write_text("from fedfuse.server.a import x\n")
    (tmp_path / "server" / "d.py").write_text("def f():\n    from fedfuse.server import c\n")
    assert _import_cycles(tmp_path) == [["fedfuse.server.a", "fedfuse.server.b"]]


def _unexplained_function_imports(root: Path) -> list[str]:
    """Imports inside function bodies without a `# lazy: why` comment (in the comment block
    right above a run of import statements, or on one of them): a function-level import is only
    for a heavy or optional dependency that must load late, and says which and why."""
    bad = []
    for top in PACKAGE_FOLDERS:
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            lines = path.read_text().splitlines()
            tree = ast.parse("\n".join(lines), filename=str(path))
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for body in (n.body for n in ast.walk(fn) if hasattr(n, "body")):
                    if not isinstance(body, list):
                        continue
                    run: list[ast.stmt] = []
                    for stmt in [*body, None]:
                        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                            run.append(stmt)
                            continue
                        if run:
                            first = run[0].lineno - 1  # the run's first line, 0-based
                            while first > 0 and lines[first - 1].strip().startswith("#"):
                                first -= 1  # the comment block right above the run
                            span = lines[first : run[-1].end_lineno]
                            if not any("# lazy:" in line for line in span):
                                bad.append(f"{path.relative_to(root)}:{run[0].lineno}")
                        run = []
    return bad


def test_every_function_level_import_says_why_it_is_lazy():
    assert _unexplained_function_imports(ROOT) == []


def test_the_lazy_import_scan_finds_an_unexplained_one(tmp_path):
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "a.py").write_text(
        "def f():\n    import json\n\n\ndef g():\n    # lazy: torch takes seconds\n"
        "    import torch\n    import torchvision\n"
    )
    assert _unexplained_function_imports(tmp_path) == ["client/a.py:2"]


def _exceptions_outside_the_hierarchy(root: Path) -> list[str]:
    """Exception classes defined in the package that do not derive from FedfuseError (an AST
    scan: a class is an exception when its bases lead to a built-in exception or a name ending
    in Error/Exception; warning categories are not errors)."""
    import builtins

    builtin_exceptions = {
        n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
    }
    classes: dict[str, tuple[str, list[str]]] = {}
    for top in PACKAGE_FOLDERS:
        for path in sorted((root / top).rglob("*.py")) if (root / top).is_dir() else []:
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ClassDef):
                    bases = [
                        b.id if isinstance(b, ast.Name) else b.attr
                        for b in node.bases
                        if isinstance(b, (ast.Name, ast.Attribute))
                    ]
                    where = f"{path.relative_to(root)}:{node.lineno} {node.name}"
                    classes[node.name] = (where, bases)

    def ancestors(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        if name in seen or name not in classes:
            return {name}
        out = {name}
        for base in classes[name][1]:
            out |= ancestors(base, seen | {name})
        return out

    bad = []
    for name, (where, _) in sorted(classes.items()):
        up = ancestors(name)
        is_exception = any(
            n in builtin_exceptions or n.endswith(("Error", "Exception")) for n in up
        )
        is_warning = any(n.endswith("Warning") for n in up)
        if is_exception and not is_warning and "FedfuseError" not in up:
            bad.append(where)
    return bad


def test_every_exception_class_derives_from_fedfuse_error():
    assert _exceptions_outside_the_hierarchy(ROOT) == []


def test_the_exception_scan_finds_a_stray_exception(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "errors.py").write_text(
        "class FedfuseError(Exception): ...\nclass ConfigError(FedfuseError, ValueError): ...\n"
    )
    (tmp_path / "common" / "a.py").write_text(
        "class Fine(ConfigError): ...\nclass Stray(ValueError): ...\n"
        "class AlsoStray(Stray): ...\nclass Note(UserWarning): ...\nclass Plain: ...\n"
    )
    found = _exceptions_outside_the_hierarchy(tmp_path)
    assert [f.split()[-1] for f in found] == ["AlsoStray", "Stray"]
