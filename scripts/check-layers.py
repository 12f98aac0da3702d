#!/usr/bin/env python3
"""Checks the module layering of src/: which top-level modules each module's code names through
`crate::…` (in `use` lines and in paths), and the same among the submodules of each folder
through `super::…`.

It fails when a lower layer names a higher one (domain, store, provider, transport and actors
must not name server, http or cli), when the command-line client (cli), which talks to a server
over HTTP only, names any other module, or when two modules name each other, directly or round a cycle.
Run from the repository's root: `python3 scripts/check-layers.py`.
"""
import os
import re
import sys

SRC = "src"
# Lower layers, and the modules none of them may name.
LOWER = ["domain", "store", "provider", "transport", "actors"]
UPPER = ["server", "http", "cli"]
# Modules that may name no other module of the crate.
ALONE = ["cli"]

PATH = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+|::\{)")
USE_GROUP = re.compile(r"\buse\s+(crate|super)::\{([^;]*)\};", re.S)


def module_of(path):
    """`src/store/batches.rs` -> ['store', 'batches']; `src/store/mod.rs` -> ['store']."""
    parts = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts in (["lib"], ["main"]) or parts[:1] == ["bin"]:
        return None
    return parts


def strip(text):
    """Drops comments and string literals, keeping line structure."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def names(text):
    """Every (root, first segment) a file's code names: crate::x, super::x, use crate::{x, y}."""
    found = set()
    for root, group in USE_GROUP.findall(text):
        for item in re.split(r",(?![^{]*\})", group):
            first = item.strip().split("::")[0].strip()
            if first and first != "self":
                found.add((root, first))
    for root, rest in PATH.findall(text):
        if rest != "::{":
            found.add((root, rest.split("::")[1]))
    return found


def cycles(graph):
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
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


def main():
    top = {}  # top-level module -> {top-level modules it names: [where]}
    inner = {}  # folder -> {submodule -> {sibling submodules it names}}
    problems = []
    for dirpath, _, files in os.walk(SRC):
        for name in sorted(files):
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            module = module_of(path)
            if module is None:
                continue
            with open(path, encoding="utf-8") as f:
                text = strip(f.read())
            # A #[cfg(test)] module inside a file is the file's own tests: counted with it.
            for root, first in names(text):
                if root == "crate":
                    if first != module[0]:
                        top.setdefault(module[0], {}).setdefault(first, []).append(path)
                        if module[0] in LOWER and first in UPPER:
                            problems.append(f"{path}: {module[0]} names crate::{first}")
                        if module[0] in ALONE:
                            problems.append(f"{path}: {module[0]} names crate::{first}")
                    elif len(module) > 1:
                        pass
                elif root == "super" and len(module) >= 2:
                    parent = tuple(module[:-1])
                    # `super::x` from a file is a sibling x of the same folder, or an item of
                    # the folder's mod.rs (the folder itself, which re-exports its children).
                    folder = os.path.join(SRC, *parent)
                    if os.path.exists(os.path.join(folder, first + ".rs")) or os.path.isdir(
                        os.path.join(folder, first)
                    ):
                        inner.setdefault(parent, {}).setdefault(module[-1], set()).add(first)
    graph = {m: set(d) for m, d in top.items()}
    for comp in cycles(graph):
        where = "; ".join(
            f"{a} -> {b} ({', '.join(sorted(set(top[a][b])))})"
            for a in comp
            for b in comp
            if b in top.get(a, {})
        )
        problems.append(f"modules name each other: {' , '.join(comp)}: {where}")
    for parent, g in inner.items():
        for comp in cycles(g):
            problems.append(
                f"submodules of {'/'.join(parent)} name each other: {', '.join(comp)}"
            )
    if "-v" in sys.argv:
        for m in sorted(graph):
            print(f"{m} -> {', '.join(sorted(graph[m]))}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"layers: {len(graph)} modules, no upward import, no cycle")


if __name__ == "__main__":
    main()
