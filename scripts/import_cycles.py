#!/usr/bin/env python3
"""Lists the import cycles between the modules of a crate's `src/` (issue 17: "no module of
mta/src imports one that imports it back").

An edge A -> B is a `crate::b…` path in A's source (a `use` or a qualified path), with
modules named by their first path segment below `crate` (`crate::queue::scheduler` is
`queue`), so the graph is the one between the crate's top-level modules; `--deep` uses
two segments (`queue::inbox`). Prints every strongly connected component of more
than one module, then the edges inside it. Exit code 0, or with `--check` 1 when there is
a cycle (the test command runs it so, for mta/src, operator/src and crds/src).

Usage: scripts/import_cycles.py [--deep] [--check] [SRC_DIR]   (default mta/src)
"""
import re
import sys
from pathlib import Path

deep = "--deep" in sys.argv
args = [a for a in sys.argv[1:] if not a.startswith("--")]
src = Path(args[0] if args else "mta/src")


def module_of(path: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in ([], ["lib"], ["main"]):
        return "crate"
    return "::".join(parts[: 2 if deep else 1])


def target(path_text: str) -> str:
    parts = [p for p in path_text.split("::") if p]
    return "::".join(parts[: 2 if deep else 1])


edges: dict[str, set[str]] = {}
for file in sorted(src.rglob("*.rs")):
    if file.stem == "tests" or "tests" in file.relative_to(src).parts[:-1]:
        continue  # test modules (`#[cfg(test)] mod tests;`) may reach anywhere
    text = file.read_text()
    # Test modules may reach anywhere; they are not part of the pipeline.
    text = re.split(r"#\[cfg\(test\)\]\s*mod tests\s*\{", text)[0]
    here = module_of(file)
    paths = [m.group(1) for m in re.finditer(r"crate::((?:\w+::)*\w+)", text)]
    # `use crate::{a, b::c}` groups
    for m in re.finditer(r"use crate::\{([^}]*)\}", text):
        paths.extend(item.strip() for item in m.group(1).split(","))
    for path in paths:
        there = target(path)
        first = there.split("::")[0]
        is_module = (src / first).is_dir() or (src / f"{first}.rs").exists()
        if there and there != here and is_module:
            edges.setdefault(here, set()).add(there)

# Tarjan's strongly connected components.
index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})


def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges.get(v, ())):
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
        comps.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in nodes:
    if v not in index:
        visit(v)
cycles = [c for c in comps if len(c) > 1]
edge_count = sum(len(t) for t in edges.values())
print(f"{src}: {len(nodes)} modules, {edge_count} import edges, "
      f"{len(cycles)} cycle(s)")
for c in cycles:
    print(f"cycle of {len(c)}: {', '.join(c)}")
    for a in c:
        inside = sorted(t for t in edges.get(a, ()) if t in c)
        print(f"  {a} -> {', '.join(inside)}")
if "--check" in sys.argv and cycles:
    sys.exit(1)
