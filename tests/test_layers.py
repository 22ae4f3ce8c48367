"""The package's layers: every import runs downward (cli -> commands -> train -> data/model -> config)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"

# A module may import modules of its own layer or below, never above (docs/architecture.md).
LAYERS = [
    ["pipeline.errors", "pipeline.files", "pipeline.config"],
    ["pipeline.distributed", "pipeline.model", "pipeline.report", "pipeline.data"],
    ["pipeline.train.step", "pipeline.train.schedule"],
    ["pipeline.train.plan", "pipeline.train.checkpoint", "pipeline.train.signals", "pipeline.train.rundir"],
    ["pipeline.train.loop", "pipeline.train.preflight", "pipeline.train.memory"],
    ["pipeline.train.stage"],
    ["pipeline.train.range_test", "pipeline.train.runstate", "pipeline.train.setup"],
    ["pipeline.train.run"],
    ["pipeline.options", "pipeline.inference", "pipeline.loader_bench", "pipeline.speeds", "pipeline.probe"],
    ["pipeline.budget"],
    ["pipeline.replan"],
    ["pipeline.commands"],  # one module per command; none imports another (test below)
    ["pipeline.cli", "pipeline.__main__"],
]
UNCAPPED = {"config.py"}  # top-level modules over the 300-line cap: the one configuration schema


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and docs/architecture.md")


def imports_of(path: Path) -> set[str]:
    """The pipeline modules a file imports, at the top or inside functions (relative imports resolved)."""
    found = set()
    package = module_name(path).split(".")[: -1 if path.name != "__init__.py" else None]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # `from . import x`, `from ..data import y`
            base = package[: len(package) - node.level + 1]
            node = ast.ImportFrom(".".join(base + ([node.module] if node.module else [])), node.names, 0)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:  # `from pipeline import distributed` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) - {module_name(p)} for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_import_runs_downward():
    upward = [
        f"{importer} (layer {layer_of(importer)}) imports {imported} (layer {layer_of(imported)})"
        for importer, imported_set in import_graph().items()
        for imported in sorted(imported_set)
        if imported != "pipeline" and layer_of(imported) > layer_of(importer)
    ]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {m: {i for i in deps if i != "pipeline"} for m, deps in import_graph().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module) :] + [module]))
        if state.get(module) == 2 or module not in graph:
            return
        state[module] = 1
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        state[module] = 2

    for module in sorted(graph):
        visit(module, [])


def test_no_command_imports_another_command():
    crossing = [
        f"{importer} imports {imported}"
        for importer, imported_set in import_graph().items()
        if importer.startswith("pipeline.commands.")
        for imported in sorted(imported_set)
        if imported == "pipeline.commands" or imported.startswith("pipeline.commands.")
    ]
    assert not crossing, "what two commands share belongs below the commands layer:\n" + "\n".join(crossing)


def test_no_module_is_over_300_lines():
    """Every module but `UNCAPPED`: the top level, train/, commands/ and data/."""
    paths = [p for p in PACKAGE.rglob("*.py") if p.name not in UNCAPPED or p.parent != PACKAGE]
    assert {p.parent.name for p in paths} >= {"pipeline", "train", "commands", "data"}
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in paths}
    over = {name: lines for name, lines in sorted(sizes.items()) if lines > 300}
    assert not over, over
