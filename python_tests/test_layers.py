"""The package's import layers (docs/design.md §2), read from the source with ``ast``.

Every ``import`` of every module of ``elastic_kernels`` counts, at any depth (inside functions,
``try`` or ``if TYPE_CHECKING`` blocks alike), relative imports resolved. Importing ``a.b.c``
also runs the faces ``a`` and ``a.b``: those are edges too, except towards the importer's own
packages (they are already loaded when it runs). Checked:

- no import circle among the modules;
- imports only go down the layers: base (``elastic_kernels/_*.py``) < formats < reference <
  triton | cuda < ops < models < tasks < interop < infer < train < the top-level faces
  (``elastic_kernels/__init__.py``, ``nvfp4.py``, ``env.py``: for users, so no module of the
  package imports them); within a layer anything goes, triton and cuda do not import each other;
- no module uses another module's underscore names (``from x import _y``, ``x._y``), nor a
  private module (``_name.py``) of another package; the base modules ``elastic_kernels/_*.py``
  are the shared base, public to the whole package.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "elastic_kernels"
ROOT = Path(__file__).resolve().parent.parent / PKG

LAYERS = ["base", "formats", "reference", ("triton", "cuda"), "ops", "models", "tasks", "interop", "infer",
          "train", "face"]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in (layer if isinstance(layer, tuple) else (layer,))}
FACES = {PKG, f"{PKG}.nvfp4", f"{PKG}.env"}


EXTENSIONS = {f"{PKG}._C"}  # compiled (csrc/): in the base layer, no source to read


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PKG, *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}
KNOWN = set(MODULES) | EXTENSIONS


def layer_of(mod: str) -> str:
    if mod in FACES:
        return "face"
    parts = mod.split(".")
    if len(parts) == 2 and parts[1].startswith("_"):
        return "base"
    if len(parts) >= 2 and parts[1] in RANK:
        return parts[1]
    raise AssertionError(f"{mod} is in no layer of docs/design.md §2; add it to LAYERS")


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _own_packages(mod: str) -> set[str]:
    return set(_ancestors(mod)) | ({mod} if mod in PACKAGES else set())


def _resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    base = mod.split(".") if mod in PACKAGES else mod.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


class Imports:
    """What one module imports: ``edges`` {module: first line}, ``names`` [(module, name, line)]
    taken with ``from module import name``, and ``attrs`` [(module, attr, line)] read as
    ``module.attr`` through a name bound to a module of the package."""

    def __init__(self, mod: str, path: Path) -> None:
        self.mod, self.edges, self.names, self.attrs = mod, {}, [], []
        tree = ast.parse(path.read_text(), str(path))
        bound: dict[str, str] = {}  # local name -> module of the package it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self._edge(a.name, node.lineno)
                    if a.asname:
                        bound[a.asname] = a.name
                    else:
                        bound[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, node)
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in KNOWN:  # `from pkg import module`
                        self._edge(sub, node.lineno)
                        bound[a.asname or a.name] = sub
                    else:
                        self._edge(src, node.lineno)
                        self.names.append((src, a.name, node.lineno))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and not isinstance(getattr(node, "ctx", None), ast.Del):
                chain, v = [node.attr], node.value
                while isinstance(v, ast.Attribute):
                    chain.append(v.attr)
                    v = v.value
                if not isinstance(v, ast.Name) or v.id not in bound:
                    continue
                target, rest = bound[v.id], chain[::-1]
                while rest and f"{target}.{rest[0]}" in MODULES:
                    target = f"{target}.{rest.pop(0)}"
                if target in MODULES and rest and (target, rest[0], node.lineno) not in self.attrs:
                    self.attrs.append((target, rest[0], node.lineno))

    def _edge(self, target: str, line: int) -> None:
        """``target`` (even one of the importer's own packages: ``from .. import name`` uses that
        face) and the faces it runs (except the importer's own packages, loaded before it)."""
        if target.split(".")[0] != PKG:
            return
        own = _own_packages(self.mod)
        for t in _ancestors(target):
            if t not in own:
                self.edges.setdefault(t, line)
        if target in KNOWN and target != self.mod:
            self.edges.setdefault(target, line)


GRAPH = {m: Imports(m, p) for m, p in MODULES.items()}


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT.parent)}:{line}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_the_reader_sees_the_package():
    assert len(MODULES) > 50 and f"{PKG}.ops.moe" in MODULES
    # known edges of today's code, read the three ways: absolute, relative, from-a-package-import-module
    assert f"{PKG}.formats" in GRAPH[f"{PKG}.ops.weights"].edges
    assert f"{PKG}._dispatch" in GRAPH[f"{PKG}.ops.moe"].edges
    assert f"{PKG}.models" in GRAPH[f"{PKG}.train.runner"].edges
    assert f"{PKG}.ops" in GRAPH[f"{PKG}.models.layers"].edges  # the face of ops.<module> runs too
    assert {layer_of(m) for m in MODULES} == set(RANK)


def test_no_import_circle():
    cycles = _cycles({m: set(g.edges) for m, g in GRAPH.items()})
    shown = [" -> ".join(f"{a} ({_where(a, GRAPH[a].edges[b])})" for a, b in zip(c, c[1:] + c[:1])
                         if b in GRAPH[a].edges) for c in cycles]
    assert not cycles, "import circles:\n" + "\n".join(shown)


def test_imports_only_go_down_the_layers():
    bad = []
    for m, g in GRAPH.items():
        lm = layer_of(m)
        for t, line in g.edges.items():
            lt = layer_of(t)
            if RANK[lt] > RANK[lm] or (RANK[lt] == RANK[lm] and lt != lm):
                bad.append(f"{_where(m, line)}: {m} ({lm}) imports {t} ({lt})")
    assert not bad, "imports up the layers of docs/design.md §2:\n" + "\n".join(bad)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_module_uses_another_modules_privates(mod):
    g, bad = GRAPH[mod], []
    for src, name, line in g.names:
        if src in MODULES and src != mod and _private(name):
            bad.append(f"{_where(mod, line)}: from {src} import {name}")
    for src, attr, line in g.attrs:
        if src != mod and _private(attr):
            bad.append(f"{_where(mod, line)}: {src}.{attr}")
    for t, line in g.edges.items():  # a private module of another package
        parent, _, leaf = t.rpartition(".")
        if _private(leaf) and parent != PKG and parent not in _own_packages(mod):
            bad.append(f"{_where(mod, line)}: imports {t}, private to {parent}")
    assert not bad, "\n".join(bad)
