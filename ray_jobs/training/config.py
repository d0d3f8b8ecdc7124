"""Config sections shared by the three training jobs (teacher, TPO, distillation)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import StrictConfig
from model.precision import Precision
from model.presets import ModelConfig
from core.storage import StorageConfig
from ray_jobs.common import RayConfig, WorkerScaling

__all__ = ["DeepSpeedSection", "OptimSection", "CheckpointSection", "RunSection", "TrainJobConfig"]


_PATH_FIELDS = ("data", "path", "pretrained_path", "vae_path", "storage_path", "output")


def _absolute(value: str) -> str:
    import os

    return value if "://" in value or os.path.isabs(value) else os.path.abspath(value)


def _absolutize(section: StrictConfig) -> None:
    """Make every local path-valued field (and dict of paths, e.g. adapters) absolute, recursively."""
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, StrictConfig):
            _absolutize(value)
        elif isinstance(value, str) and value and (name in _PATH_FIELDS or name.endswith("_path")):
            object.__setattr__(section, name, _absolute(value))
        elif isinstance(value, dict) and name.endswith(("adapters", "_paths")):
            object.__setattr__(section, name, {k: _absolute(v) if isinstance(v, str) else v for k, v in value.items()})


class DeepSpeedSection(StrictConfig):
    """DeepSpeed settings; the JSON config is generated from these (see `deepspeed_config`)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage; 2 by default, 1 and 3 selectable")
    precision: Precision = Field("auto", description="auto = bf16 on GPU, fp32 on CPU (model.precision)")
    gradient_accumulation_steps: int = Field(1, ge=1)
    gradient_clipping: float = Field(1.0, ge=0)
    raw_override: dict[str, Any] = Field(
        default_factory=dict,
        description="escape hatch: deep-merged over the generated DeepSpeed JSON (e.g. "
        "{'zero_optimization': {'offload_optimizer': {'device': 'cpu'}}})",
    )


class OptimSection(StrictConfig):
    """AdamW with linear warmup, then constant or a cosine decay to ``min_lr_ratio`` x lr at the last step."""

    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = Field("constant", description="after warmup: constant, or cosine to the job's last step")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final lr / lr")


class CheckpointSection(StrictConfig):
    """When checkpoints and validation samples are written."""

    every_n_steps: int = Field(50, ge=1, description="DeepSpeed state + exported model every N steps (and at the end)")
    num_to_keep: int | None = Field(2, ge=1, description="Ray Train keeps this many latest checkpoints")
    validate_every_n_steps: int | None = Field(None, ge=1, description="validation sample MP4 + PSNR/SSIM; None = only at the end")
    export_precision: Precision = Field("auto", description="dtype of the exported weights (safetensors shards "
                                        "written by rank 0 to {run}/export): auto = the run's precision")


class RunSection(StrictConfig):
    """Where a run lives: `{storage_path}/{name}`. Re-running with the same name resumes it."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.\-]+$")
    storage_path: str = Field("outputs/runs", description="local folder or s3:// prefix")
    max_failures: int = Field(1, ge=-1, description="worker failures Ray Train recovers from (FailureConfig)")
    seed: int = 0
    fail_at_step: int | None = Field(
        None, ge=1, description="testing aid: worker rank 1 (or 0 if alone) raises once at this step"
    )
    report_every_n_steps: int = Field(10, ge=1, description="metrics to Ray Train (a barrier) and metrics.jsonl "
                                      "to storage every N steps; every step is still logged")
    tensorboard: bool = False
    cache_epochs_mb: float = Field(256, ge=0, description="a worker whose dataset rows fit in this many MB "
                                   "replays epochs 2+ from memory, reshuffled (0 = stream every epoch)")


class TrainJobConfig(StrictConfig):
    """Fields every training job has; each job subclasses it and adds its objective section."""

    data: str = Field("outputs/shards", description="preprocessed shards (folder or s3:// prefix)")
    steps: int = Field(100, ge=1, description="optimizer steps in total (resume continues to this)")
    batch_size: int = Field(2, ge=1, description="clips per worker per micro-step")
    model: ModelConfig = Field(default_factory=ModelConfig)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    run: RunSection = Field(default_factory=RunSection)
    scaling: WorkerScaling = Field(default_factory=WorkerScaling)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _absolute_local_paths(self) -> "TrainJobConfig":
        """Local paths become absolute here, on the driver: Ray Train workers may run elsewhere (cwd)."""
        _absolutize(self)
        return self

    @model_validator(mode="after")
    def _check_failure_step(self) -> "TrainJobConfig":
        if self.run.fail_at_step is not None and self.run.fail_at_step > self.steps:
            raise ValueError(f"run.fail_at_step ({self.run.fail_at_step}) is beyond steps ({self.steps})")
        return self
