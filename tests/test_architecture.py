"""The package boundaries, checked from the source with ``ast``: no import circles, and each package imports
only what its layer may (esm_core: no Ray, Prefect or Parquet; storage: no models, no flows)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("esm_core", "storage", "flows")
FORBIDDEN = {
    "esm_core": ("ray", "prefect", "pyarrow", "duckdb", "flows", "storage.layout", "storage.catalog"),
    "storage": ("torch", "transformers", "ray", "prefect", "esm_core", "flows"),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module (of ours or not) that ``path`` imports, at any depth of its code (lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if f"{node.module}.{alias.name}" in modules
            )
    return names


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {m for m in _imports(path, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_package_boundaries() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        package = name.split(".")[0]
        for imported in _imports(path, modules):
            for banned in FORBIDDEN.get(package, ()):
                if imported == banned or imported.startswith(banned + "."):
                    wrong.append(f"{name} imports {imported}")
    assert not wrong, "; ".join(sorted(wrong))


def test_the_checker_sees_a_cycle(tmp_path: Path) -> None:
    """The graph is built from real import statements: a module importing itself back is found."""
    a = tmp_path / "a.py"
    a.write_text("import os\nfrom flows import cli\n\ndef f():\n    from storage.catalog import query\n")
    found = _imports(a, _modules())
    assert {"flows.cli", "storage.catalog"} <= found
