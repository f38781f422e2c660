"""The package's layers, checked from its source: dependencies point one way, no circles, rooms stay small.

docs/architecture.md states the rules; these tests read every module's imports with `ast` (nothing is
imported), so a change that breaks a rule fails here with the modules named, not later as a circular
import at run time.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_clip_it"

# What each layer may import of the package (besides itself). Layers not named here have no constraint.
ALLOWED = {
    "cache": set(),
    "templates": set(),
    "version": set(),
    "data": {"cache"},
    "search": {"cache", "collections"},
    "collections": {"cache", "data"},
    "encoders": {"cache", "data"},
    "losses": set(),
    "models": {"cache", "data", "encoders", "losses", "collections", "search", "templates", "distribution", "version"},
    "callbacks": {"models"},
    "tasks": {"cache", "data", "collections", "search", "encoders", "models", "templates"},
    "serving": {"cache", "data", "collections", "search", "encoders", "models", "templates", "version"},
}
MAX_LINES = 700


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(("keras_clip_it",) + parts), path


MODULES = dict(_modules())


def _imports(name, path):
    """The package modules `name` imports, at module level and inside functions alike."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import submodule` depends on the submodule; `from module import name` on the module.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {module for module in found if module in MODULES and module != name}


@pytest.fixture(scope="module")
def graph():
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_what_they_may(graph):
    wrong = []
    for module, imported in graph.items():
        allowed = ALLOWED.get(_layer(module))
        if allowed is None:
            continue
        for target in imported:
            layer = _layer(target)
            inner = ".".join(target.split(".")[1:3])
            if layer and layer != _layer(module) and layer not in allowed and inner not in allowed:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layer rules of docs/architecture.md:\n" + "\n".join(sorted(wrong))


def test_no_import_circles(graph):
    # A package's __init__ re-exporting its own submodules is how a package fronts its rooms, not a
    # circle; every other edge counts, function-level imports included.
    def edges(module):
        is_package = MODULES[module].name == "__init__.py"
        return {t for t in graph[module] if not (is_package and t.startswith(module + "."))}

    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges(node):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    assert not circles, "modules that import each other: " + "; ".join(" <-> ".join(c) for c in circles)


def test_no_module_over_the_size_limit():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines, split by concept: {long}"
