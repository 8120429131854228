"""No module of shortened uses another module's private (``_name``) functions, classes or attributes:
what modules share is public. Checked on the source's syntax tree."""

from __future__ import annotations

import ast
from pathlib import Path

import shortened

SRC = Path(shortened.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["shortened", *parts])


def _defined(tree: ast.Module) -> set[str]:
    """Private names a module defines: functions, classes, module or class variables, ``self._x`` attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return {n for n in names if _private(n)}


def _own_object(node: ast.expr) -> bool:
    """``self.x``, ``cls.x``, ``super().x``: a class's own members."""
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "super"


def private_uses(sources: dict[str, str]) -> list[str]:
    """``module:line what`` for each use of another shortened module's private name in ``sources``
    (module name -> source): ``from shortened.x import _y`` (also relative), and ``obj._y`` where ``_y`` is
    private to another module (defined there, not in the using module; ``self``/``cls``/``super()`` excluded).
    """
    trees = {name: ast.parse(text) for name, text in sources.items()}
    defined = {name: _defined(tree) for name, tree in trees.items()}
    found = []
    for name, tree in trees.items():
        elsewhere = set().union(*(d for other, d in defined.items() if other != name)) - defined[name]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                ours = node.level > 0 or (node.module or "").split(".")[0] == "shortened"
                for alias in node.names:
                    if ours and _private(alias.name):
                        found.append(f"{name}:{node.lineno} from {'.' * node.level}{node.module or ''} "
                                     f"import {alias.name}")
            elif isinstance(node, ast.Attribute) and node.attr in elsewhere and not _own_object(node.value):
                found.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names():
    sources = {_module_name(p, SRC): p.read_text(encoding="utf-8") for p in sorted(SRC.rglob("*.py"))}
    assert len(sources) > 40 and "shortened.engine.loss" in sources  # the whole package was read
    assert private_uses(sources) == []


def test_the_scan_finds_each_form():
    """The scan itself: private imports (absolute and relative) and private attributes of other modules are
    found; a module's own privates, ``self``/``super()`` members and other libraries' privates are not."""
    sources = {
        "shortened.a": "def _helper():\n    pass\nclass A:\n    def _step(self):\n        self._n = 1\n",
        "shortened.b": ("from .a import _helper\nfrom shortened.a import A, _helper as h\nimport argparse\n"
                        "def f(a, p):\n    a._step()\n    return a._n + len(p._actions)\n"),
        "shortened.c": ("from ._common import X\nimport torch\n"
                        "class C:\n    def _step(self):\n        return super()._step(), self._step, torch._C\n"
                        "def g(c):\n    return c._step()\n"),
    }
    found = private_uses(sources)
    assert found == ["shortened.b:1 from .a import _helper", "shortened.b:2 from shortened.a import _helper",
                     "shortened.b:5 a._step", "shortened.b:6 a._n"]
