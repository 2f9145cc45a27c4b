"""The layout rules of docs/architecture.md, checked on the source with ``ast``.

* Layers: a module imports only its own package and packages on lower lines of the layer order
  written in docs/architecture.md ("Layer order"). Every import counts, at module level or inside
  a function: moving an import into a function hides a dependency, it does not remove it.
* No import cycle between modules.
* No function over 100 lines, except the data generators the document names.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorex"
DOC = ROOT / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 100


# --------------------------------------------------------------------------------------------
# reading the rules and the imports
# --------------------------------------------------------------------------------------------


def fenced_block_after(heading: str, text: str) -> list[str]:
    """The lines of the first fenced block below ``heading`` in the document."""
    after = text.split(heading, 1)
    if len(after) < 2:
        raise AssertionError(f"docs/architecture.md has no '{heading}' section")
    block = re.search(r"```[^\n]*\n(.*?)```", after[1], re.S)
    if block is None:
        raise AssertionError(f"no fenced block under '{heading}'")
    return [line for line in block.group(1).splitlines() if line.strip()]


def layer_order(text: str) -> dict[str, int]:
    """``area -> level`` from lines such as ``3  data`` (lowest first)."""
    levels = {}
    for line in fenced_block_after("## Layer order", text):
        level, *areas = line.split("#", 1)[0].split()
        for area in areas:
            levels[area] = int(level)
    return levels


def long_function_exemptions(text: str) -> set[str]:
    """``path:function`` names allowed over the limit (generators that read as one recipe)."""
    return {line.split()[0] for line in fenced_block_after("## Long functions", text)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, modules: dict[str, Path]) -> set[str]:
    """The lorex modules ``path`` imports, anywhere in the file. ``from pkg import sub`` imports
    the submodule ``pkg.sub`` when there is one, else the package ``pkg`` itself."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lorex")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lorex":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & modules.keys()
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(target)
    return {m for m in found if m in modules and m != me}


def area(module: str) -> str:
    """``lorex.training.loop`` -> ``training``; ``lorex.io`` -> ``io``; ``lorex`` -> ``lorex``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lorex"


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imported_modules(p, modules) for m, p in modules.items()}


def upward_imports(graph: dict[str, set[str]], levels: dict[str, int]) -> list[str]:
    """Edges to a higher layer, or to another package on the same line."""
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            a, b = area(module), area(target)
            if a != b and levels[b] >= levels[a]:
                bad.append(f"{module} -> {target} ({a} is layer {levels[a]}, {b} is {levels[b]})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def private_imports() -> list[str]:
    """``from other.package import _name``: a private name used outside its package (it should
    become public, or move to where it is used)."""
    modules = all_modules()
    bad = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if node.module.split(".")[0] != "lorex":
                continue
            home = (
                node.module
                if node.module in modules and modules[node.module].name == ("__init__.py")
                else node.module.rpartition(".")[0]
            )
            for alias in node.names:
                private = alias.name.startswith("_") and not alias.name.startswith("__")
                if private and home != package:
                    bad.append(f"{module}: from {node.module} import {alias.name}")
    return bad


def long_functions(limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``path:function`` -> lines, for every function (nested ones too) over ``limit``."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = lines
    return out


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def test_every_package_has_a_layer(doc):
    levels = layer_order(doc)
    missing = sorted({area(m) for m in all_modules()} - levels.keys())
    assert not missing, f"add these to 'Layer order' in docs/architecture.md: {missing}"


def test_no_module_imports_a_higher_layer(doc):
    bad = upward_imports(import_graph(), layer_order(doc))
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_name_crosses_a_package():
    bad = private_imports()
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


def test_no_function_over_100_lines(doc):
    allowed = long_function_exemptions(doc)
    over = {name: n for name, n in long_functions().items() if name not in allowed}
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: {over}"
    stale = allowed - long_functions().keys()
    assert not stale, f"docs/architecture.md exempts functions that are short now: {stale}"


# --------------------------------------------------------------------------------------------
# the checker itself, on made-up sources (each must catch what it is for)
# --------------------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, source in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return {".".join(Path(n).with_suffix("").parts): tmp_path / n for n in files}


def test_function_level_import_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    modules = _tree(
        tmp_path,
        {
            "lorex/data/gen.py": "def f():\n    from lorex.training.loop import fit\n",
            "lorex/training/loop.py": "from lorex.data.gen import f\n",
        },
    )
    modules = {m.removesuffix(".__init__"): p for m, p in modules.items()}
    graph = {m: imported_modules(p, modules) for m, p in modules.items()}
    assert graph["lorex.data.gen"] == {"lorex.training.loop"}
    assert upward_imports(graph, {"data": 1, "training": 2}) == [
        "lorex.data.gen -> lorex.training.loop (data is layer 1, training is 2)"
    ]
    assert cycles(graph) == [["lorex.data.gen", "lorex.training.loop"]]


def test_same_line_packages_may_not_import_each_other():
    graph = {"lorex.io": {"lorex.metrics.reid"}, "lorex.metrics.reid": set()}
    assert upward_imports(graph, {"io": 1, "metrics": 1})
    assert not upward_imports(graph, {"io": 2, "metrics": 1})


def test_from_package_import_submodule_resolves_to_the_submodule(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    files = {
        "lorex/__init__.py": "",
        "lorex/data/__init__.py": "X = 1\n",
        "lorex/data/digits.py": "",
        "lorex/data/registry.py": "from lorex.data import digits\nfrom . import X\n",
    }
    modules = {m.removesuffix(".__init__"): p for m, p in _tree(tmp_path, files).items()}
    found = imported_modules(modules["lorex.data.registry"], modules)
    assert found == {"lorex.data.digits", "lorex.data"}


def test_cycle_finder_on_a_longer_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
