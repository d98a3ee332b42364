"""The package's import graph, as a newcomer walks it: its rooms (top-level modules and packages), the
import cycles between modules and between rooms, and what ``pipeline.py`` enters.

Imports under ``if TYPE_CHECKING:`` are not counted (they never run). ``python3 bench/import_graph.py
[--repo DIR]`` prints the figures and saves ``bench/results/import_graph.json``; run it on two checkouts
to compare a layout before and after a change.
"""
from __future__ import annotations

import argparse
import ast
from pathlib import Path

from common import save_json

ROOT = Path(__file__).resolve().parents[1]


def import_graph(repo: Path, lazy: bool = True) -> dict[str, set[str]]:
    """Module name -> the permsparse modules it imports at run time: at the module's top, and with ``lazy``
    also inside functions (imported only when they run)."""
    modules = {}
    for path in sorted((repo / "permsparse").rglob("*.py")):
        parts = list(path.relative_to(repo).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    edges = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        nested = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom) or (not lazy and id(node) in nested):
                continue
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found = full if full in modules else target
                if found in modules and found != name:
                    edges[name].add(found)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def room(module: str) -> str:
    """The top-level module or package a module lives in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def measure(repo: Path) -> dict:
    edges = import_graph(repo)
    rooms = {room(m) for m in edges}
    room_edges = {r: set() for r in rooms}
    for module, targets in edges.items():
        room_edges[room(module)].update(room(t) for t in targets if room(t) != room(module))
    top = sorted(m.split(".")[1] for m in edges if m.count(".") == 1
                 and not (repo / Path(*m.split("."))).is_dir())
    pipeline = "permsparse.pipeline"
    reached, todo = set(), [pipeline]
    while todo:
        for target in edges[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    return {"modules": len(edges), "rooms": len(rooms), "top_level_modules": top,
            "module_cycles": cycles(import_graph(repo, lazy=False)), "cycles_through_lazy_imports": cycles(edges),
            "room_cycles": cycles(room_edges),
            "pipeline_enters_modules": len(edges[pipeline]),
            "pipeline_enters_rooms": len({room(t) for t in edges[pipeline]} - {"pipeline"}),
            "pipeline_reaches_modules": len(reached), "pipeline_reaches_rooms": len({room(t) for t in reached} - {"pipeline"}),
            "importers_of_pipeline": sorted(m for m, targets in edges.items() if pipeline in targets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", default=str(ROOT))
    parser.add_argument("--save-as", default="import_graph")
    args = parser.parse_args()
    figures = measure(Path(args.repo))
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    print(f"saved {save_json(args.save_as, {'repo': str(args.repo)}, [figures])}")


if __name__ == "__main__":
    main()
