"""The package's imports run one way: the engine core imports nothing of the application, no module imports
itself back through others, and each layer of docs/design.md imports only its own and the ones below it (imports
inside functions and under TYPE_CHECKING counted too). Read from the source with ``ast``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "ortho_lora_dist"
CORE = f"{PACKAGE}.core"
# what the core may import besides the standard library and itself
CORE_THIRD_PARTY = {"torch", "peft", "torchjd"}
# docs/design.md's layers, lowest first: sub-package (or module) prefixes under the package; the longest prefix wins
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("runtime",),
    ("engines",),  # engine specs: read by the config check (names) and every layer above
    ("data.errors", "data.formats"),  # record formats: the config's format values come from them
    ("config",),
    ("data",),
    ("models",),
    ("artifacts",),
    ("evaluation",),
    ("training",),
    ("study", "scaffold"),
    ("integrations",),
    ("cli", "projection"),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every module ``name`` imports (absolute, relative, at any depth), ours resolved to modules of ``modules``."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules)
    return out


def graph(root: Path, package: str) -> dict[str, set[str]]:
    """{module: the modules of ``package`` it imports} plus, under key ("external", module), the others."""
    files = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(files)
    return {m: imports_of(p, m, modules) for m, p in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
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
            if len(comp) > 1 or v in edges.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges = graph(ROOT, PACKAGE)
    assert len(edges) > 40, "the package was not found"
    found = cycles({m: {t for t in ts if t in edges} for m, ts in edges.items()})
    assert not found, f"import cycles: {found}"


def test_core_imports_nothing_of_the_application():
    edges = graph(ROOT, PACKAGE)
    core = {m: ts for m, ts in edges.items() if m == CORE or m.startswith(CORE + ".")}
    assert len(core) >= 15
    allowed = CORE_THIRD_PARTY | set(sys.stdlib_module_names) | {"__future__"}
    bad = {
        m: sorted(
            t
            for t in ts
            if not (t == CORE or t.startswith(CORE + ".")) and (t.startswith(PACKAGE) or t.split(".")[0] not in allowed)
        )
        for m, ts in core.items()
    }
    assert not {m: ts for m, ts in bad.items() if ts}, f"the core imports outside itself: {bad}"


def layer_of(module: str, package: str = PACKAGE) -> int | None:
    """The index in LAYERS of ``module`` (longest matching prefix), None for the package root or an unlisted one."""
    rest = module.removeprefix(package + ".")
    best: tuple[int, int] | None = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (rest == p or rest.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def layer_violations(edges: dict[str, set[str]], package: str = PACKAGE) -> list[str]:
    """'a -> b' for each import of a module from a higher layer, and 'a: no layer' for a module LAYERS misses."""
    bad = []
    for m, targets in sorted(edges.items()):
        if m == package:
            continue
        lm = layer_of(m, package)
        if lm is None:
            bad.append(f"{m}: no layer (add it to LAYERS and to docs/design.md)")
            continue
        for t in sorted(targets):
            lt = layer_of(t, package) if t.startswith(package + ".") else None
            if lt is not None and lt > lm:
                bad.append(f"{m} -> {t}")
    return bad


def test_layers_import_only_downwards():
    edges = graph(ROOT, PACKAGE)
    assert not layer_violations(edges), "imports against the layer order:\n" + "\n".join(layer_violations(edges))


def test_the_checks_catch_a_cycle_and_a_core_import(tmp_path):
    """The detector itself, on a made-up package: a -> b -> (inside a function) a, and core -> app."""
    pkg = tmp_path / "pkg"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "core" / "step.py").write_text("from ..a import y\nimport numpy\n")
    edges = graph(tmp_path, "pkg")
    assert cycles({m: {t for t in ts if t in edges} for m, ts in edges.items()}) == [["pkg.a", "pkg.b"]]
    assert "pkg.a" in edges["pkg.core.step"] and "numpy" in edges["pkg.core.step"]
    assert layer_violations(
        {"pkg.runtime.io": {"pkg.training.loop"}, "pkg.training.loop": {"pkg.core.step"}}, "pkg"
    ) == ["pkg.runtime.io -> pkg.training.loop"]
    assert layer_violations({"pkg.plugins.x": set()}, "pkg") == [
        "pkg.plugins.x: no layer (add it to LAYERS and to docs/design.md)"
    ]
