"""The shape of the house (docs/architecture.md): the science core imports neither Ray nor MLflow
and has no import cycle, its layers only look down, `analysis/` never imports `sweeps/`, the
registries name what the torch-free catalog names, and an import left inside a function says why."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the leaves of prunelab: they import no other prunelab module but each other
LEAVES = {"prunelab.errors", "prunelab.files", "prunelab.seeds", "prunelab.catalog", "prunelab.metrics",
          "prunelab.fingerprint", "prunelab.blobs", "prunelab.lease",
          "prunelab.schema"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, known: set[str], functions_only: bool = False) -> set[str]:
    """The modules of `known` that the file at `path` imports (anywhere in it, or only inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree)
    if functions_only:
        nodes = (n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a known a.b
                t = t.rpartition(".")[0]
            if t:
                out.add(t)
    return out


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    known = set(mods)
    g = {}
    for name, path in mods.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))}
        # a module's own packages are initialized before it: those edges are Python's, not the design's
        g[name] = imports(path, known) - ancestors - {name}
    return g


def find_cycle(g: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_the_science_core_imports_neither_ray_nor_mlflow():
    names = sorted(n for n in modules("prunelab") if not n.endswith("__main__"))
    code = ("import importlib, sys\n"
            f"for n in {names!r}:\n    importlib.import_module(n)\n"
            "print(sorted(m for m in ('ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"importing prunelab pulled in {out.stdout.strip()}"


def test_prunelab_has_no_import_cycle():
    assert find_cycle(graph("prunelab")) is None, " -> ".join(find_cycle(graph("prunelab")))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layers_only_look_down():
    g = graph("prunelab")
    for leaf in LEAVES & set(g):
        assert g[leaf] <= LEAVES, f"{leaf} imports {sorted(g[leaf] - LEAVES)}"
    assert g["prunelab.hparams"] <= LEAVES, f"hparams imports {sorted(g['prunelab.hparams'] - LEAVES)}"
    # nothing in the core imports its entry points
    for name, deps in g.items():
        if not name.endswith("__main__"):
            assert not deps & {"prunelab.cli", "prunelab.__main__"}, name


@pytest.mark.parametrize("package", ["analysis", "prunelab"])
def test_no_import_of_sweeps(package):
    known = set(modules("sweeps")) | {"sweeps"}
    for name, path in modules(package).items():
        assert not imports(path, known), f"{name} imports {sorted(imports(path, known))}"


def test_registries_name_what_the_catalog_names():
    from prunelab import catalog, data, models, synthetic

    assert set(data.DATASETS) == set(catalog.DATASETS)
    assert set(models.MODELS) == set(catalog.MODELS)
    assert tuple(synthetic.DISTILLERS) == catalog.DISTILLERS
    assert tuple(synthetic.CORESETS) == catalog.CORESETS


def test_an_import_inside_a_function_says_why():
    """Imports belong at module level; one kept inside a function (start-up time, an optional or
    heavy dependency) carries a comment on its line or the line above."""
    silent = []
    for package in ("prunelab", "sweeps", "analysis"):
        for name, path in modules(package).items():
            lines = path.read_text().splitlines()
            tree = ast.parse("\n".join(lines))
            for f in ast.walk(tree):
                if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(f):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                        if "#" not in here and not above.startswith("#"):
                            silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not silent, "imports inside functions without a reason:\n" + "\n".join(sorted(set(silent)))
