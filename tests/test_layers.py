"""The import structure of the project: no cycles, layers point one way, no lazy imports.

Every module of ``dynoai_daemon``, ``drivers`` and ``simulators`` is parsed with :mod:`ast`
(nothing is imported); every import statement counts, also inside functions, except those
under ``if TYPE_CHECKING:``. The graph of our own modules must have no cycle, each module
may import only modules of its rank or below (:data:`RANKS`, matched by longest prefix,
so new packages fit by their name), drivers and simulators may reach only so far into the
daemon (:data:`CEILING`), and an import of one of our modules inside a function is allowed
only in ``cli/`` (subcommands import what they run) and in :data:`LAZY_ALLOWED`.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dynoai_daemon", "drivers", "simulators")

#: rank of each module by longest matching prefix; a module imports only ranks <= its own
RANKS: dict[str, int] = {
    "dynoai_daemon": 0,  # the package itself (version string only)
    "dynoai_daemon.errors": 0,
    "dynoai_daemon.models": 0,
    "dynoai_daemon.channels": 0,
    "dynoai_daemon.logs_setup": 0,  # structlog configuration, imports nothing of ours
    "dynoai_daemon.config": 1,
    "drivers": 1,  # beside config, but see CEILING: they see only rank 0 of the daemon
    "dynoai_daemon.core": 2,
    "dynoai_daemon.patterns": 3,
    "dynoai_daemon.collector": 4,
    "dynoai_daemon.store": 4,
    "dynoai_daemon.logs": 4,  # log readers and writers (logs.mlg ... included)
    "dynoai_daemon.tune": 4,
    "dynoai_daemon.ml": 4,
    "simulators": 4,  # see CEILING: the daemon's ranks <= 4 and drivers, never service
    "dynoai_daemon.logs.replay": 5,  # drives core + patterns + store through the drivers
    "dynoai_daemon.alerts": 5,
    "dynoai_daemon.publish": 5,
    "dynoai_daemon.collect": 5,
    "dynoai_daemon.report": 5,  # re-derives a run's alerts through the alert engine
    "dynoai_daemon.service": 6,
    "dynoai_daemon.watch": 6,
    "dynoai_daemon.cli": 7,
}

#: package -> the highest rank of a ``dynoai_daemon`` module it may import
CEILING: dict[str, int] = {"drivers": 0, "simulators": 4}

#: (importing module, imported module) pairs that stay inside a function, and why. The
#: lazy imports that dodged cycles are gone with the models split. The heavy optional parts
#: stay lazy without function-level imports: ``drivers.registry`` (imported at the top of
#: service, logs.replay and simulators.cell) names the driver classes as importlib strings,
#: so python-can, cantools and pyserial load only when a driver of that kind is created;
#: ``cli/`` (exempt) imports each subcommand's machinery when it runs.
LAZY_ALLOWED: dict[tuple[str, str], str] = {
    ("dynoai_daemon.service.predictions", "dynoai_daemon.ml.store"): (
        "ml.store imports scikit-learn and skops (about a second of CPU and 100 MB): the "
        "daemon loads it only once a model card is found, never on a station without models"
    ),
    ("dynoai_daemon.service.daemon", "dynoai_daemon.report"): (
        "report imports matplotlib (~0.5 s, 40 MB): loaded only when [report] auto is on"
    ),
}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    in_function: bool

    def where(self) -> str:
        return f"{self.src}:{self.line} imports {self.dst}"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _all_modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _all_modules()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _ours(name: str) -> str | None:
    """The module (or package) of ours that importing ``name`` loads, or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _resolve(src: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [m for a in node.names if (m := _ours(a.name)) is not None]
    base = node.module or ""
    if node.level:
        is_pkg = MODULES[src].name == "__init__.py"
        anchor = src.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_pkg else 0)]
        base = ".".join([*anchor, base] if base else anchor)
    found: list[str] = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        target = sub if sub in MODULES else _ours(base)
        if target is not None and target not in found:
            found.append(target)
    return found


def _edges(src: str) -> list[Edge]:
    tree = ast.parse(MODULES[src].read_text(encoding="utf-8"), filename=str(MODULES[src]))
    edges: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for orelse in child.orelse:
                    visit_one(orelse, in_function)
                continue
            visit_one(child, in_function)

    def visit_one(child: ast.AST, in_function: bool) -> None:
        if isinstance(child, ast.Import | ast.ImportFrom):
            for dst in _resolve(src, child):
                if dst != src:
                    edges.append(Edge(src, dst, child.lineno, in_function))
        inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        visit(child, inner)

    visit(tree, False)
    return edges


EDGES: list[Edge] = [e for m in MODULES for e in _edges(m)]


def rank(module: str) -> int:
    """The rank of ``module`` by the longest matching prefix of :data:`RANKS`."""
    best = ""
    for prefix in RANKS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best = prefix
    assert best, f"{module} has no rank: add its package to RANKS in tests/test_layers.py"
    return RANKS[best]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)) is not None:
            return found
    return None


def test_the_parser_sees_the_known_edges() -> None:
    # guards the test itself: a resolver that found nothing would pass every check below
    pairs = {(e.src, e.dst) for e in EDGES}
    assert ("dynoai_daemon.service.daemon", "dynoai_daemon.core") in pairs
    assert ("drivers.base", "dynoai_daemon.channels") in pairs
    assert ("dynoai_daemon.models.session", "dynoai_daemon.models.build") in pairs
    assert len(MODULES) > 60 and len(EDGES) > 150


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        graph.setdefault(e.src, set()).add(e.dst)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_module_has_a_rank() -> None:
    for module in MODULES:
        rank(module)


def test_layers_point_one_way() -> None:
    bad = [
        f"{e.where()} (rank {rank(e.src)} -> {rank(e.dst)})"
        for e in EDGES
        if rank(e.dst) > rank(e.src)
    ]
    assert not bad, "imports that point up the layers:\n" + "\n".join(bad)


def test_drivers_and_simulators_reach_only_so_far_into_the_daemon() -> None:
    bad = []
    for e in EDGES:
        pkg = e.src.split(".")[0]
        if pkg in CEILING and e.dst.startswith("dynoai_daemon") and rank(e.dst) > CEILING[pkg]:
            bad.append(f"{e.where()} (rank {rank(e.dst)} > {CEILING[pkg]})")
        if pkg == "drivers" and e.dst.split(".")[0] == "simulators":
            bad.append(e.where())
    assert not bad, "\n".join(bad)


def test_no_import_inside_a_function_outside_cli() -> None:
    bad = [
        e.where()
        for e in EDGES
        if e.in_function
        and not e.src.startswith("dynoai_daemon.cli")
        and (e.src, e.dst) not in LAZY_ALLOWED
    ]
    assert not bad, "imports inside functions (make them top-level):\n" + "\n".join(bad)


def test_the_rank_table_and_allowlist_name_real_things() -> None:
    stale = [(s, d) for s, d in LAZY_ALLOWED if s not in MODULES or d not in MODULES]
    assert not stale, f"LAZY_ALLOWED names modules that do not exist: {stale}"
    used = {e for e in EDGES if e.in_function}
    unused = [k for k in LAZY_ALLOWED if not any((e.src, e.dst) == k for e in used)]
    assert not unused, f"LAZY_ALLOWED entries no longer needed: {unused}"
