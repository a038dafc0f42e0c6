"""The architecture contract of ``src/weightsmith``, read from the source (AST only, nothing is
imported): one direction of dependencies between layers, independent subsystems, no import
cycles, no private names borrowed across modules, functions <= 80 lines, modules <= 450 lines.

docs/architecture.md explains the layers. ``KNOWN_VIOLATIONS`` lists exactly the violations
the code still has: a new one fails, and so does a listed one that is gone (delete its line).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "weightsmith"

# Bottom to top. A module may import its own component and components of lower layers; the
# components of one layer are independent of each other. A component is a top-level package
# (``io``) or root module (``compare``); ``weightsmith`` is the package's own ``__init__``.
LAYERS: list[tuple[str, frozenset[str]]] = [
    ("errors", frozenset({"errors"})),  # the one exception family
    ("package root", frozenset({"weightsmith"})),  # __version__, re-exports of errors
    ("io", frozenset({"io"})),
    ("engines", frozenset({"core", "kernels"})),
    ("subsystems", frozenset({"compress", "merge", "distill", "evaluate", "ggml"})),
    ("tools", frozenset({"compare", "convert", "inspection"})),
    ("pipeline", frozenset({"pipeline"})),
    ("cli", frozenset({"cli"})),
    ("entry point", frozenset({"__main__"})),  # python -m weightsmith / weightsmith.distill
    ("testing", frozenset({"testing"})),  # above everything: nothing in src imports it
]
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 450

# Violations tolerated for now: none. Keep it that way; a listed one that is gone fails too.
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


# ----------------------------------------------------------------------------- the checker
@dataclass(frozen=True)
class Violation:
    key: str  # stable identity, as listed in KNOWN_VIOLATIONS
    detail: str  # what and where, for the failure message


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the weightsmith module imported
    names: tuple[str, ...]  # names taken from it (``from target import a, b``)
    line: int


def modules(root: Path) -> dict[str, Path]:
    """``weightsmith.io.reader`` -> its file (a package's name -> its ``__init__.py``)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = (root.name, *f.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def component(module: str) -> str:
    parts = module.split(".")
    if parts[-1] == "__main__":  # every `python -m weightsmith[.pkg]` entry point sits on top
        return "__main__"
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of(comp: str) -> int:
    for rank, (_, comps) in enumerate(LAYERS):
        if comp in comps:
            return rank
    raise AssertionError(f"component {comp!r} is in no layer: add it to LAYERS and the docs")


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in mods:
            return ".".join(parts[:k])
    return None


def imports(mods: dict[str, Path]) -> Iterator[Import]:
    """Every import of one of our modules, at any depth (lazy imports are dependencies too)."""
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _resolve(alias.name, mods)
                    if target:
                        yield Import(mod, target, (), node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                for alias in node.names:
                    sub = _resolve(f"{base}.{alias.name}", mods)
                    if sub == f"{base}.{alias.name}":  # `from package import module`
                        yield Import(mod, sub, (), node.lineno)
                    elif target := _resolve(base, mods):
                        yield Import(mod, target, (alias.name,), node.lineno)


def layer_violations(mods: dict[str, Path]) -> list[Violation]:
    out = {}
    for imp in imports(mods):
        a, b = component(imp.module), component(imp.target)
        if a == b or layer_of(b) < layer_of(a):
            continue
        la, lb = LAYERS[layer_of(a)][0], LAYERS[layer_of(b)][0]
        why = "a higher layer" if layer_of(b) > layer_of(a) else "another component of its layer"
        key = f"layer {imp.module} -> {imp.target}"
        out.setdefault(key, Violation(key, f"{mods[imp.module]}:{imp.line}: {imp.module} ({la}) "
                                           f"imports {imp.target} ({lb}), {why}"))  # fmt: skip
    return list(out.values())


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_violations(mods: dict[str, Path]) -> list[Violation]:
    """``from x import _name`` and ``x._name`` where x is another module of ours."""
    out = {}
    aliases: dict[str, dict[str, str]] = {}  # module -> local name -> our module it names
    for imp in imports(mods):
        if imp.target == imp.module:
            continue
        for name in imp.names:
            if _private(name):
                key = f"private {imp.module} uses {imp.target}.{name}"
                out.setdefault(key, Violation(key, f"{mods[imp.module]}:{imp.line}: {key}"))
        if not imp.names:
            aliases.setdefault(imp.module, {})[imp.target.rpartition(".")[2]] = imp.target
    for mod, local in aliases.items():
        for node in ast.walk(ast.parse(mods[mod].read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in local):  # fmt: skip
                key = f"private {mod} uses {local[node.value.id]}.{node.attr}"
                out.setdefault(key, Violation(key, f"{mods[mod]}:{node.lineno}: {key}"))
    return list(out.values())


def cycle_violations(mods: dict[str, Path]) -> list[Violation]:
    """Each group of modules that import each other, directly or through others (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for imp in imports(mods):
        if imp.target != imp.module:
            graph[imp.module].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [Violation(f"cycle {' | '.join(g)}", f"import cycle among {', '.join(g)}")
            for g in groups]  # fmt: skip


def size_violations(mods: dict[str, Path]) -> list[Violation]:
    out = []
    for mod, path in mods.items():
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        if n > MAX_MODULE_LINES:
            out.append(Violation(f"module {mod}", f"{path}: {n} lines (max {MAX_MODULE_LINES})"))
        for qualname, node in _functions(ast.parse(text)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append(Violation(f"function {mod}.{qualname}", f"{path}:{node.lineno}: "
                                     f"{qualname} is {length} lines (max {MAX_FUNCTION_LINES})"))  # fmt: skip
    return out


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


# ----------------------------------------------------------------------------- the tests
def _check(found: list[Violation], kind: str) -> None:
    known = {k for k in KNOWN_VIOLATIONS if k.startswith(kind + " ")}
    new = sorted((v for v in found if v.key not in known), key=lambda v: v.key)
    gone = sorted(known - {v.key for v in found})
    lines = [f"{len(new)} new {kind} violation(s):", *(f"  {v.detail}" for v in new)] if new else []
    if gone:
        lines += [f"{len(gone)} listed {kind} violation(s) fixed, delete from KNOWN_VIOLATIONS:",
                  *(f"  {k!r}" for k in gone)]  # fmt: skip
    assert not lines, "\n".join(lines)


@pytest.fixture(scope="module")
def mods() -> dict[str, Path]:
    return modules(SRC)


def test_layers_point_one_way(mods) -> None:
    _check(layer_violations(mods), "layer")


def test_no_private_names_across_modules(mods) -> None:
    _check(private_violations(mods), "private")


def test_no_import_cycles(mods) -> None:
    _check(cycle_violations(mods), "cycle")


def test_function_and_module_sizes(mods) -> None:
    found = size_violations(mods)
    _check([v for v in found if v.key.startswith("function ")], "function")
    _check([v for v in found if v.key.startswith("module ")], "module")


def test_every_component_has_a_layer(mods) -> None:
    for mod in mods:
        layer_of(component(mod))


def test_the_checker_finds_each_kind_of_violation(tmp_path: Path) -> None:
    """A made-up package with one violation of each kind (so these tests can fail)."""
    root = tmp_path / "weightsmith"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "io/__init__.py": "",
        "io/reader.py": "from weightsmith.core import engine\n",  # upward
        "core/__init__.py": "",
        "core/engine.py": "from weightsmith.core import loop\n\ndef _hidden(): ...\n",
        "core/loop.py": "from weightsmith.core.engine import _hidden\n",  # private + cycle
        "merge/__init__.py": "",
        "merge/api.py": "import weightsmith.compress.rtn as rtn\nrtn._scale\n",  # sibling
        "compress/__init__.py": "",
        "compress/rtn.py": "def long():\n" + "    x = 1\n" * 80 + "\n" * 380,
        "kernels/__init__.py": "from . import fast\n",
        "kernels/fast.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    mods = modules(root)
    keys = {v.key for v in layer_violations(mods) + private_violations(mods) +
            cycle_violations(mods) + size_violations(mods)}  # fmt: skip
    assert keys == {
        "layer weightsmith.io.reader -> weightsmith.core.engine",
        "layer weightsmith.merge.api -> weightsmith.compress.rtn",
        "private weightsmith.core.loop uses weightsmith.core.engine._hidden",
        "private weightsmith.merge.api uses weightsmith.compress.rtn._scale",
        "cycle weightsmith.core.engine | weightsmith.core.loop",
        "function weightsmith.compress.rtn.long",
        "module weightsmith.compress.rtn",
    }
