"""The modules of minivae import each other without a cycle, and the core never imports the layers above it.

The graph is read from the source (every ``import`` statement, at module level or inside a function): an
edge A -> B when module A imports module B (``from .b import f``, ``from . import b``, ``import minivae.b``).
A package's ``__init__`` counts as the module of the package's name.
"""
import ast
from pathlib import Path

import minivae

PACKAGE = Path(minivae.__file__).parent

# the core: the readable op pairs and the model (issue 27: the fast path, the training application and the
# teaching tools sit above it and import it, never the other way round)
CORE = ("backend", "layers", "gaussian", "likelihoods", "objectives", "conv", "conditional", "networks", "config",
        "model", "optim", "gradcheck")


def _modules():
    """{dotted name: path} of every module of the package (a package's __init__ under the package's name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module, is_package, level, target):
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph():
    """{module: set of modules of the package it imports}."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                # from pkg import sub (a module) -> pkg.sub; from mod import name -> mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:               # import minivae.fast.threads as t -> that module
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("minivae"):
                    edges.add(t)
        graph[name] = edges
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each a frozenset."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

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
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_the_imports_it_should():
    g = import_graph()
    assert "minivae.model" in g["minivae.fast.iw"] and "minivae.optim" in g["minivae.fast.adam"]
    assert "minivae.fast.cpu_kernels" in g["minivae.fast.threads"]         # from . import cpu_kernels
    assert "minivae.fast" in g["minivae.train.loop"]                       # from ..fast import (inside a function)
    assert "minivae.train.settings" in g["minivae.train.loop"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle():
    found = cycles(import_graph())
    assert not found, f"import cycles: {[sorted(c) for c in found]}"


def test_the_core_imports_only_the_core():
    g = import_graph()
    core = {f"minivae.{m}" for m in CORE}
    for m in sorted(core):
        above = sorted(g[m] - core)
        assert not above, f"{m} imports {above}, which are not in the core"


def _private_uses(path):
    """(line, text) of every private name ``path`` takes from elsewhere: ``obj._name`` on anything but ``self`` or
    ``cls``, and ``from minivae... import _name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("minivae")):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.startswith("_")]
    return found


def test_the_fast_path_uses_only_the_cores_public_names(tmp_path):
    """Issue 27: minivae/fast talks to the core through public names only (it once reached into model._tile,
    optim._pairs, opt._init_state and private VAE methods)."""
    import textwrap
    bad = [f"{p.name}:{line}: {text}" for p in sorted((PACKAGE / "fast").glob("*.py"))
           for line, text in _private_uses(p)]
    assert not bad, f"the fast path uses private names: {bad}"
    demo = tmp_path / "demo.py"             # the reader sees both kinds of use
    demo.write_text(textwrap.dedent("""
        from .model import _tile
        def f(model, self):
            return model._tile(self._x)
    """))
    assert [t for _, t in _private_uses(demo)] == ["import _tile", "model._tile"]
