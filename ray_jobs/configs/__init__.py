"""Registry of the example configs: which typed config class each YAML under this folder loads into.

A YAML file maps to a job by its name: ``tiny/preprocess.yaml`` -> ``preprocess``; variants may add
a suffix after ``_``, ``-`` or ``.`` (``tiny/train_teacher_s3.yaml`` -> ``train_teacher``; the
longest matching job name wins). Classes are named as ``"module:ClassName"`` strings and imported
lazily, so this module imports no job code and a missing job is reported only for configs that
exist (tests/test_config.py loads every YAML here with its class).
"""

from __future__ import annotations

import importlib
from pathlib import Path

__all__ = ["CONFIGS_DIR", "JOB_CONFIGS", "ConfigRegistryError", "config_class", "job_for_config", "example_configs"]

CONFIGS_DIR = Path(__file__).resolve().parent

# job name (as in `python -m ray_jobs.<job>`) -> "module:ConfigClass"
JOB_CONFIGS: dict[str, str] = {
    "synthetic": "ray_jobs.synthetic:SyntheticConfig",
    "preprocess": "ray_jobs.preprocess.config:PreprocessConfig",
    "train_teacher": "ray_jobs.train_teacher:TeacherConfig",
    "pretrain_teacher": "ray_jobs.pretrain_teacher:PretrainConfig",
    "make_preferences": "ray_jobs.make_preferences:PreferencesConfig",
    "train_tpo": "ray_jobs.train_tpo:TPOConfig",
    "distill_lcm": "ray_jobs.distill_lcm:DistillConfig",
    "pipeline": "ray_jobs.pipeline:PipelineConfig",
    "evaluate": "ray_jobs.evaluate:EvaluateConfig",
    "fit_perception": "ray_jobs.fit_perception:FitPerceptionConfig",
    "fit_vae": "ray_jobs.fit_vae:FitVAEConfig",
}


class ConfigRegistryError(LookupError):
    """A YAML maps to no job, or a job's config class cannot be imported; the message says which."""


def job_for_config(path: str | Path) -> str:
    """The job a YAML file belongs to: its stem, or the longest job name it starts with plus ``_-.``."""
    stem = Path(path).name.removesuffix(".yaml").removesuffix(".yml")
    matches = [job for job in JOB_CONFIGS if stem == job or stem.startswith((f"{job}_", f"{job}-", f"{job}."))]
    if not matches:
        raise ConfigRegistryError(f"{path}: no job named like {stem!r}; known jobs: {sorted(JOB_CONFIGS)}")
    return max(matches, key=len)


def config_class(job: str) -> type:
    """Import and return the config class registered for ``job``."""
    if job not in JOB_CONFIGS:
        raise ConfigRegistryError(f"unknown job {job!r}; known jobs: {sorted(JOB_CONFIGS)}")
    module_name, _, class_name = JOB_CONFIGS[job].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigRegistryError(f"job {job!r}: cannot import {module_name} ({exc})") from exc
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ConfigRegistryError(f"job {job!r}: {module_name} has no class {class_name} (fix JOB_CONFIGS)")
    return cls


def example_configs() -> list[Path]:
    """Every YAML file under this folder, sorted."""
    return sorted(p for pattern in ("*.yaml", "*.yml") for p in CONFIGS_DIR.rglob(pattern))
