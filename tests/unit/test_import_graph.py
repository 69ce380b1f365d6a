"""The import graph of mistralrs and mistralrs_plugins: no cycles, and the core never imports the plugins.

The graph is read from the source with `ast` (nothing is imported), counting every import
statement wherever it sits — module level, inside functions, under `TYPE_CHECKING` — because
a lazy import inside a function still ties the lower module to the upper one. An edge goes to
the most specific module named: `from a import b` points at `a.b` when that is a module and at
`a` otherwise; parent packages are not added as edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = {
    "mistralrs": REPO / "core" / "mistralrs",
    "mistralrs_plugins": REPO / "plugins" / "mistralrs_plugins",
}


def module_files() -> dict[str, Path]:
    """Every module under the two roots, by dotted name (a package is named by its `__init__.py`)."""
    modules: dict[str, Path] = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is one of our modules."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The modules (ours or not) that `module` imports, each with the line of its first import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        found.setdefault(name, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_known(alias.name, modules) or alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    add(sub, node.lineno)
                else:
                    add(_known(base, modules) or base, node.lineno)
    found.pop(module, None)
    return found


def import_graph() -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    modules = module_files()
    graph = {
        name: {target: line for target, line in imports_of(name, path, modules).items() if target in modules}
        for name, path in modules.items()
    }
    return graph, modules


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); only the components that hold a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component (shortest back to its first member)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in seen:
                    seen.add(child)
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def describe(graph: dict[str, dict[str, int]], modules: dict[str, Path], cycle: list[str]) -> str:
    lines = []
    for here, there in zip(cycle, cycle[1:]):
        where = modules[here].relative_to(REPO)
        lines.append(f"  {here} -> {there}   ({where}:{graph[here][there]})")
    return "\n".join(lines)


def test_graph_sees_the_modules():
    graph, modules = import_graph()
    assert "mistralrs.engine.engine" in modules and "mistralrs_plugins.frontends.openai_server" in modules
    assert "mistralrs.registry" in graph["mistralrs.plugins"]  # sanity: edges are found


def test_no_import_cycles():
    graph, modules = import_graph()
    cycles = [a_cycle(graph, component) for component in strongly_connected(graph)]
    report = "\n\n".join(describe(graph, modules, cycle) for cycle in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s):\n{report}"


def test_core_never_imports_plugins():
    modules = module_files()
    offenders = []
    for name, path in modules.items():
        if not name.startswith("mistralrs.") and name != "mistralrs":
            continue
        for target, line in imports_of(name, path, modules).items():
            if target == "mistralrs_plugins" or target.startswith("mistralrs_plugins."):
                offenders.append(f"  {name} imports {target}   ({path.relative_to(REPO)}:{line})")
    assert not offenders, "the core imports the plugins:\n" + "\n".join(offenders)
