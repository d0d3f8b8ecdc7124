"""The main job: synthetic data -> preprocessing -> teacher -> preferences -> TPO -> distillation ->
evaluation -> one request to the served student, ending in a report folder.

    python -m ray_jobs.pipeline                       # tiny embedded default on a local Ray
    python -m ray_jobs.pipeline --config FILE --set teacher.steps=50 --set workdir=s3://bucket/run1

Each stage is configured by its own job's example YAML (`ray_jobs/configs/tiny/<job>.yaml`) plus
the dotted overrides in this config's section for it (`teacher: {steps: 300}`), and the pipeline
wires the paths between stages under `workdir`. Every stage config is built and validated before
anything runs, so a bad key fails at start. A stage whose completion marker
`{workdir}/_stages/<stage>.json` exists is skipped (and the training jobs resume by run name), so
re-running after a crash continues where it stopped. Each stage prints a progress line with its time.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from core.config import StrictConfig, load_config
from core.storage import Storage, StorageConfig
from ray_jobs import distill_lcm, pipeline_eval, preferences, train_teacher, train_tpo
from ray_jobs.common import RayConfig, init_ray, parse_job_config, setup_logging
from ray_jobs.configs import config_class
from ray_jobs.preprocess import job as preprocess_job
from ray_jobs.synthetic import world as synthetic_world

__all__ = ["PipelineConfig", "STAGES", "STAGE_JOBS", "build_stage_configs", "run", "main"]

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs" / "tiny"
STAGES = ("synthetic", "preprocess", "teacher", "preferences", "tpo", "distill", "evaluate", "serve")
# Stage -> the job it runs, by its name in `ray_jobs.configs.JOB_CONFIGS` (the one registry of job configs:
# the stage's example YAML is configs/tiny/<job>.yaml and its config class the registry's).
STAGE_JOBS = {"synthetic": "synthetic", "preprocess": "preprocess", "teacher": "train_teacher",
              "preferences": "make_preferences", "tpo": "train_tpo", "distill": "distill_lcm"}


class EvaluationSection(StrictConfig):
    """The final comparison on held-out clips (docs: PAPERS.md 'Evaluation on the synthetic world')."""

    num_clips: int = Field(4, ge=1)
    teacher_steps: int = Field(50, ge=1, description="teacher Euler steps with CFG (50 = 100 NFE)")
    teacher_guidance: float | None = Field(None, ge=1, description="CFG scale of the teacher rows; None = its model card's")
    student_steps: list[int] = Field(default_factory=lambda: [4, 2, 1])


class PipelineConfig(StrictConfig):
    """`python -m ray_jobs.pipeline` config: where it works and the overrides of each stage's job config."""

    workdir: str = Field("outputs/pipeline", description="every stage's output lives under it (local or s3://)")
    report_dir: str = Field("outputs/pipeline/report", description="local folder for report.md/html, plots, videos")
    stages: list[str] = Field(default_factory=lambda: list(STAGES), description="stages to run, in order")
    synthetic: dict[str, Any] = Field(default_factory=dict, description="overrides of configs/tiny/synthetic.yaml")
    preprocess: dict[str, Any] = Field(default_factory=dict)
    teacher: dict[str, Any] = Field(default_factory=dict)
    preferences: dict[str, Any] = Field(default_factory=dict)
    tpo: dict[str, Any] = Field(default_factory=dict)
    distill: dict[str, Any] = Field(default_factory=dict)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    distill_with_tpo: bool = Field(True, description="the distillation teacher includes the TPO adapters")
    serve_request: bool = Field(True, description="start the Serve app on the student and send one request")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def model_post_init(self, _context: Any) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; known: {list(STAGES)}")


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, child, out)
    else:
        out[prefix] = value
    return out


def wiring(cfg: PipelineConfig, storage: Storage) -> dict[str, dict[str, Any]]:
    """The paths that connect stages (applied over each stage's own overrides)."""
    work = lambda *p: storage.join(cfg.workdir, *p)  # noqa: E731
    runs, teacher_export = work("runs"), work("runs", "teacher", "export")
    shared = {"storage": cfg.storage.model_dump(mode="json")}
    return {
        "synthetic": {"out": work("synthetic"), **shared},
        "preprocess": {"input": work("synthetic", "videos"), "output": work("shards"), **shared},
        "teacher": {"data": work("shards"), "run.storage_path": runs, "run.name": "teacher", **shared},
        "preferences": {"data": work("shards"), "output": work("preferences"),
                        "model.pretrained_path": teacher_export, **shared},
        "tpo": {"data": work("preferences"), "model.pretrained_path": teacher_export, "run.storage_path": runs,
                "run.name": "tpo", **shared},
        "distill": {"data": work("shards"), "teacher.path": teacher_export, "run.storage_path": runs,
                    "run.name": "student", **shared,
                    **({"teacher.tpo_path": work("runs", "tpo", "export")} if "tpo" in cfg.stages and cfg.distill_with_tpo
                       else {})},
    }


def build_stage_configs(cfg: PipelineConfig, storage: Storage) -> dict[str, StrictConfig]:
    """Every job config, validated now: example YAML + this config's section + the wiring."""
    configs = {}
    wires = wiring(cfg, storage)
    for stage in cfg.stages:
        if stage not in STAGE_JOBS:
            continue
        job = STAGE_JOBS[stage]
        overrides = {**_flatten("", getattr(cfg, stage), {}), **wires[stage]}
        overrides = {k: v for k, v in overrides.items() if k}
        configs[stage] = load_config(config_class(job), CONFIG_DIR / f"{job}.yaml", overrides)
    return configs


def _summary(result: Any) -> Any:
    """What a stage marker keeps of a stage's result: small JSON-able fields only."""
    if isinstance(result, dict):
        return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool)) or k.endswith("by_dimension")}
    return result


def _marker(cfg: PipelineConfig, storage: Storage, stage: str) -> str:
    return storage.join(cfg.workdir, "_stages", f"{stage}.json")


def _run_stage(cfg: PipelineConfig, storage: Storage, stage: str, fn: Callable[[], Any], log_rows: list) -> Any:
    """Run one stage unless its marker exists; print one progress line with its time."""
    marker = _marker(cfg, storage, stage)
    index = f"[{STAGES.index(stage) + 1}/{len(STAGES)}]"
    if storage.exists(marker):
        print(f"{index} {stage}: done before, skipped", flush=True)
        log_rows.append({"stage": stage, "status": "skipped (done before)", "seconds": 0.0})
        return storage.read_json(marker).get("result")
    print(f"{index} {stage}: running ...", flush=True)
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    storage.write_json(marker, {"stage": stage, "seconds": seconds, "result": result})
    print(f"{index} {stage}: done in {seconds:.1f} s", flush=True)
    log_rows.append({"stage": stage, "status": "ran", "seconds": seconds})
    return result


def _stage_functions(cfg: PipelineConfig, configs: dict[str, StrictConfig], storage: Storage) -> dict[str, Callable]:
    def training_result(run: Callable, job_cfg) -> dict:
        result = run(job_cfg)
        return {"metrics": getattr(result, "metrics", result)}

    return {
        "synthetic": lambda: synthetic_world.run(configs["synthetic"]),
        "preprocess": lambda: preprocess_job.run(configs["preprocess"]),
        "teacher": lambda: training_result(train_teacher.run, configs["teacher"]),
        "preferences": lambda: _summary(preferences.run(configs["preferences"])),
        "tpo": lambda: training_result(train_tpo.run, configs["tpo"]),
        "distill": lambda: training_result(distill_lcm.run, configs["distill"]),
        "evaluate": lambda: pipeline_eval.evaluate_pipeline(cfg, configs, storage),
        "serve": lambda: pipeline_eval.request_served_student(cfg, configs, storage),
    }


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run the configured stages in order; returns {"stages": [...], "report": path}."""
    storage = Storage(cfg.storage)
    configs = build_stage_configs(cfg, storage)
    functions = _stage_functions(cfg, configs, storage)
    rows: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for stage in STAGES:
        if stage in cfg.stages and (stage != "serve" or cfg.serve_request):
            results[stage] = _run_stage(cfg, storage, stage, functions[stage], rows)
    report = pipeline_eval.write_pipeline_report(cfg, configs, storage, rows, results)
    total = time.perf_counter() - started
    print(f"pipeline finished in {total:.1f} s; report: {report}", flush=True)
    return {"stages": rows, "report": str(report), "seconds": total}


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(PipelineConfig, argv, description=__doc__,
                           default_config=str(CONFIG_DIR / "pipeline.yaml"))
    init_ray(cfg.ray)
    run(cfg)


if __name__ == "__main__":
    main()
