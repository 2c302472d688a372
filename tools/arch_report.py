"""The package's shape, for a before/after of a redesign: modules with line counts, the
import graph between them (circles named), private names imported across modules, and
the longest functions. Reads the source with ``ast``; imports nothing from the package.

    python tools/arch_report.py                  # prints the report
    python tools/arch_report.py --json OUT.json  # also writes it

A module may import another lazily (inside a function) to break a load-time circle; the
graph counts those too, marked ``lazy``, since they still couple the two modules.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "diffgrm_dist"
# The layers, bottom first: a module may import its own layer and those before it.
LAYERS = ("core", "cluster", "data", "tokenize", "model", "decode", "evaluate", "train", "stages", "variants", "stress",
          "cli")


@dataclass
class Module:
    name: str  # dotted, without the package prefix ("train", "decode.search")
    lines: int
    imports: dict[str, bool] = field(default_factory=dict)  # module -> imported lazily only
    private_imports: list[str] = field(default_factory=list)  # "module._name"
    functions: list[tuple[str, int]] = field(default_factory=list)  # (qualified name, lines)


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def resolve(node: ast.ImportFrom | ast.Import, current: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported package module, imported names) for the package's own imports."""
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                out.append((alias.name.removeprefix(PACKAGE).lstrip(".") or "__init__", []))
        return out
    if node.level:  # relative
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, *(node.module.split(".") if node.module else [])])
    elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
        target = node.module.removeprefix(PACKAGE).lstrip(".")
    else:
        return out
    out.append((target or "__init__", [a.name for a in node.names]))
    return out


def read_module(path: Path, package_dir: Path, known: set[str]) -> Module:
    name = module_name(path, package_dir)
    tree = ast.parse(path.read_text())
    mod = Module(name, len(path.read_text().splitlines()))
    top_level = {id(n) for n in tree.body}
    guarded = {id(n) for stmt in tree.body if isinstance(stmt, ast.If) for n in ast.walk(stmt)}  # TYPE_CHECKING
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lazy = id(node) not in top_level and id(node) not in guarded
            for target, names in resolve(node, name, path.name == "__init__.py"):
                for imported in names or [""]:
                    # "from pkg import mod" names a module, not an attribute of pkg
                    sub = imported if target == "__init__" else f"{target}.{imported}"
                    module = sub if imported and sub in known else target
                    if module != name:
                        mod.imports[module] = mod.imports.get(module, True) and lazy
                    if module == target and imported.startswith("_") and not imported.startswith("__"):
                        mod.private_imports.append(f"{target}.{imported}")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            mod.functions.append((node.name, node.end_lineno - node.lineno + 1))
    return mod


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> str:
    """A module's layer: its subpackage, or the top-level module itself."""
    return module.split(".")[0]


def upward_imports(graph: dict[str, set[str]], layers: tuple[str, ...] = LAYERS) -> list[str]:
    """Imports of a module from a layer above its own (or from a layer not in ``layers``)."""
    rank = {name: i for i, name in enumerate(layers)}
    bad = []
    for module, targets in sorted(graph.items()):
        if module == "__init__" or module.endswith("__init__"):
            continue
        for target in sorted(targets):
            here, there = rank.get(layer_of(module)), rank.get(layer_of(target))
            if here is None or there is None or there > here:
                bad.append(f"{module} -> {target}")
    return bad


def report(package_dir: Path, layers: tuple[str, ...] = LAYERS) -> dict:
    paths = sorted(package_dir.rglob("*.py"))
    known = {module_name(p, package_dir) for p in paths}
    modules = [read_module(p, package_dir, known) for p in paths]
    graph = {m.name: {t for t in m.imports if t in known} for m in modules}
    functions = sorted(((f"{m.name}.{f}", n) for m in modules for f, n in m.functions), key=lambda x: -x[1])
    return {
        "modules": [{"name": m.name, "lines": m.lines} for m in sorted(modules, key=lambda m: -m.lines)],
        "total_lines": sum(m.lines for m in modules),
        "imports": {m.name: {t: ("lazy" if lazy else "top") for t, lazy in sorted(m.imports.items()) if t in known}
                    for m in modules},
        "cycles": cycles(graph),
        "layer_cycles": cycles({layer: {layer_of(t) for m, ts in graph.items() if layer_of(m) == layer
                                        for t in ts if layer_of(t) != layer}
                                for layer in {layer_of(m) for m in graph}}),
        "upward_imports": upward_imports(graph, layers),
        "private_imports": {m.name: m.private_imports for m in modules if m.private_imports},
        "longest_functions": functions[:15],
        "functions_over_60_lines": sum(1 for _, n in functions if n > 60),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=ROOT / PACKAGE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    r = report(args.package)
    print(f"{len(r['modules'])} modules, {r['total_lines']:,} lines")
    for m in r["modules"]:
        deps = ", ".join(t + ("*" if kind == "lazy" else "") for t, kind in r["imports"][m["name"]].items())
        print(f"  {m['name']:28s} {m['lines']:5d}  -> {deps}")
    print("  (* lazy import, inside a function)")
    print(f"import circles: {r['cycles'] or 'none'}; between layers: {r['layer_cycles'] or 'none'}")
    print(f"layers, bottom first: {' < '.join(LAYERS)}; upward imports: {r['upward_imports'] or 'none'}")
    print(f"private names imported across modules: {r['private_imports'] or 'none'}")
    print(f"functions over 60 lines: {r['functions_over_60_lines']}; longest:")
    for name, n in r["longest_functions"]:
        print(f"  {n:4d}  {name}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
