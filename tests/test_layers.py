"""The package's layers import only downward: core ← evaluation, train, batch, serve ← cli (convert sits beside core,
below train and cli). Read from the source, so an upward or circular import fails here, not in a user's install."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "genarm_local"
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "convert": {"core"},
    "evaluation": {"core"},
    "train": {"core", "convert", "evaluation"},
    "batch": {"core"},
    "serve": {"core", "evaluation"},
    "cli": {"core", "convert", "evaluation", "train", "batch", "serve"},
}
NATIVE = {"native.py", "context.py", "sampling.py"}  # the only modules that talk to llama.cpp


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent != PACKAGE:
            yield path.relative_to(PACKAGE).parts[0], path
    for path in sorted((ROOT / "convert").glob("*.py")):
        yield "convert", path


def imported_layers(path: Path, layer: str):
    """(lineno, layer) of every genarm_local import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("genarm_local."):
                yield node.lineno, node.module.split(".")[1]
            elif node.level == 1:
                yield node.lineno, layer
            elif node.level >= 2:
                target = (node.module or "").split(".")[0]
                yield node.lineno, target or "genarm_local"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("genarm_local."):
                    yield node.lineno, alias.name.split(".")[1]


def test_every_layer_imports_only_downward():
    upward = []
    for layer, path in modules():
        for lineno, target in imported_layers(path, layer):
            if target in ("_fused",) and layer == "core":  # the compiled kernel is part of core
                continue
            if target != layer and target not in ALLOWED[layer]:
                upward.append(f"{path.relative_to(ROOT)}:{lineno} ({layer} imports {target})")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_only_the_native_owners_import_llama_cpp():
    offenders = []
    for layer, path in modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        if any(name == "llama_cpp" or name.startswith("llama_cpp.") for name in names) and not (
            layer == "core" and path.name in NATIVE
        ):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"llama_cpp imported outside core/{{{', '.join(sorted(NATIVE))}}}: {offenders}"


def test_no_two_modules_of_a_layer_import_each_other():
    """Within a layer, imports form no cycle (two modules that need each other hold one idea split in two, or a
    third idea both should import: e.g. batch/rows.py, which the runner and the shard reader share)."""
    graph: dict[str, set[str]] = {}
    for layer, path in modules():
        if layer == "convert":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        hints = {  # imports for type hints only (if TYPE_CHECKING:) run nothing
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        name = f"{layer}.{path.stem}"
        graph[name] = {
            f"{layer}.{node.module.split('.')[0]}"
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module and id(node) not in hints
        }
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target in trail:
                cycles.append(" → ".join(trail[trail.index(target) :] + [target]))
            elif target in graph and len(trail) < len(graph):
                visit(target, trail + [target])

    for start in graph:
        visit(start, [start])
    assert not cycles, "modules importing each other:\n" + "\n".join(sorted(set(cycles)))
