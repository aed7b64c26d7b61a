"""The layers, checked: commands above both faces, the faces above the core.

    stepcast.cli                 the `stepcast` command, the embedded launcher, the console
    server      gpu_worker       the two faces; neither imports the other
    stepcast                     the shared core (every module but stepcast.cli)

An import may only point down. Every import counts, at module level or inside a
function, so a lazy import cannot hide a wrong arrow. No two modules may import
each other, directly or round a longer loop. docs/design.md draws the layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stepcast", "server", "gpu_worker")
# A module's layer: higher numbers sit above lower ones; equal numbers are siblings that must not meet.
LAYERS = {"stepcast.cli": 2, "server": 1, "gpu_worker": 1, "stepcast": 0}


def layer_of(module: str) -> str:
    """The layer a module belongs to: the longest name of LAYERS it sits under."""
    return max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The project's modules that ``name`` imports (``from a import b`` counts ``a.b`` if that is one)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph(root: Path) -> dict[str, set[str]]:
    found = modules(root)
    return {name: set(imports(name, path, set(found))) for name, path in found.items()}


def wrong_arrows(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            above, below = layer_of(source), layer_of(target)
            if above != below and LAYERS[above] <= LAYERS[below]:
                wrong.append(f"{source} -> {target} ({above} may not import {below})")
    return wrong


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_a_layer() -> None:
    edges = graph(ROOT)
    assert {layer_of(name) for name in edges} == set(LAYERS)  # every layer is there to check
    assert wrong_arrows(edges) == []


def test_no_two_modules_import_each_other() -> None:
    assert cycles(graph(ROOT)) == []


def test_the_checker_sees_a_wrong_arrow_and_a_loop(tmp_path: Path) -> None:
    files = {
        "stepcast/__init__.py": "",
        "stepcast/jobs.py": "from server import app\n",  # the core reaching up
        "stepcast/cli/__init__.py": "",
        "stepcast/cli/main.py": "import server.app\nfrom gpu_worker import runner\n",  # fine: down
        "server/__init__.py": "",
        "server/app.py": "def f():\n    from gpu_worker.runner import x\n",  # sibling, hidden in a function
        "server/a.py": "from . import b\n",
        "server/b.py": "from server.a import thing\n",
        "gpu_worker/__init__.py": "",
        "gpu_worker/runner.py": "import stepcast\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = graph(tmp_path)
    assert wrong_arrows(edges) == [
        "server.app -> gpu_worker.runner (server may not import gpu_worker)",
        "stepcast.jobs -> server.app (stepcast may not import server)",
    ]
    assert cycles(edges) == [["server.a", "server.b"]]
