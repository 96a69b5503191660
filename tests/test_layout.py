"""The layout: one import name, layers that point one way, no import cycles, private modules kept private.

Reads the source with `ast` (every import, function-level ones included); nothing is imported.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The repository's folders and the package names they install as (pyproject's package-dir).
PACKAGES = {"idefics_jax": "idefics_jax", "convert": "idefics_jax.convert", "train": "idefics_jax.train",
            "configs": "idefics_jax.configs"}

# Lowest first: a module may import its own layer and the layers before it, never a later one. docs/layout.md
# shows the same table.
LAYERS = [
    ("runtime", ["idefics_jax.runtime", "idefics_jax.configs"]),
    ("ops", ["idefics_jax.ops"]),
    ("model", ["idefics_jax.model"]),
    ("checkpoints", ["idefics_jax.checkpoints", "idefics_jax.convert"]),
    ("generation", ["idefics_jax.generation"]),
    ("serving", ["idefics_jax.serve"]),
    ("tasks", ["idefics_jax.shapes"]),
    # evaluation answers through serving's engine; training scores benchmarks through evaluation's runner.
    ("evaluation", ["idefics_jax.evaluate"]),
    ("training", ["idefics_jax.train"]),
    ("cli", ["idefics_jax.cli"]),
]
FACADE = "idefics_jax"  # the package's __init__: gathers the public names; nothing inside imports it


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and docs/layout.md)")


def imports(path: pathlib.Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a module of this package in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name`: the submodule pkg.name when it is one, else pkg itself.
            out += [(node.lineno, f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module)
                    for a in node.names]
    return [(line, m) for line, m in out if m.split(".")[0] == "idefics_jax" or m.split(".")[0] in PACKAGES]


def is_private(module: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in module.split("."))


MODULES = modules()
KNOWN = set(MODULES)
GRAPH = {m: imports(p, KNOWN) for m, p in MODULES.items()}


def test_one_top_level_name_in_the_source():
    """Every import names the installed package; `import train` works only inside a checkout."""
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {imp}" for m, deps in GRAPH.items()
           for line, imp in deps if imp.split(".")[0] != "idefics_jax"]
    assert not bad, "\n".join(bad)


def test_layers_point_one_way():
    bad = []
    for m, deps in GRAPH.items():
        if m == FACADE:
            continue
        for line, imp in deps:
            where = f"{MODULES[m].relative_to(ROOT)}:{line}"
            if imp == FACADE:
                bad.append(f"{where} imports the package facade; import the defining module instead")
            elif imp in KNOWN and layer_of(imp) > layer_of(m):
                bad.append(f"{where}: {LAYERS[layer_of(m)][0]} module {m} imports "
                           f"{LAYERS[layer_of(imp)][0]} module {imp}")
    assert not bad, "\n".join(bad)


def test_private_modules_stay_in_their_package():
    """`_name` modules are imported only from their own package and layer, and never from bench/ scripts."""
    bad = []
    for m, deps in GRAPH.items():
        for line, imp in deps:
            if imp in KNOWN and is_private(imp):
                owner = imp.rsplit(".", 1)[0]
                home = m if MODULES[m].name == "__init__.py" else m.rsplit(".", 1)[0]
                if home != owner or layer_of(m) != layer_of(imp):
                    bad.append(f"{MODULES[m].relative_to(ROOT)}:{line} imports private {imp}")
    for path in sorted((ROOT / "bench").glob("*.py")):
        bad += [f"{path.relative_to(ROOT)}:{line} imports private {imp}"
                for line, imp in imports(path, KNOWN) if is_private(imp)]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """Between modules (function-level imports count too): Tarjan's strongly connected components."""
    edges = {m: sorted({imp for _, imp in deps if imp in KNOWN and imp != m and imp != FACADE})
             for m, deps in GRAPH.items() if m != FACADE}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, []):
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
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != FACADE))
def test_every_module_has_a_layer(module):
    layer_of(module)


def test_folders_are_the_layers():
    """Inside idefics_jax/ every module lives in a folder that is one layer of the table (only the facade and the
    CLI sit at the top); each layer's names are folders (packages), so the tree on disk is the table."""
    loose = sorted(p.name for p in (ROOT / "idefics_jax").glob("*.py") if p.name not in ("__init__.py", "cli.py"))
    assert not loose, f"modules outside a layer's folder: {loose}"
    for layer, names in LAYERS:
        for name in names:
            if name == "idefics_jax.cli":
                continue
            assert name in MODULES and MODULES[name].name == "__init__.py", f"layer {layer}: {name} is not a folder"


# What only ops/ may look at: the platform a program runs on, and how a weight is stored.
PLATFORM_CALLS = {"default_backend", "devices", "local_devices", "device_count"}
WEIGHT_TYPES = {"QuantizedWeight", "AdaptedWeight"}


def _branches(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for every platform or weight-representation check in a module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "platform":
            out.append((node.lineno, ".platform"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "default_backend":
            out.append((node.lineno, "default_backend()"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | \
                    {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
            if names & WEIGHT_TYPES:
                out.append((node.lineno, f"isinstance(..., {'/'.join(sorted(names & WEIGHT_TYPES))})"))
        elif isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and c.value in ("cpu", "gpu", "tpu")
                                                   for c in [node.left, *node.comparators]):
            out.append((node.lineno, "a comparison with a platform name"))
    return out


def test_only_ops_branches_on_the_platform_or_the_weight_format():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}: {what}"
           for m in MODULES if not m.startswith("idefics_jax.ops")
           for line, what in _branches(ast.parse(MODULES[m].read_text()))]
    assert not bad, "\n".join(bad)


def test_the_branch_finder_finds_branches():
    """The check above is not vacuous: it sees each kind of branch."""
    src = ("jax.default_backend()\nx.devices()[0].platform\nisinstance(w, QuantizedWeight)\n"
           "isinstance(w, (q.AdaptedWeight, int))\nif p == 'tpu': pass\n")
    assert [line for line, _ in _branches(ast.parse(src))] == [1, 2, 3, 4, 5]
