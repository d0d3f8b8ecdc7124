"""Layering rules from docs/design.md, checked by parsing imports (no code is imported or run).

`model/` imports neither `ray_jobs` nor `serving`; `serving/` never imports `ray_jobs`.
Absolute imports, relative imports (resolved against the file's package) and literal
`importlib.import_module("...")` / `__import__("...")` calls all count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULES = {"model": {"ray_jobs", "serving"}, "serving": {"ray_jobs"}}


def _module_package(root: Path, path: Path) -> list[str]:
    """Dotted package parts a file's relative imports resolve against: model/a/b.py -> [model, a]."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # a module's package is its folder; for __init__.py that is the package itself


def imported_modules(root: Path, path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of everything ``path`` imports; relative names are resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += _resolve_from(root, path, node)
        elif isinstance(node, ast.Call) and _is_dynamic_import(node):
            found.append((node.lineno, node.args[0].value))
    return found


def _resolve_from(root: Path, path: Path, node: ast.ImportFrom) -> list[tuple[int, str]]:
    if node.level == 0:
        return [(node.lineno, node.module or "")]
    package = _module_package(root, path)
    # Going above the top-level package lands on the repo root, i.e. any top-level name.
    base = package[: len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
    if node.module:
        return [(node.lineno, ".".join([*base, node.module]))]
    return [(node.lineno, ".".join([*base, alias.name])) for alias in node.names]


def _is_dynamic_import(node: ast.Call) -> bool:
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return (name in ("import_module", "__import__") and bool(node.args)
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


def find_violations(root: Path, rules: dict[str, set[str]] = RULES) -> list[str]:
    """``"path:line imports name"`` for every import that breaks a layering rule under ``root``."""
    violations = []
    for package, forbidden in sorted(rules.items()):
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_modules(root, path):
                if name.split(".")[0] in forbidden:
                    violations.append(f"{path.relative_to(root)}:{line} imports {name}")
    return violations


def test_repository_respects_layers():
    assert (REPO / "model" / "storage.py").is_file() and (REPO / "serving" / "__init__.py").is_file()
    assert find_violations(REPO) == []


def _plant(root: Path, rel: str, source: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(source)


@pytest.mark.parametrize("rel, source, expected", [
    ("model/a.py", "import ray_jobs.common\n", "model/a.py:1 imports ray_jobs.common"),
    ("model/a.py", "x = 1\nfrom serving.app import build\n", "model/a.py:2 imports serving.app"),
    ("model/sub/a.py", "from ...ray_jobs import common\n", "model/sub/a.py:1 imports ray_jobs"),
    ("model/a.py", "from .. import serving\n", "model/a.py:1 imports serving"),
    ("model/__init__.py", "from ..serving.app import x\n", "model/__init__.py:1 imports serving.app"),
    ("serving/app.py", "def f():\n    from ray_jobs.preprocess import run\n",
     "serving/app.py:2 imports ray_jobs.preprocess"),
    ("serving/app.py", "import importlib\nm = importlib.import_module('ray_jobs.pipeline')\n",
     "serving/app.py:2 imports ray_jobs.pipeline"),
])
def test_checker_catches_planted_violation(tmp_path, rel, source, expected):
    _plant(tmp_path, "model/__init__.py", "")
    _plant(tmp_path, "serving/__init__.py", "")
    assert find_violations(tmp_path) == []
    _plant(tmp_path, rel, source)
    assert find_violations(tmp_path) == [expected]


def test_checker_allows_legal_imports(tmp_path):
    _plant(tmp_path, "model/a.py", "from . import b\nfrom .sub import c\nimport model.storage\nimport rayx\n")
    _plant(tmp_path, "model/sub/c.py", "from .. import a\nfrom ..storage import Storage\n")
    _plant(tmp_path, "serving/app.py", "from model.storage import Storage\nimport ray.serve\nfrom . import serving_utils\n")
    _plant(tmp_path, "ray_jobs/x.py", "import serving.app\n")  # jobs may use anything
    assert find_violations(tmp_path) == []
    assert ("model.sub" in dict((n, l) for l, n in imported_modules(tmp_path, tmp_path / "model/a.py")))
