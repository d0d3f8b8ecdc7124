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
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from model.conditions import CONDITION_NAMES, Conditions
from model.config import StrictConfig
from model.flow import add_noise, sample_training_sigmas
from model.losses import flow_matching_loss
from ray_jobs.common import init_ray, parse_job_config, setup_logging
from ray_jobs.training.config import TrainJobConfig
from ray_jobs.training.loop import run_worker_loop

__all__ = ["TeacherObjective", "TeacherConfig", "TeacherTask", "teacher_loss", "export_denoiser", "run", "main",
           "TRAIN_COLUMNS"]

log = logging.getLogger(__name__)

# Shard columns a training step needs (docs/design.md); strings and pixels stay out of the batches.
TRAIN_COLUMNS = ["latents", "ref_latent", "pose", "audio_feats", "ref_face_latent", "has_audio", "has_ref_face", "motion_mask"]


class TeacherObjective(StrictConfig):
    """Flow-matching objective, condition dropout and EMA of the teacher."""

    timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0, description="σ' = sσ/(1+(s-1)σ); ~3-5 at high resolution, 1 for tiny")
    drop_probs: dict[str, float] = Field(
        default_factory=lambda: {"ref": 0.05, "pose": 0.1, "audio": 0.1, "face": 0.1},
        description="per-condition dropout to the learned null (robustness to a missing condition)",
    )
    cfg_drop: list[str] = Field(default_factory=lambda: ["pose", "audio", "face"],
                                description="conditions CFG's unconditional branch drops together (validation "
                                            "samples with the same set)")
    cfg_drop_prob: float = Field(0.1, ge=0, le=1, description="probability a sample drops all of cfg_drop at once: "
                                 "trains the unconditional branch that CFG uses")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+t)/(10+t)) at step t (diffusers' EMAModel)")

    def model_post_init(self, _context: Any) -> None:
        unknown = (set(self.drop_probs) | set(self.cfg_drop)) - set(CONDITION_NAMES)
        if unknown:
            raise ValueError(f"drop_probs / cfg_drop name unknown conditions {sorted(unknown)}; known: {CONDITION_NAMES}")


class ValidationSection(StrictConfig):
    """The validation sample written at checkpoints: teacher sampler on a held-out clip (unconditional
    branch: `objective.cfg_drop`)."""

    steps: int = Field(20, ge=1)
    guidance: float = Field(1.0, ge=1, description="1 = no CFG (the tiny teacher's measured best; see its card)")


class TeacherConfig(TrainJobConfig):
    """`python -m ray_jobs.train_teacher` config."""

    objective: TeacherObjective = Field(default_factory=TeacherObjective)
    validation: ValidationSection = Field(default_factory=ValidationSection)


class TeacherTask:
    """Flow matching with condition dropout; exports the EMA weights as a diffusers folder."""

    def __init__(self, cfg: TeacherConfig, val_clip: dict[str, np.ndarray] | None):
        self.cfg = cfg
        self.val_clip = val_clip
        self.ema_decay = cfg.objective.ema_decay
        self.ema_warmup = cfg.objective.ema_warmup
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def build_model(self) -> torch.nn.Module:
        from model.presets import build_denoiser

        model = build_denoiser(self.cfg.model)
        model.train()
        return model

    def param_groups(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def on_engine_ready(self, engine: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def micro_step(self, engine: Any, batch: dict[str, torch.Tensor], generator: torch.Generator):
        return teacher_loss(engine, batch, self.cfg.objective, generator, self.device, self.dtype)

    def export(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        export_denoiser(model, weights, out_dir)

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        if self.val_clip is None:
            return {}
        val = self.cfg.validation
        return validation_sample(model, self.cfg.model.vae_path, self.val_clip, out_dir, sampler="euler_cfg",
                                 steps=val.steps, guidance=val.guidance, drop=set(self.cfg.objective.cfg_drop),
                                 shift=self.cfg.objective.shift)


def teacher_loss(model: Any, batch: dict[str, torch.Tensor], obj: TeacherObjective, generator: torch.Generator,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's flow-matching loss with condition dropout (shard columns in, scalar loss out).

    The teacher's whole objective: shared by the Ray Train job and the one-device pretraining
    (`ray_jobs.pretrain_teacher`). Noise and dropout draws come from the CPU ``generator``.
    """
    x0 = batch["latents"].to(device, dtype)
    cond = (Conditions.from_batch(batch, device, dtype).random_drop(obj.drop_probs, generator)
            .random_drop_joint(obj.cfg_drop, obj.cfg_drop_prob, generator))
    sigma = sample_training_sigmas(x0.shape[0], generator, mode=obj.timestep_sampling, shift=obj.shift,
                                   mean=obj.logit_mean, std=obj.logit_std).to(device, dtype)
    noise = torch.randn(x0.shape, generator=generator).to(device, dtype)
    v_pred = model(add_noise(x0, noise, sigma), sigma, cond)
    loss = flow_matching_loss(v_pred.float(), x0.float(), noise.float()).mean()
    return loss, {"sigma_mean": float(sigma.float().mean())}


def export_denoiser(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
    """A fresh CPU copy of ``model``'s class and config with ``weights`` loaded, saved diffusers-style."""
    fresh = type(model).from_config(model.config)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    if unexpected or (trainable & set(missing)):
        raise RuntimeError(f"export weights do not match the model: missing {sorted(set(missing) & trainable)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    fresh.save_pretrained(str(out_dir), safe_serialization=True)


def validation_sample(model: torch.nn.Module, vae_path: str | None, clip: dict[str, np.ndarray], out_dir: Path,
                      sampler: str, steps: int | None, guidance: float | None, drop: set[str], shift: float,
                      **sampler_kwargs: Any) -> dict[str, float]:
    """Generate the clip from its conditions; write sample.mp4 and ground_truth.mp4; metrics vs truth.

    PSNR, SSIM and motion error of the sample, and the same for the copy-the-reference baseline
    (every frame = the reference frame) on the same clip, so a run's metrics show when it beats it.
    """
    from model.generate import generate
    from model.media import mux_mp4
    from model.metrics import motion_error, psnr, ssim
    from model.vae import load_vae

    model.eval()
    try:
        device = next(model.parameters()).device
        batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in clip.items() if isinstance(v, np.ndarray)}
        cond = Conditions.from_batch(batch, device, torch.float32)
        truth = np.asarray(clip["frames"])
        result = generate(model, load_vae(vae_path), cond, cond.drop(drop), num_frames=truth.shape[0],
                          height=truth.shape[1], width=truth.shape[2], sampler=sampler, steps=steps,
                          guidance=guidance, seed=0, shift=shift, **sampler_kwargs)
    finally:
        model.train()
    frames = result.frames.numpy()
    audio = np.asarray(clip["audio"], dtype=np.float32) if bool(clip.get("has_audio", False)) else None
    fps = float(clip.get("fps", 16))
    mux_mp4(frames, audio, fps, out_dir / "sample.mp4")
    mux_mp4(truth, audio, fps, out_dir / "ground_truth.mp4")
    values = {"psnr": psnr(frames, truth), "ssim": ssim(frames, truth), "motion_error": motion_error(frames, truth),
              "nfe": float(result.nfe)}
    if "ref_frame" in clip:
        copied = np.repeat(np.asarray(clip["ref_frame"], dtype=np.uint8)[None], truth.shape[0], axis=0)
        values.update({"copy_ref_psnr": psnr(copied, truth), "copy_ref_ssim": ssim(copied, truth),
                       "copy_ref_motion_error": motion_error(copied, truth)})
    (out_dir / "metrics.json").write_text(json.dumps(values))
    return values


def _train_fn(loop_config: dict) -> None:
    cfg = TeacherConfig.model_validate(loop_config["cfg"])
    run_worker_loop(cfg, TeacherTask(cfg, loop_config.get("val_clip")), columns=TRAIN_COLUMNS)


def run(cfg: TeacherConfig):
    """Train (or resume) the teacher; returns Ray Train's Result."""
    from model.storage import Storage
    from ray_jobs.training.driver import fit, read_shards, take_clip

    storage = Storage(cfg.storage)
    train_ds = read_shards(cfg.data, storage, split="train", columns=TRAIN_COLUMNS)
    val_clip = take_clip(cfg.data, storage, split="heldout")
    val_clip = {k: v for k, v in val_clip.items() if isinstance(v, (np.ndarray, float, int, bool, np.generic))}
    return fit(cfg, _train_fn, {"cfg": cfg.model_dump(mode="json"), "val_clip": val_clip}, {"train": train_ds})


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(TeacherConfig, argv, description=__doc__,
                           default_config=str(Path(__file__).parent / "configs/tiny/train_teacher.yaml"))
    init_ray(cfg.ray)
    result = run(cfg)
    print(json.dumps({"run": cfg.run.name, "metrics": result.metrics,
                      "checkpoint": str(result.checkpoint.path if result.checkpoint else None)}, default=str))


if __name__ == "__main__":
    main()
