"""The evaluation harness, its reports and the testbed import one another one way only: no module-level import
cycle among them (a function-level import that only dodges a cycle does not count as untying it, so those are
read too)."""

import ast
from pathlib import Path

import visroute

SRC = Path(visroute.__file__).resolve().parent


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = {_module(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visroute"):
                # `from package import submodule` needs the submodule; `from module import name`, the module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("visroute")]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]], scope: tuple[str, ...]) -> list[set[str]]:
    """Strongly connected components of more than one module, within the modules under `scope`."""
    nodes = [m for m in graph if m.startswith(scope)]
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if not w.startswith(scope):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def test_reports_and_study_sections_import_one_way():
    scope = tuple(f"visroute.evaluation.{m}" for m in ("report", "study", "pooled", "reroute_study", "summary"))
    assert _cycles(_graph(top_level_only=False), scope) == []


def test_testbed_and_evaluation_modules_have_no_module_level_cycle():
    assert _cycles(_graph(top_level_only=True), ("visroute.testbed", "visroute.evaluation")) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"visroute.a.x": {"visroute.a.y"}, "visroute.a.y": {"visroute.a.x"}, "visroute.a.z": set()}
    assert _cycles(graph, ("visroute.a",)) == [{"visroute.a.x", "visroute.a.y"}]
