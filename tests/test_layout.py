"""The code's layout stays readable: no import cycles, small modules, argparse only in the commands.

Read from the source with ast, so imports inside functions count as much as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "osmseg"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    """osmseg's modules by dotted name (a package by its __init__)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The osmseg modules a file imports, anywhere in it (`from osmseg import x` counts x if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in modules:
                found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_the_graph_sees_the_imports_it_should():
    graph = _graph()
    assert "osmseg.osm.qatiles" in graph["osmseg.osm"]  # from osmseg.osm.qatiles import ...
    assert "osmseg.tiles" in graph["osmseg.labels"]
    assert "osmseg.atomic" in graph["osmseg.osm.download"]  # from osmseg import atomic


def test_no_import_cycles():
    graph = _graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for imported in sorted(graph.get(name, ())):
            visit(imported, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_tiles_imports_no_module_of_ours():
    assert _graph()["osmseg.tiles"] == set()


def test_no_library_module_parses_arguments():
    offenders = [
        name
        for name, path in _modules().items()
        if not name.startswith("osmseg.commands") and "argparse" in _imported_names(path)
    ]
    assert offenders == []


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_is_over_700_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_prepare_command_is_a_module_of_its_own():
    import prepare

    assert all(module.__name__.startswith("osmseg.commands.") for module in prepare.COMMANDS.values())
    assert len({module.__name__ for module in prepare.COMMANDS.values()}) == len(prepare.COMMANDS)
    for module in prepare.COMMANDS.values():
        assert callable(module.add_arguments) and callable(module.main) and module.HELP and module.__doc__
