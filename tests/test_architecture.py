"""The import rules of ARCHITECTURE.md, checked on the source: the layers, no trainer importing another trainer, no
private name imported across modules, no import cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "alignloop"

# Each layer may import the layers listed before it (and itself), never a later one.
LAYERS = [
    ("errors",),
    ("losses", "data"),
    ("models",),
    ("rollout", "training"),
    ("scoring", "evaluation", "rl", "personal"),
    ("trainers", "feedback"),
    ("recipes", "ai_feedback"),
    ("pipeline",),
    ("demo",),
    ("cli",),
]


def _name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in ROOT.rglob("*.py") if "migrations" not in p.parts}


MODULES = _modules()


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module of a relative `from .x import y` in `module`."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, top_level_only: bool = False):
    """(imported module, imported names, line) of every `import alignloop...` / `from alignloop... import ...`,
    relative imports (`from . import x`, `from .x import y`) included."""
    module = _name(path)
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.level:
            yield _absolute(module, path.name == "__init__.py", node), [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alignloop"):
            yield node.module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("alignloop"):
                    yield a.name, [], node.lineno


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    part = part if part else "cli"   # alignloop/__init__.py: the lazy front door, like the CLI
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module}: not in any layer of LAYERS; add its package there (and to ARCHITECTURE.md)")


def test_every_package_has_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layers_import_only_downwards(module):
    mine = _layer(module)
    for target, _, line in _imports(MODULES[module]):
        assert _layer(target) <= mine, f"{module}:{line} imports {target}, a higher layer"


def test_no_trainer_imports_another_trainer():
    for module, path in MODULES.items():
        if module.startswith("alignloop.trainers."):
            for target, names, line in _imports(path):
                others = [target] if target.startswith("alignloop.trainers.") else [
                    f"{target}.{n}" for n in names if target == "alignloop.trainers"]
                assert not [t for t in others if t != module], f"{module}:{line} imports {others}"


def test_no_private_name_crosses_modules():
    for module, path in MODULES.items():
        for target, names, line in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{module}:{line} imports private {private} from {target}"


def _resolve(target: str, names: list[str]) -> list[str]:
    """The modules an import statement loads: submodules named in a from-import, else the module itself."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs or ([target] if target in MODULES else [])


def test_no_import_cycles():
    graph = {m: sorted({t for target, names, _ in _imports(p, top_level_only=True)
                        for t in _resolve(target, names) if t != m}) for m, p in MODULES.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
