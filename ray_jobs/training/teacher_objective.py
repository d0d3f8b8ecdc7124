"""The teacher's objective, shared by the Ray Train job (`ray_jobs.train_teacher`) and the one-device
pretraining (`ray_jobs.pretrain_teacher`), and the shard columns a training step reads.

Rectified-flow matching as Wan trains it (x_σ = (1-σ) x0 + σ ε, target v = ε - x0), σ drawn
logit-normal (or uniform) and shifted; every condition dropped independently to its learned null
with its configured probability (robustness), and the conditions CFG drops dropped *together* with
`cfg_drop_prob` (so the unconditional branch CFG uses is trained).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from core.config import StrictConfig
from model.conditions import CONDITION_NAMES, Conditions
from model.flow import add_noise, sample_training_sigmas
from model.losses import flow_matching_loss
from model.motion_frames import draw_prefix, training_prefix_frames
from model.pose import POSE_RENDER_COLUMNS

__all__ = ["TRAIN_COLUMNS", "TeacherObjective", "teacher_loss"]

# Shard columns a training step needs (docs/design.md); strings and pixels stay out of the batches.
# "pose" with the render columns: shards with pose maps give "pose", shards written with store_pixels:
# false give keypoints and the canvas instead, drawn into maps on the worker (`artifacts.shards.read_columns`).
TRAIN_COLUMNS = ["latents", "ref_latent", "pose", *POSE_RENDER_COLUMNS, "audio_feats", "ref_face_latent", "has_audio",
                 "has_ref_face", "motion_mask"]



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
    motion_prefix_prob: float = Field(0.0, ge=0, le=1, description="share of samples trained as continuations: "
                                      "their first model.motion_frames latent frames given clean as the prefix, no "
                                      "loss on them (model.motion_frames); needs model.motion_frames > 0")
    motion_prefix_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on the given prefix latents "
                                       "(against error accumulation over chunks)")
    ema_decay: float = Field(0.999, ge=0, lt=1)
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1+t)/(10+t)) at step t (diffusers' EMAModel)")

    def model_post_init(self, _context: Any) -> None:
        unknown = (set(self.drop_probs) | set(self.cfg_drop)) - set(CONDITION_NAMES)
        if unknown:
            raise ValueError(f"drop_probs / cfg_drop name unknown conditions {sorted(unknown)}; known: {CONDITION_NAMES}")


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
    frames = training_prefix_frames(model, obj.motion_prefix_prob, "objective.motion_prefix_prob")
    cond, weight = draw_prefix(cond, x0, frames, obj.motion_prefix_prob, obj.motion_prefix_noise, generator)
    v_pred = model(add_noise(x0, noise, sigma), sigma, cond)
    loss = flow_matching_loss(v_pred.float(), x0.float(), noise.float(), weight).mean()
    return loss, {"sigma_mean": float(sigma.float().mean())}
