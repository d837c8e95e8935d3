"""The package's layers: no import circles (lazy imports inside functions included), and no
module importing a layer above it (the engine knows nothing of the CLI; models nothing of methods)."""

import ast
import pathlib

import gpt2tune

ROOT = pathlib.Path(gpt2tune.__file__).parent

# a layer may import itself and those listed; none imports what is not listed
ALLOWED = {
    "errors": set(),
    "data": {"errors"},
    "model": {"errors", "data"},
    "method": {"errors", "model"},
    "train": {"errors", "data", "model"},
    "generate": {"errors", "data", "model", "evaluate"},
    "evaluate": {"errors", "data", "model", "generate"},
}


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("gpt2tune"):
                deps.add(n.module)
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name.startswith("gpt2tune")}
        mods[name] = deps

    def norm(d: str) -> str:
        while d not in mods and "." in d:
            d = d.rsplit(".", 1)[0]
        return d

    return {m: {norm(d) for d in ds} - {m} for m, ds in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_layers_import_only_downward():
    bad = []
    for mod, deps in import_graph().items():
        layer = mod.split(".")[1] if "." in mod else ""
        if layer not in ALLOWED:
            continue
        for d in deps:
            other = d.split(".")[1] if "." in d else ""
            if other and other != layer and other not in ALLOWED[layer]:
                bad.append(f"{mod} imports {d}")
    assert not bad, bad
