"""The package's import structure (docs/design.md §10): an AST pass over every
module- and function-level import of every ``fastjepa`` module.

It fails on an import cycle, on a module importing one of a higher layer, on anything
importing a command-line entry point, and on a private name imported across subpackages.
``python tests/test_architecture.py`` prints the graph's violations without pytest.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Layer of each module (the longest matching dotted prefix wins). A module may import
# only from its own layer or below; within a layer the graph must still be acyclic.
LAYERS = {
    "fastjepa._C": 0,  # the compiled extension
    "fastjepa.version": 0,
    "fastjepa.rng": 0,
    "fastjepa.kernels": 0,
    "fastjepa.checkpoint": 1,
    "fastjepa.ops": 1,
    "fastjepa.schedulers": 1,
    "fastjepa.health": 1,
    "fastjepa.models": 2,
    "fastjepa.masks": 2,
    "fastjepa.data": 2,
    "fastjepa.distributed": 2,
    "fastjepa.fsdp": 2,
    "fastjepa.integrations": 2,
    "fastjepa.config": 3,
    "fastjepa.build": 3,
    "fastjepa.architecture": 3,
    "fastjepa.encoder": 4,
    "fastjepa.interop": 4,
    "fastjepa.training": 4,
    "fastjepa.training.trainer": 4,
    "fastjepa.evaluation": 4,
    "fastjepa.train": 5,
    "fastjepa.eval": 5,
    "fastjepa.checkpoint.__main__": 5,
    "fastjepa.masks.__main__": 5,
    "fastjepa.info": 5,
    "fastjepa.plot": 5,
    "fastjepa.trace": 5,
}
FACE = "fastjepa"  # the package's face (__init__) re-exports from below; nothing inside imports it

# Command-line entry points (``python -m ...``): no module imports them.
CLIS = {"fastjepa.train", "fastjepa.eval", "fastjepa.checkpoint.__main__", "fastjepa.masks.__main__", "fastjepa.info"}

# Edges that still break a rule, each with the reason it stays; the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(root: Path = ROOT) -> dict[str, Path]:
    package = root / "fastjepa"
    mods = {module_name(p, root): p for p in package.rglob("*.py")}
    if any(package.glob("_C*.so")) or any(package.glob("_C*.pyd")):
        mods["fastjepa._C"] = package
    return mods


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports(mods: dict[str, Path]):
    """Yield (importer, imported module, imported name or None, line) for every import."""
    for name, path in mods.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        base = name if is_package(path) else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "fastjepa":
                        yield name, alias.name, None, node.lineno
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    target = ".".join(parts + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "fastjepa":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:  # `from pkg import submodule`
                        yield name, sub, None, node.lineno
                    else:
                        yield name, target, alias.name, node.lineno


def layer(module: str) -> int:
    """The module's layer; a new module outside the map fails here until LAYERS places it."""
    if module == FACE:
        return 6
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"{module} has no layer: add it (or its package) to LAYERS in tests/test_architecture.py (docs/design.md §10)")


def unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: fastjepa.ops.rope -> fastjepa.ops."""
    return ".".join(module.split(".")[:2])


def graph(mods):
    edges: dict[tuple[str, str], int] = {}
    for src, dst, _name, line in imports(mods):
        if dst in mods and dst != src:
            edges.setdefault((src, dst), line)
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring the edges
    from a package's ``__init__`` to its own submodules and back (an import order, not a cycle)."""
    adj: dict[str, list[str]] = {}
    for a, b in edges:
        if b.startswith(a + ".") or a.startswith(b + "."):
            continue
        adj.setdefault(a, []).append(b)
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj.get(v, ()):
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

    for v in list(adj):
        if v not in index:
            visit(v)
    return out


def violations(root: Path = ROOT):
    mods = all_modules(root)
    edges = graph(mods)
    found = []
    for comp in cycles(edges):
        found.append(f"import cycle: {' <-> '.join(comp)}")
    for (src, dst), line in sorted(edges.items()):
        if (src, dst) in ALLOWED:
            continue
        if dst in CLIS:
            found.append(f"{src}:{line} imports the command-line module {dst}")
        elif layer(dst) > layer(src):
            found.append(f"{src}:{line} (L{layer(src)}) imports {dst} (L{layer(dst)}), a higher layer")
    for src, dst, name, line in imports(mods):
        if unit(src) == unit(dst) or (src, dst) in ALLOWED or dst == "fastjepa._C":
            continue
        private = [p for p in dst.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
        if name and name.startswith("_") and not name.startswith("__"):
            private.append(name)
        if private:
            found.append(f"{src}:{line} imports the private {'.'.join(private)} of {dst} across subpackages")
    return found


def test_every_module_has_a_layer():
    for name in all_modules():
        layer(name)


def test_imports_go_only_downward_without_cycles_clis_or_private_names():
    found = violations()
    assert not found, "\n".join(found)


def test_the_checker_sees_each_kind_of_violation(tmp_path):
    """The pass can fail: a cycle, an upward import, an import of a CLI and a private import
    across subpackages are each reported, in a package written for the purpose."""
    files = {
        "__init__.py": "",
        "ops/__init__.py": "from ._dispatch import available\nfrom . import rope\n",  # own privates: fine
        "ops/_dispatch.py": "def available(): ...\n",
        "ops/rope.py": "def f():\n    from ..models import vit  # upward\n",
        "models/__init__.py": "from . import vit\n",
        "models/vit.py": "from ..ops._dispatch import available  # private, across\nfrom ..ops import rope\n",
        "build.py": "from .training.trainer import x\n",  # cycle with trainer
        "training/__init__.py": "",
        "training/trainer.py": "from ..build import y\nfrom .. import eval\n",  # and a CLI
        "eval.py": "",
    }
    for name, text in files.items():
        (tmp_path / "fastjepa" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fastjepa" / name).write_text(text)
    found = "\n".join(violations(tmp_path))
    assert "import cycle: fastjepa.build <-> fastjepa.training.trainer" in found
    assert "import cycle: fastjepa.models.vit <-> fastjepa.ops.rope" in found
    assert "fastjepa.ops.rope:2 (L1) imports fastjepa.models.vit (L2), a higher layer" in found
    assert "fastjepa.build:1 (L3) imports fastjepa.training.trainer (L4), a higher layer" in found
    assert "fastjepa.training.trainer:2 imports the command-line module fastjepa.eval" in found
    assert "fastjepa.models.vit:1 imports the private _dispatch of fastjepa.ops._dispatch" in found
    assert "fastjepa.ops:1" not in found and len(found.splitlines()) == 6, found


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_entry_points_exist(cli):
    assert cli in all_modules()


def test_what_users_import_is_where_they_import_it():
    import fastjepa
    import fastjepa.checkpoint
    import fastjepa.masks
    import fastjepa.models
    import fastjepa.ops

    assert fastjepa.IJEPA is fastjepa.models.IJEPA
    assert callable(fastjepa.checkpoint.load_encoder) and callable(fastjepa.checkpoint.load_checkpoint)
    assert callable(fastjepa.masks.apply_masks) and callable(fastjepa.ops.gather_tokens)
    for name in ("ijepa", "vjepa2", "mae"):
        assert callable(importlib.import_module(f"fastjepa.integrations.{name}").apply)
    for cli in CLIS:
        assert callable(importlib.import_module(cli).main), cli


if __name__ == "__main__":
    print("\n".join(violations()) or "no violations")
