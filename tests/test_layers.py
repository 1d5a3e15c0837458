"""The tree's layers, drawn from the code's imports (module level and inside functions).

core <- graph_passes, targets <- hf, export, accuracy, runtime <- stages, benchmarks <- cli.
A package imports only from its own layer or below, and packages form no cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "sa_export.core": 0,
    "graph_passes": 1,
    "targets": 1,
    "sa_export.hf": 2,
    "sa_export.export": 2,
    "sa_export.accuracy": 2,
    "sa_export.runtime": 2,
    "sa_export.stages": 3,
    "sa_export.benchmarks": 3,
    "sa_export.cli": 4,
    "sa_export": 0,  # the package itself holds only __version__
}
MAX_LINES = 400


def _package(module: str) -> str:
    for package in sorted(LAYERS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return package
    return ""


def _modules():
    for root in ("sa_export", "graph_passes", "targets"):
        for path in sorted((ROOT / root).rglob("*.py")):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if _package(name)}


def _package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, path in _modules():
        for imported in _imports(path):
            source, target = _package(module), _package(imported)
            if source != target and target != "sa_export":
                edges.setdefault(source, set()).add(target)
    return edges


def test_every_module_belongs_to_a_layer():
    assert [m for m, _ in _modules() if not _package(m)] == []


def test_packages_import_only_their_layer_or_below():
    upward = [(s, t) for s, targets in _package_edges().items() for t in targets if LAYERS[t] > LAYERS[s]]
    assert upward == []


def test_packages_form_no_cycle():
    edges = _package_edges()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    assert [p for p in edges if reaches(p, p, {p})] == []


def test_no_module_is_over_the_line_limit():
    long = {m: n for m, path in _modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
