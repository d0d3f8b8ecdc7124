"""Teacher training: the conditioned video diffusion transformer, on Ray Train + DeepSpeed.

    python -m ray_jobs.train_teacher --config ray_jobs/configs/tiny/train_teacher.yaml [--set k=v ...]

Objective: rectified-flow matching as Wan trains it (x_σ = (1-σ) x0 + σ ε, target v = ε - x0), σ drawn
logit-normal (or uniform) and shifted; every condition dropped independently to its learned null
with its configured probability (robustness), and the conditions CFG drops dropped *together* with
`cfg_drop_prob` (so the unconditional branch CFG uses is trained). An EMA of the weights, with
diffusers' warm-up schedule, is kept (see
`ray_jobs.training.ema` for how under ZeRO) and exported as a diffusers folder at every checkpoint:
`{run.storage_path}/{run.name}/export/` is what TPO, distillation and serving load.
Re-running the same command with the same `run.name` resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from artifacts.card import DataCard, ModelCard, check_data_matches_model
from artifacts.exports import export_denoiser
from core.config import StrictConfig
from core.storage import Storage
from model.sampling import SamplerSpec
from ray_jobs.common import init_ray, parse_job_config, setup_logging
from ray_jobs.training.config import TrainJobConfig
from ray_jobs.training.loop import run_worker_loop
from ray_jobs.training.teacher_objective import TRAIN_COLUMNS, TeacherObjective, teacher_loss
from ray_jobs.training.validation import validation_sample

__all__ = ["TeacherConfig", "TeacherTask", "teacher_card", "run", "main"]

log = logging.getLogger(__name__)


class ValidationSection(StrictConfig):
    """The validation sample written at checkpoints: the teacher's card sampler on a held-out clip, with
    `steps` instead of the card's (unconditional branch: `objective.cfg_drop`)."""

    steps: int = Field(20, ge=1)
    guidance: float = Field(1.5, ge=1, description="the teacher's CFG scale, used here and written to its model card "
                            "(1 = no CFG)")


class TeacherConfig(TrainJobConfig):
    """`python -m ray_jobs.train_teacher` config."""

    objective: TeacherObjective = Field(default_factory=TeacherObjective)
    validation: ValidationSection = Field(default_factory=ValidationSection)


def teacher_card(cfg: TeacherConfig, data: DataCard) -> ModelCard:
    """The teacher export's card: its model config, the data's frame geometry, Euler/CFG as validated."""
    sampler = SamplerSpec(kind="euler_cfg", guidance=cfg.validation.guidance, shift=cfg.objective.shift,
                          cfg_drop=list(cfg.objective.cfg_drop))
    return ModelCard(kind="teacher", model=cfg.model.model_copy(update={"pretrained_path": None}),
                     frames=data.frames, sampler=sampler)


class TeacherTask:
    """Flow matching with condition dropout; exports the EMA weights as a diffusers folder with its card."""

    def __init__(self, cfg: TeacherConfig, val_clip: dict[str, np.ndarray] | None, data: DataCard):
        self.cfg = cfg
        self.val_clip = val_clip
        self.card = teacher_card(cfg, data)
        self.ema_decay = cfg.objective.ema_decay
        self.ema_warmup = cfg.objective.ema_warmup
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def build_model(self) -> torch.nn.Module:
        from artifacts.models import load_denoiser

        model = load_denoiser(self.cfg.model, Storage(self.cfg.storage))
        model.train()
        return model

    def param_groups(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def on_engine_ready(self, engine: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def micro_step(self, engine: Any, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return teacher_loss(engine, batch, self.cfg.objective, generator, self.device, self.dtype)

    def export(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        export_denoiser(model, weights, out_dir, self.card)

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        if self.val_clip is None:
            return {}
        return validation_sample(model, self.cfg.model.vae_path, Storage(self.cfg.storage), self.val_clip, out_dir,
                                 self.card.sampler.with_steps(self.cfg.validation.steps))


def _train_fn(loop_config: dict) -> None:
    cfg = TeacherConfig.model_validate(loop_config["cfg"])
    task = TeacherTask(cfg, loop_config.get("val_clip"), DataCard.model_validate(loop_config["data_card"]))
    run_worker_loop(cfg, task, columns=TRAIN_COLUMNS)


def run(cfg: TeacherConfig):
    """Train (or resume) the teacher; returns its `ExportedRun` (export folder + model card, metrics).

    Shards made with another VAE or audio geometry than ``cfg.model`` fail here, before any worker starts.
    """
    from artifacts.shards import data_card, read_shards, take_clip
    from ray_jobs.training.driver import fit

    storage = Storage(cfg.storage)
    data = data_card(cfg.data, storage)
    check_data_matches_model(data, cfg.model, "train_teacher")
    train_ds = read_shards(cfg.data, storage, split="train", columns=TRAIN_COLUMNS)
    val_clip = take_clip(cfg.data, storage, split="heldout")
    val_clip = {k: v for k, v in val_clip.items() if isinstance(v, (np.ndarray, float, int, bool, np.generic))}
    return fit(cfg, _train_fn, {"cfg": cfg.model_dump(mode="json"), "val_clip": val_clip,
                                "data_card": data.model_dump(mode="json")}, {"train": train_ds})


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(TeacherConfig, argv, description=__doc__,
                           default_config=str(Path(__file__).parent / "configs/tiny/train_teacher.yaml"))
    init_ray(cfg.ray)
    result = run(cfg)
    print(json.dumps({"run": cfg.run.name, "export": result.export, "metrics": result.metrics,
                      "checkpoint": result.checkpoint}, default=str))


if __name__ == "__main__":
    main()
