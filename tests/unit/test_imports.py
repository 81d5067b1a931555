"""qatkit's import structure: no cycles between its modules, and every import goes down the layers.

Read statically from the sources (every import, module-level or inside a function, except those only for type
checking), so a function-level import that hides a cycle from Python is still caught here.
"""

import ast
from pathlib import Path

import qatkit

SRC = Path(qatkit.__file__).parent

# bottom to top; a module may import its own layer's modules and those of the layers below
LAYERS = [
    {"core", "testing"},
    {"quant"},
    {"recipe"},
    {"run"},
    {"data"},
    {"models"},
    {"evaluation"},
    {"backends"},
    {"stages"},
    {"export"},
    {"report"},
    {"pipeline", "validate"},
    {"bench"},
    {"commands", "render"},
    {"cli", "__main__"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The qatkit modules a module imports at run time (`from pkg import submodule` counts as the submodule)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qatkit."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qatkit"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in SRC.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(ast.parse(path.read_text()), modules) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(module: str) -> int:
    top = module.split(".")[1] if module != "qatkit" else "__init__"
    return LAYER_OF.get(top, -1)


def test_no_import_cycle_inside_qatkit():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in _graph() if m != "qatkit" and _layer(m) < 0)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_imports_only_go_down_the_layers():
    upward = [
        f"{module} -> {imported}"
        for module, imports in _graph().items()
        if module != "qatkit"
        for imported in imports
        if imported != "qatkit" and _layer(imported) > _layer(module)
    ]
    assert not upward, "imports that go up a layer: " + "; ".join(sorted(upward))


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The detector itself: a two-module cycle and a function-level import are found."""
    graph = {"qatkit.a": {"qatkit.b"}, "qatkit.b": {"qatkit.a"}, "qatkit.c": set()}
    assert _cycle(graph) == ["qatkit.a", "qatkit.b", "qatkit.a"]
    tree = ast.parse(
        "def f():\n    from qatkit.core import io\nif TYPE_CHECKING:\n    from qatkit.recipe import Recipe\n"
    )
    assert _imports(tree, {"qatkit.core.io"}) == {"qatkit.core.io"}
    assert _layer("qatkit.core.io") < _layer("qatkit.cli")
