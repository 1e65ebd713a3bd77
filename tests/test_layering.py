"""The package's import structure: no import cycles (function-level imports included) and imports only downward
between wings, read from every module's imports with ast. A TYPE_CHECKING import (a type hint) is not an import."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Wings from the top down: a module may import its own wing and the wings below it (framepack_engine.official and
# framepack_engine.errors import nothing of ours and may be imported from anywhere).
WINGS = ["commands", "serve", "root", "generation", "models", "media", "runtime", "kernels"]
ANYWHERE = {"framepack_engine", "framepack_engine.errors", "framepack_engine.official"}
OLD_NAMES = ("engine", "kernels")


def module_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    package = "framepack_engine" if relative.parts[0] == "engine" else "framepack_kernels"
    parts = [package, *relative.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def wing(module: str) -> str:
    if module.startswith("framepack_kernels"):
        return "kernels"
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in WINGS else "root"


def _type_checking_block(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_names(tree: ast.AST):
    """(name, line) of every import at any depth (functions included), TYPE_CHECKING blocks skipped."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_block(node):
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
            for alias in node.names:  # `from package import module`
                yield f"{node.module}.{alias.name}", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    files = sorted(ROOT.joinpath("engine").rglob("*.py")) + sorted(ROOT.joinpath("kernels").rglob("*.py"))
    modules = {module_name(path): path for path in files}
    graph = {}
    for name, path in modules.items():
        edges = {}
        for target, line in imported_names(ast.parse(path.read_text())):
            if target in modules and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert find_cycles(import_graph()) == []


def test_imports_run_only_downward_between_wings():
    upward = []
    for module, edges in import_graph().items():
        for target, line in edges.items():
            if target in ANYWHERE:
                continue
            if WINGS.index(wing(target)) < WINGS.index(wing(module)):
                upward.append(f"{module}:{line} imports {target} ({wing(module)} -> {wing(target)})")
    assert upward == []


def test_kernels_import_nothing_of_the_engine():
    for module, edges in import_graph().items():
        if module.startswith("framepack_kernels"):
            assert not [target for target in edges if target.startswith("framepack_engine")], module


def test_the_checks_find_a_cycle_and_an_upward_import():
    """The checks above can fail: a made-up graph with a cycle through a function-level import and an upward edge."""
    tree = ast.parse("def f():\n    from framepack_engine.commands.main import main\n")
    assert ("framepack_engine.commands.main", 2) in list(imported_names(tree))
    assert list(imported_names(ast.parse("if TYPE_CHECKING:\n    import framepack_engine.pipeline\n"))) == []
    graph = {"framepack_engine.models.dit": {"framepack_engine.runtime.sources": 1},
             "framepack_engine.runtime.sources": {"framepack_engine.models.dit": 3}}
    assert find_cycles(graph) == [["framepack_engine.models.dit", "framepack_engine.runtime.sources"]]
    assert WINGS.index(wing("framepack_engine.models.dit")) < WINGS.index(wing("framepack_engine.runtime.sources"))


def test_no_code_uses_the_old_top_level_names():
    """`engine` and `kernels` are folders, never import names (PyPI's `kernels` is transformers' dependency)."""
    offenders = []
    for folder in ("engine", "kernels", "bench", "tests"):
        for path in ROOT.joinpath(folder).rglob("*.py"):
            for target, line in imported_names(ast.parse(path.read_text())):
                if target.split(".")[0] in OLD_NAMES:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert offenders == []


@pytest.mark.parametrize("module, forbidden", [
    ("framepack_engine.models.dit", ("framepack_engine.serve", "framepack_engine.commands", "framepack_engine.media",
                                     "framepack_engine.generation", "framepack_engine.pipeline")),
    ("framepack_engine.runtime.planner", ("framepack_engine.models", "framepack_engine.generation",
                                          "framepack_engine.media", "framepack_engine.serve",
                                          "framepack_engine.commands")),
    ("framepack_engine.generation.runner", ("framepack_engine.serve", "framepack_engine.commands")),
])
def test_importing_a_lower_wing_loads_nothing_above_it(module, forbidden):
    code = (f"import sys, {module}; print('\\n'.join(sorted(name for name in sys.modules "
            f"if name.startswith('framepack_engine'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.split()
    assert module in loaded
    assert [name for name in loaded if name.startswith(forbidden)] == []
