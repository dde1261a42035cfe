"""Package boundaries, read from the source with ``ast`` (nothing is imported):

* the import graph of ``fp_kernels``, ``fp_patch`` and ``fp_tools`` has no cycle, counting imports
  inside functions too (a function-level import is a cycle postponed, not removed);
* no module uses another module's underscore name (``from x import _name``, ``x._name``): a name
  used across modules is an interface and is spelled without the underscore.

Each checker is also run on a small package written to ``tmp_path`` that breaks the rule, so these
tests can fail.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fp_kernels": ROOT / "kernels" / "fp_kernels", "fp_patch": ROOT / "fp_patch", "fp_tools": ROOT / "fp_tools"}
# scanned for underscore names, besides the packages: code that uses them the way a user would
USERS = ("benchmarks", "examples", "tests", "notebooks")


def package_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the packages."""
    modules = {}
    for name, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [name, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_module(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name a ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules of the packages it imports}``, from every import statement in the file."""
    modules = package_modules(packages)

    def owner(name: str) -> str | None:  # the longest module of ours that ``name`` lies in
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = imported_module(module, path, node)
                for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else owner(base))
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None``."""
    done, stack = set(), []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            found = visit(node)
            if found:
                return found
    return None


def private_uses(files: list[Path], ours: set[str]) -> list[str]:
    """``file:line: what`` for every underscore name of one of ``ours`` (top-level names of our modules,
    e.g. ``fp_patch``, ``helpers``) used from another module: ``from x import _name`` (relative imports
    are always ours) and ``alias._name`` where ``alias`` was bound by importing a module of ours."""

    def private(name: str) -> bool:
        return name.startswith("_") and not name.startswith("__")

    found = []
    for path in files:
        tree = ast.parse(source(path))
        aliases = set()  # names bound to modules of ours
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ours:
                        aliases.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in ours):
                for alias in node.names:
                    if private(alias.name):
                        where = "." * node.level + (node.module or "")
                        found.append(f"{path}:{node.lineno}: from {where} import {alias.name}")
                    else:
                        aliases.add(alias.asname or alias.name)  # may be a submodule: checked below
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and private(node.attr):
                base = node.value
                while isinstance(base, ast.Attribute) and not private(base.attr):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in aliases:
                    found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def source(path: Path) -> str:
    """A Python file's text, or a notebook's code cells (IPython ``%``/``!`` lines left out)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return text
    cells = ["".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code"]
    return "\n".join(line for cell in cells for line in cell.splitlines() if not line.lstrip().startswith(("%", "!")))


def _python_files(folders) -> list[Path]:
    return [p for folder in folders for pattern in ("*.py", "*.ipynb") for p in sorted(folder.rglob(pattern))]


def _our_top_level_names() -> set[str]:
    local = {p.stem for p in _python_files(ROOT / d for d in USERS)}  # e.g. tests' helpers, conftest
    return set(PACKAGES) | local


# -- the rules on this repository --------------------------------------------------------------------


def test_package_import_graph_has_no_cycle():
    graph = import_graph(PACKAGES)
    assert len(graph) > 30 and graph["fp_patch.attention"] >= {"fp_patch.masks", "fp_patch.recording"}
    cycle = find_cycle(graph)
    assert cycle is None, (
        f"import cycle: {' -> '.join(cycle)}; move what both sides need into a module that imports neither"
    )


def test_no_underscore_name_is_used_from_another_module():
    files = _python_files([*PACKAGES.values(), *(ROOT / d for d in USERS)])
    assert len(files) > 60
    found = private_uses(files, _our_top_level_names())
    assert not found, (
        "underscore names used from another module (make them public where they are an interface, or stop "
        "using them):\n" + "\n".join(found)
    )


# -- the checkers catch what they are for -------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "from .b import g\n\ndef f():\n    return g()\n",
        "pkg/b.py": "def g():\n    from .c import h\n    return h()\n",
        "pkg/c.py": "import pkg.a\n\ndef h():\n    return 1\n",
        "pkg/leaf.py": "X = 1\n",
    })
    graph = import_graph({"pkg": tmp_path / "pkg"})
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    _write(tmp_path, {"pkg/c.py": "from . import leaf\n\ndef h():\n    return leaf.X\n"})
    assert find_cycle(import_graph({"pkg": tmp_path / "pkg"})) is None


def test_underscore_names_across_modules_are_found(tmp_path):
    _write(tmp_path, {
        "pkg/a.py": "from .b import _hidden, public\nfrom pkg import c as mod\n\nx = mod._state\ny = mod.public\n",
        "pkg/b.py": "import pkg.c\nimport torch\n\nz = pkg.c._cache\nw = torch._dynamo\n_own = 1\nv = _own\n",
        "user.py": "from pkg.b import _own\n",
    })
    found = private_uses(_python_files([tmp_path]), {"pkg"})
    assert [line.split(": ", 1)[1] for line in found] == [
        "from .b import _hidden", "mod._state", "pkg.c._cache", "from pkg.b import _own",
    ]
