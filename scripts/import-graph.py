#!/usr/bin/env python3
"""Prints the file-level import graph of hsmseal's crates, its cycles and its
upward imports.

An edge A -> B means a file A names something in file B through a path that
starts with `crate::`, `super::`, `self::`, `$crate::` or a child module's
name (in a `use` or inline; `crate::m!` for an exported macro counts as the
file defining it). Paths are resolved to the longest module prefix; items
re-exported by a `mod.rs` count as that `mod.rs`. `#[cfg(test)]` modules are
left out unless --tests is given (test code may reach anywhere).

A `pub use` in a module of something in one of its own submodules is a
*facade* edge: the module publishing its children's names, not using them.
Facade edges are listed but do not make cycles (otherwise every `mod.rs`
that re-exports a child whose code uses the parent's types would be one).

Reported:
- module cycles: strongly connected components of the graph between modules
  (a library module with all its files, e.g. `hsm`; in the binary each
  top-level module, and each `commands::NAME` on its own);
- file cycles: the same between files;
- upward imports: an edge from a file to one on a higher layer (LAYERS below,
  first matching module prefix wins): the binary's layers sit above the
  library's, and inside each, higher layers may use lower ones only.

Usage: scripts/import-graph.py [--tests] [--edges] [ROOT]   (ROOT: repo, default .)
Exit status: 1 if there is a cycle or an upward import, else 0.
"""

import os
import re
import sys

# (module path prefix, layer). Library 0-9, binary 10 and up. Both the old
# names (one crate holding cli/commands/app) and the new ones are listed, so
# the script reports a before and an after.
LAYERS = [
    # binary
    ("bin::commands", 17),
    ("bin::bulk", 16),
    ("bin::outputs", 16),
    ("bin::select", 15),
    ("bin::input", 15),
    ("bin::app", 14),
    ("bin::report", 13),
    ("bin::config", 13),
    ("bin::faults", 12),
    ("bin::signals", 12),
    ("bin::tty", 12),
    ("bin::hardening", 12),
    ("bin::cli", 11),
    # the old single crate: the same layers under lib::
    ("lib::commands::bulk", 15),
    ("lib::commands::paths", 15),
    ("lib::commands::glob", 15),
    ("lib::commands::walk", 15),
    ("lib::commands", 17),
    ("lib::app", 14),
    ("lib::config", 13),
    ("lib::signals", 12),
    ("lib::hardening", 12),
    ("lib::cli", 11),
    # library
    ("lib::deps", 6),
    ("lib::columns", 5),
    ("lib::hsm", 5),
    ("lib::audit", 4),
    ("lib::envelope", 4),
    ("lib::stream", 3),
    ("lib::backend", 2),
    ("lib::keys", 2),
    ("lib::guard", 2),
    ("lib::fs", 1),
    ("lib::output", 1),
    ("lib::notify", 0),
    ("lib::time", 0),
    ("lib::secret", 0),
    ("lib::error", 0),
    ("lib", 9),  # lib.rs itself: re-exports only
    ("bin", 19),  # main.rs
]


def layer(mod):
    for prefix, n in LAYERS:
        if mod == prefix or mod.startswith(prefix + "::"):
            return n
    return None


def strip(src):
    """Removes comments, string and char literals (keeps line structure)."""
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    if src[i] == "\n":
                        out.append("\n")
                    i += 1
        elif c == "r" and re.match(r'r#*"', src[i:i + 10]) and (i == 0 or not (src[i - 1].isalnum() or src[i - 1] == "_")):
            m = re.match(r'r(#*)"', src[i:])
            end = '"' + m.group(1)
            j = src.find(end, i + len(m.group(0)))
            j = n if j < 0 else j + len(end)
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            out.append('""' + "\n" * src.count("\n", i, j))
            i = j + 1
        elif c == "'":
            m = re.match(r"'(\\.[^']*|[^\\'])'", src[i:])
            if m:
                out.append("' '")
                i += len(m.group(0))
            else:  # a lifetime
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def drop_test_modules(src):
    """Removes `#[cfg(test)] mod x { ... }` blocks (src already stripped)."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*\{", src)
        if not m:
            return src
        depth, j = 1, m.end()
        while j < len(src) and depth:
            depth += {"{": 1, "}": -1}.get(src[j], 0)
            j += 1
        src = src[: m.start()] + "\n" * src.count("\n", m.start(), j) + src[j:]


def expand_use(tree):
    """`a::{b, c::{d, self}}` -> [[a, b], [a, c, d], [a, c]]."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)
    tree = re.sub(r"\s+", "", tree)

    def parse(s, i):
        # returns (list of paths, next index)
        prefix = []
        seg = ""
        while i < len(s):
            ch = s[i]
            if s.startswith("::", i):
                if seg:
                    prefix.append(seg)
                seg = ""
                i += 2
            elif ch == "{":
                items, i = parse_group(s, i + 1)
                return [prefix + p for p in items], i
            elif ch in ",}":
                break
            else:
                seg += ch
                i += 1
        if seg and seg != "self":
            prefix.append(seg)
        return [prefix], i

    def parse_group(s, i):
        items = []
        while i < len(s) and s[i] != "}":
            paths, i = parse(s, i)
            items.extend(paths)
            if i < len(s) and s[i] == ",":
                i += 1
        return items, i + 1

    paths, _ = parse(tree, 0)
    return paths


class Crate:
    def __init__(self, name, root_file):
        self.name = name
        self.files = {}  # module path (tuple) -> file
        self.inline = {}  # module path -> containing file
        self.macros = {}  # exported macro name -> file
        self.load(root_file, (), is_root=True)

    def load(self, path, mod, is_root=False):
        self.files[mod] = path
        src = strip(open(path).read())
        for m in re.finditer(r"#\[macro_export\]\s*macro_rules!\s*(\w+)", src):
            self.macros[m.group(1)] = path
        here = os.path.dirname(path)
        base = os.path.basename(path)
        if is_root or base == "mod.rs":
            own = here
        else:
            own = os.path.join(here, os.path.splitext(base)[0])
        for m in re.finditer(r"\b(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*(;|\{)", src):
            name, kind = m.group(1), m.group(2)
            sub = mod + (name,)
            if kind == "{":
                self.inline[sub] = path
                continue
            for cand in (os.path.join(own, name + ".rs"), os.path.join(own, name, "mod.rs")):
                if os.path.exists(cand):
                    self.load(cand, sub)
                    break

    def modules(self):
        return set(self.files) | set(self.inline)

    def file_of(self, mod):
        return self.files.get(mod) or self.inline.get(mod)

    def resolve(self, mod, segs):
        """Module `mod` names path `segs`: (module reached, file), or None."""
        if not segs:
            return None
        head = segs[0]
        if head in ("crate", "$crate"):
            base, rest = (), segs[1:]
            if len(rest) == 1 and rest[0] in self.macros:
                f = self.macros[rest[0]]
                return next(m for m, x in self.files.items() if x == f), f
        elif head == "super":
            base, rest = mod, segs
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
        elif head == "self":
            base, rest = mod, segs[1:]
        else:
            # a relative path: a child module of this one, if it is one
            base, rest = mod, segs
            if mod + (head,) not in self.modules():
                return None
        for s in rest:
            if base + (s,) in self.modules():
                base = base + (s,)
            else:
                break
        return base, self.file_of(base)


def module_of_offset(src, offset, mod):
    """The module (with inline `mod x { }` blocks) at `offset`."""
    stack = []
    depth = 0
    cur = mod
    for m in re.finditer(r"\bmod\s+(\w+)\s*\{|\{|\}", src[:offset]):
        if m.group(1):
            stack.append((depth, cur))
            cur = cur + (m.group(1),)
            depth += 1
        elif m.group(0) == "{":
            depth += 1
        else:
            depth -= 1
            if stack and stack[-1][0] == depth:
                cur = stack.pop()[1]
    return cur


def edges(crate, tests):
    """{file: {target file: facade?}}: facade only if every reference is a
    `pub use` of something below the referring module."""
    out = {}
    for mod, path in crate.files.items():
        src = strip(open(path).read())
        if not tests:
            src = drop_test_modules(src)
        refs = []
        uses = list(re.finditer(r"(\bpub(?:\([^)]*\))?\s+)?\buse\s+([^;]+);", src))
        for m in uses:
            if re.match(r"\s*(std|core|alloc)\b", m.group(2)):
                continue
            at = module_of_offset(src, m.start(), mod)
            for p in expand_use(m.group(2)):
                refs.append((at, p, bool(m.group(1))))
        masked = src
        for m in reversed(uses):
            masked = masked[: m.start()] + " " * (m.end() - m.start()) + masked[m.end():]
        for m in re.finditer(r"(?<![\w:])(\$crate|crate|super|self|[a-z_]\w*)((?:::\w+)+)!?", masked):
            at = module_of_offset(src, m.start(), mod)
            refs.append((at, [m.group(1)] + m.group(2).split("::")[1:], False))
        for at, p, public in refs:
            r = crate.resolve(at, p)
            if not r or r[1] == path:
                continue
            target_mod, target = r
            facade = public and target_mod[: len(at)] == at and len(target_mod) > len(at)
            out.setdefault(path, {})
            out[path][target] = out[path].get(target, True) and facade
    return out


def sccs(graph):
    index, low, on, stack, res = {}, {}, set(), [], []
    counter = [0]
    nodes = set(graph) | {b for bs in graph.values() for b in bs}

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            res.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return [c for c in res if len(c) > 1]


def module_node(crate, mod):
    """The module a file belongs to, for the module graph."""
    if crate == "bin" and len(mod) >= 2 and mod[0] == "commands":
        return "bin::commands::" + mod[1]
    return "::".join((crate,) + mod[:1])


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    tests = "--tests" in sys.argv
    root = args[0] if args else "."
    os.chdir(root)
    crates = [Crate("lib", "src/lib.rs")]
    for main_rs in ("src/bin/hsmseal/main.rs", "src/main.rs"):
        if os.path.exists(main_rs):
            crates.append(Crate("bin", main_rs))
            break
    graph, facades, modname, node = {}, [], {}, {}
    for c in crates:
        for mod, f in c.files.items():
            modname[f] = "::".join((c.name,) + mod)
            node[f] = module_node(c.name, mod)
        for a, bs in edges(c, tests).items():
            for b, facade in bs.items():
                if facade:
                    facades.append((a, b))
                else:
                    graph.setdefault(a, set()).add(b)
    if "--edges" in sys.argv:
        for a in sorted(graph):
            for b in sorted(graph[a]):
                print(f"{a} -> {b}")
        for a, b in sorted(facades):
            print(f"{a} -> {b} (facade)")
        print()
    bad = 0
    modgraph = {}
    for a, bs in graph.items():
        for b in bs:
            if node[a] != node[b]:
                modgraph.setdefault(node[a], set()).add(node[b])
    for title, g in (("module cycles", modgraph), ("file cycles", graph)):
        cycles = sccs(g)
        print(f"{title}: {len(cycles)}")
        for c in cycles:
            print(f"  {len(c)}: " + " ".join(c))
            bad += 1
    upward = []
    for a in sorted(graph):
        la = layer(modname[a])
        for b in sorted(graph[a]):
            lb = layer(modname[b])
            if la is None or lb is None:
                print(f"  (no layer for {modname[a] if la is None else modname[b]})")
                continue
            if lb > la:
                upward.append((a, la, b, lb))
    print(f"upward imports: {len(upward)}")
    for a, la, b, lb in upward:
        print(f"  {a} ({la}) -> {b} ({lb})")
        bad += 1
    n_edges = sum(len(v) for v in graph.values())
    print(f"files: {len(modname)}, edges: {n_edges} (+ {len(facades)} facade)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
