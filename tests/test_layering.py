"""The shape of the code, checked: no import circle in ``src/dlm``, no module importing from a
layer above its own, and no function longer than the project's limit. Static (the source is
parsed, nothing is imported), so a new module or a long new function fails here at once."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FUNCTION_LINES = 80

# Lowest first. A module may import from its own layer and the ones before it, never after.
# Prefixes: a package name covers its modules (the longest matching prefix decides).
LAYERS = [
    ["dlm.errors", "dlm.registry", "dlm.settings", "dlm.fsio", "dlm.batch", "dlm.device", "dlm.flops",
     "dlm.distributed", "dlm.runlock", "dlm.metrics", "dlm.infill",
     "dlm.export.modeling_dlm", "dlm.export.modeling_dlm_adapted"],  # the files an export ships: torch, transformers
    ["dlm.schema", "dlm.schedules", "dlm.distill.settings"],
    ["dlm.data", "dlm.backbones", "dlm.processes"],
    ["dlm.objectives", "dlm.samplers", "dlm.distill.methods"],
    ["dlm.families"],
    ["dlm.config"],
    ["dlm.checkpoint", "dlm.judge"],
    ["dlm.runs", "dlm.evaluate", "dlm.train", "dlm.trainer", "dlm.lm_eval_adapter", "dlm.trace", "dlm.distill"],
    ["dlm.service", "dlm.export"],
    ["dlm.bench"],
    ["dlm.cli", "dlm.__main__"],
]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the dlm modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        graph[name].add(sub)
                    elif target in mods:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in mods)
        graph[name].discard(name)
    return graph


def layer_of(name: str) -> int:
    best, found = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), i
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    found = cycles(imports(modules()))
    assert not found, f"import circles: {found}"


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "dlm" and layer_of(m) is None]
    assert not missing, f"modules without a layer in tests/test_layering.py: {missing}"


def test_no_import_from_a_higher_layer():
    graph = imports(modules())
    upward = [(a, b) for a, deps in graph.items() for b in deps
              if a != "dlm" and b != "dlm" and layer_of(b) > layer_of(a)]
    assert not upward, "imports from a higher layer: " + ", ".join(f"{a} → {b}" for a, b in upward)


def test_no_function_is_too_long():
    long = []
    for name, f in modules().items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("source,expect", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_circle_finder_finds_circles(source, expect):
    assert cycles(source) == expect
