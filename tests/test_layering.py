"""The import contract: gpulab's layers import downwards only, no module cycles, and `import gpulab`
stays light. The layer table is docs/ARCHITECTURE.md's, read off the folder names:

    core  <  sources  <  storage  <  runtime  <  ui, commands  <  cli, magics, gpulab/__init__

and inside core, by package:

    core's own modules (the types)  <  placement  <  policies  <  measure  <  fleet  <  exports

A module may import its own layer and the layers below it. Imports inside functions count as
well: an upward import there is still an upward dependency, only a deferred one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "gpulab"
LAYERS = {"core": 0, "sources": 1, "storage": 2, "runtime": 3, "ui": 4, "commands": 4,
          "cli": 5, "magics": 5, "__init__": 5, "__main__": 5, "testing": 5, "netem": 5}
# inside core: the types (core's own modules) first, then each package on those before it
CORE_PACKAGES = {"placement": 1, "policies": 2, "measure": 3, "fleet": 4, "exports": 5}
# third-party imports allowed per layer (core: standard library and numpy only)
CORE_ALLOWED = {"numpy"}


def _module_name(path: Path, root: Path = PKG) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> tuple[int, int]:
    """(layer, rank inside core): compared as a pair, so all of core sits below sources."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    sub = CORE_PACKAGES.get(parts[2], 0) if top == "core" and len(parts) > 2 else 0
    return LAYERS[top], sub


def _show(module: str) -> str:
    top, sub = _layer(module)
    return f"{top}.{sub}" if sub else str(top)


def _imports(path: Path, root: Path = PKG) -> list[tuple[str, int]]:
    """(imported module, line) for every gpulab import of a file, relative ones resolved."""
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:      # `from . import x`: x is a module of that package
                    out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
                    continue
            else:
                target = node.module or ""
            if target == "gpulab" or target.startswith("gpulab."):
                out.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("gpulab")]
    return out


def _third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"gpulab", "__future__"}


def violations(root: Path = PKG) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        me = _module_name(path, root)
        for target, line in _imports(path, root):
            if target == "gpulab":
                target = "gpulab.__init__"
            if _layer(target) > _layer(me):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {me} (layer {_show(me)}) imports "
                           f"{target} (layer {_show(target)})")
        if me.startswith("gpulab.core"):
            extra = _third_party(path) - CORE_ALLOWED
            if extra:
                bad.append(f"{path.relative_to(root.parent)}: core imports {sorted(extra)}")
    return bad


def cycles(root: Path = PKG) -> list[list[str]]:
    """Import cycles among gpulab's modules (through top-level and deferred imports alike)."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p, root) for p in root.rglob("*.py")}
    for path in root.rglob("*.py"):
        me = _module_name(path, root)
        deps = set()
        for target, _ in _imports(path, root):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]     # `from gpulab.core.x import name`
            if target in modules and target != me and target != "gpulab":
                deps.add(target)
        graph[me] = deps
    found, state, stack = [], {}, []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_layers_import_downwards_only():
    assert violations() == []


def test_no_import_cycles():
    assert cycles() == []


def test_every_folder_is_a_layer():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules = {p.stem for p in PKG.glob("*.py")}
    assert folders | modules <= set(LAYERS), \
        "a new folder or top-level module needs a row in LAYERS and in ARCHITECTURE.md"
    core = {p.name for p in (PKG / "core").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert core == set(CORE_PACKAGES), "a new package in core needs a rank in CORE_PACKAGES and in ARCHITECTURE.md"


def test_the_contract_catches_an_upward_import_and_a_cycle(tmp_path):
    """Proof the check can fail: a copy of the package with core importing the UI, and two
    runtime modules importing each other."""
    import shutil
    copy = tmp_path / "gpulab"
    shutil.copytree(PKG, copy, ignore=shutil.ignore_patterns("__pycache__"))
    planner = copy / "core" / "placement" / "planner.py"
    planner.write_text(planner.read_text() + "\n\ndef _oops():\n    from ...ui import figures  # noqa\n")
    compute = copy / "core" / "placement" / "compute.py"      # placement reaching up into the fleet planner
    compute.write_text(compute.read_text() + "\n\ndef _oops():\n    from ..fleet.planner import plan_fleet  # noqa\n")
    (copy / "runtime" / "a_mod.py").write_text("from . import b_mod\n")
    (copy / "runtime" / "b_mod.py").write_text("from .a_mod import x\n")
    bad = violations(copy)
    assert any("gpulab.core.placement.planner (layer 0.1) imports gpulab.ui (layer 4)" in b for b in bad), bad
    assert any("gpulab.core.placement.compute (layer 0.1) imports gpulab.core.fleet.planner (layer 0.4)" in b
               for b in bad), bad
    assert ["gpulab.runtime.a_mod", "gpulab.runtime.b_mod", "gpulab.runtime.a_mod"] in cycles(copy) or \
        ["gpulab.runtime.b_mod", "gpulab.runtime.a_mod", "gpulab.runtime.b_mod"] in cycles(copy)


@pytest.mark.parametrize("heavy", ["llama_cpp", "ipywidgets", "plotly", "pynvml", "IPython", "pandas",
                                   "numpy", "gguf", "gpulab.core.fleet.planner"])
def test_import_gpulab_is_light(heavy):
    """`import gpulab` and its planner load none of these (the fleet planner loads on first use)."""
    code = f"import sys, gpulab; gpulab.plan; sys.exit(1 if {heavy!r} in sys.modules else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"`import gpulab` loads {heavy}: {r.stderr}"


def test_lazy_names_of_gpulab():
    """Every name in gpulab.__all__ resolves (the lazy ones on first use) to the object it names."""
    code = ("import gpulab\nfrom gpulab.core.fleet.planner import plan_fleet\n"
            "from gpulab.core.placement.planner import plan\n"
            "assert gpulab.plan_fleet is plan_fleet and gpulab.plan is plan\n"
            "missing = [n for n in gpulab.__all__ if not hasattr(gpulab, n)]\n"
            "assert not missing, missing\nassert set(gpulab.__all__) <= set(dir(gpulab))\n"
            "try:\n    gpulab.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
