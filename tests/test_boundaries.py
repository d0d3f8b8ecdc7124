"""Layering rules from docs/design.md, checked by parsing imports (no code is imported or run).

Layers, bottom up: `core/` (config base, storage, media I/O) < `model/` (networks, samplers, VAE;
local paths only, so it imports no storage) < `artifacts/` (what crosses a stage boundary) <
`serving/` and `ray_jobs/`. `serving/` never imports `ray_jobs`; no job module imports another
job's module (the pipeline, which runs them, excepted). Absolute imports, relative imports
(resolved against the file's package), ``from pkg import submodule`` and literal
`importlib.import_module("...")` / `__import__("...")` calls all count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RULES = {"core": {"model", "artifacts", "ray_jobs", "serving"},
         "model": {"artifacts", "ray_jobs", "serving", "core.storage"},
         "artifacts": {"ray_jobs", "serving"},
         "serving": {"ray_jobs"}}
# The job modules (what `ray job submit ... python -m ...` runs); the rest of ray_jobs/ is shared library
# (training loop, preprocessing stages, the synthetic world, rewards, configs).
JOB_MODULES = {"ray_jobs.preprocess.job", "ray_jobs.train_teacher", "ray_jobs.pretrain_teacher",
               "ray_jobs.preferences.job", "ray_jobs.make_preferences", "ray_jobs.train_tpo", "ray_jobs.distill_lcm",
               "ray_jobs.evaluate", "ray_jobs.fit_vae", "ray_jobs.fit_perception", "ray_jobs.pipeline",
               "ray_jobs.pipeline_eval"}
RUNS_JOBS = {"ray_jobs.pipeline", "ray_jobs.pipeline_eval"}  # the main job and its report stage run the others


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
    if node.level == 0:  # `from core import storage` may name a submodule: count both spellings
        return [(node.lineno, node.module or "")] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
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
                if any(name == bad or name.startswith(bad + ".") for bad in forbidden):
                    violations.append(f"{path.relative_to(root)}:{line} imports {name}")
    return _first_per_line(violations)


def _first_per_line(violations: list[str]) -> list[str]:
    """One report per import statement (`from a import b` is checked as both `a` and `a.b`)."""
    seen, kept = set(), []
    for text in violations:
        where = text.split(" imports ")[0]
        if where not in seen:
            seen.add(where)
            kept.append(text)
    return kept


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def job_violations(root: Path, jobs: set[str] = JOB_MODULES) -> list[str]:
    """``"path:line imports job"`` for every job module importing another job's module (the pipeline excepted)."""
    violations = []
    for path in sorted((root / "ray_jobs").rglob("*.py")):
        me = _module_name(root, path)
        if me not in jobs or me in RUNS_JOBS:
            continue
        for line, name in imported_modules(root, path):
            other = next((job for job in jobs if name == job or name.startswith(job + ".")), None)
            if other is not None and other != me:
                violations.append(f"{path.relative_to(root)}:{line} imports {name}")
    return _first_per_line(violations)


def test_repository_respects_layers():
    assert (REPO / "core" / "storage.py").is_file() and (REPO / "serving" / "__init__.py").is_file()
    assert find_violations(REPO) == []


def test_no_job_imports_another_job():
    assert all((REPO / (job.replace(".", "/") + ".py")).is_file() for job in JOB_MODULES)  # the list is current
    assert job_violations(REPO) == []


def test_job_checker_catches_a_planted_job_import(tmp_path):
    _plant(tmp_path, "ray_jobs/train_tpo.py", "from ray_jobs.train_teacher import TRAIN_COLUMNS\n")
    _plant(tmp_path, "ray_jobs/pipeline.py", "from ray_jobs import train_tpo\nimport ray_jobs.train_teacher\n")
    _plant(tmp_path, "ray_jobs/training/loop.py", "from ray_jobs.train_teacher import x\n")  # library: not checked here
    assert job_violations(tmp_path) == ["ray_jobs/train_tpo.py:1 imports ray_jobs.train_teacher"]


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
    ("model/a.py", "from core import storage\n", "model/a.py:1 imports core.storage"),
    ("model/a.py", "from core.storage import Storage\n", "model/a.py:1 imports core.storage"),
    ("core/a.py", "from model.flow import add_noise\n", "core/a.py:1 imports model.flow"),
    ("artifacts/a.py", "import ray_jobs.training.loop\n", "artifacts/a.py:1 imports ray_jobs.training.loop"),
])
def test_checker_catches_planted_violation(tmp_path, rel, source, expected):
    _plant(tmp_path, "model/__init__.py", "")
    _plant(tmp_path, "serving/__init__.py", "")
    assert find_violations(tmp_path) == []
    _plant(tmp_path, rel, source)
    assert find_violations(tmp_path) == [expected]


def test_checker_allows_legal_imports(tmp_path):
    _plant(tmp_path, "model/a.py", "from . import b\nfrom .sub import c\nimport core.config\nimport rayx\n")
    _plant(tmp_path, "model/sub/c.py", "from .. import a\nfrom ..storage import Storage\n")
    _plant(tmp_path, "serving/app.py", "from core.storage import Storage\nimport ray.serve\nfrom . import serving_utils\n")
    _plant(tmp_path, "ray_jobs/x.py", "import serving.app\n")  # jobs may use anything
    assert find_violations(tmp_path) == []
    assert ("model.sub" in dict((n, l) for l, n in imported_modules(tmp_path, tmp_path / "model/a.py")))
