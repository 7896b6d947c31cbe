"""The package's shape: layers that only import downward, no import cycle, a small top level.

Every import counts, at any depth (a function-level import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "overtrain"

# Bottom (0) to top. The most specific prefix decides a module's layer.
LAYERS = {
    "overtrain.errors": 0, "overtrain.spec": 0, "overtrain.runtime": 0, "overtrain.theory.linear": 0,
    "overtrain.data": 1,
    "overtrain.models": 2,
    "overtrain.probes": 3, "overtrain.train": 3,
    "overtrain.study": 4,
    "overtrain.analysis": 5, "overtrain.theory": 5,
    "overtrain.audit": 6,
    "overtrain.api": 7, "overtrain.cli": 7, "overtrain.callbacks": 7, "overtrain": 7,
}
MAX_TOP_LEVEL_MODULES = 6


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imports_of(module: str) -> set[str]:
    """The overtrain modules `module` imports, anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from overtrain.x import y` imports the module overtrain.x.y when there is one
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES and name != module}
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_no_import_cycle():
    state: dict[str, str] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target] if target in stack else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
              for module, targets in sorted(GRAPH.items()) for target in sorted(targets) if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_the_top_level_is_small():
    top = sorted(path.stem for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_the_checker_sees_imports_at_any_depth():
    # A function-level import is found: the CLI's are (today it imports api lazily or at the top).
    assert "overtrain.api" in GRAPH["overtrain.cli"]
    assert all(module in LAYERS or layer(module) >= 0 for module in MODULES)
