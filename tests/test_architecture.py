"""The package's imports go one way: cli -> stages -> core -> base, with no cycle anywhere.

Read from the source with `ast` (every import, also those inside functions), so a shortcut taken
anywhere in the code fails here, not in review."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "caitsearch"

# what each layer is made of: a module (file stem) or a subpackage, directly under caitsearch/
LAYERS = {
    "base": {"errors", "defaults", "io", "console", "device", "measure", "models", "data"},
    "core": {"config", "space", "compress"},
    "stage": {"profile", "search", "training", "report", "export", "segment", "tasks"},
    "cli": {"cli", "__main__"},
}
RANK = {"base": 0, "core": 1, "stage": 2, "cli": 3}


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path = PACKAGE.parent) -> bool:
    rel = Path(*name.split("."))
    return (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file()


def imports_of(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """caitsearch modules imported anywhere in `path` (a `from X import Y` of a submodule Y counts as X.Y)."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "caitsearch"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "caitsearch":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}", root)}
            found |= subs or {target}
            if len(subs) < len(node.names):
                found.add(target)
    return found - {this}


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) < 2:
        return None  # the package root: the public facade
    return next((layer for layer, members in LAYERS.items() if parts[1] in members), None)


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(m for m in GRAPH if m != "caitsearch" and layer_of(m) is None)
    assert not unplaced, f"put these modules into a layer in {__file__}: {unplaced}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "caitsearch"))
def test_imports_point_down_the_layers(module):
    own = RANK[layer_of(module)]
    upward = sorted(t for t in GRAPH[module] if layer_of(t) is None or RANK[layer_of(t)] > own)
    assert not upward, f"{module} ({layer_of(module)}) imports from a higher layer: {upward}"


def test_nothing_outside_the_cli_imports_it():
    offenders = sorted(m for m, targets in GRAPH.items() if layer_of(m) != "cli"
                       and any(t.startswith("caitsearch.cli") for t in targets) and m != "caitsearch")
    assert not offenders, offenders


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of `graph` (module -> imported modules), or [] if there is none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return []


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_the_old_code_did(tmp_path):
    """A stage importing the CLI inside a function, and two modules importing each other, are seen."""
    pkg = tmp_path / "caitsearch"
    for name, text in {"__init__.py": "", "cli/__init__.py": "", "cli/app.py": "console = 1\n",
                       "cli/common.py": "from ..search import pipeline\n",
                       "search/__init__.py": "", "search/pipeline.py": "def f():\n    from ..cli.common import x\n",
                       "profile/__init__.py": "", "profile/build.py": "def f():\n    from ..cli.app import console\n"}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = {module_name(p, tmp_path): imports_of(p, tmp_path) for p in pkg.rglob("*.py")}
    assert graph["caitsearch.profile.build"] == {"caitsearch.cli.app"}
    assert RANK[layer_of("caitsearch.cli.app")] > RANK[layer_of("caitsearch.profile.build")]
    assert find_cycle(graph) in (["caitsearch.cli.common", "caitsearch.search.pipeline", "caitsearch.cli.common"],
                                 ["caitsearch.search.pipeline", "caitsearch.cli.common", "caitsearch.search.pipeline"])
