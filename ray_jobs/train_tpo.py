"""LoRA-TPO (AlignHuman): two timestep-segment LoRA experts trained with Diffusion-DPO on Ray Train + DeepSpeed.

    python -m ray_jobs.train_tpo --config ray_jobs/configs/tiny/train_tpo.yaml [--set k=v ...]

The teacher export (``model.pretrained_path``) is frozen; peft adapters ``motion`` and ``fidelity`` are
added on its attention projections (``tpo.lora_targets: attn+ffn`` adds the FFN). Every micro-step
mixes both experts: the batch's motion pairs train the motion adapter at σ ~ U[σ_b, 1], its fidelity
pairs train the fidelity adapter at σ ~ U[0, σ_b). Per pair, winner and loser share one σ and one ε
(Diffusion-DPO, `model.losses.diffusion_dpo_loss`); the reference is the same network with adapters
disabled, under no_grad. σ_b defaults to 0.875, the boundary of `model.samplers.default_tpo_plan`
(Wan 2.2's expert boundary): the sampler evaluates σ_b itself with the fidelity adapter, matching the
half-open [0, σ_b) of the fidelity segment. Exports ``{export}/motion`` and ``{export}/fidelity`` as
diffusers LoRA folders (`save_lora_adapter`), optionally ``fused_motion/`` and ``fused_fidelity/``
(the teacher with one adapter merged: Wan 2.2's high-noise / low-noise expert layout), and the model
card (`tpo_card`: the teacher's sampler settings routed at σ_b) that `artifacts.exports.load_export` reads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from artifacts.card import ModelCard
from artifacts.exports import TPO_ADAPTERS, export_adapters
from core.storage import Storage
from model.conditions import Conditions
from model.samplers import default_tpo_plan
from model.sampling import SamplerSpec
from core.config import StrictConfig
from model.flow import add_noise
from model.losses import diffusion_dpo_loss, flow_matching_loss
from model.motion_frames import draw_prefix, training_prefix_frames
from ray_jobs.common import init_ray, parse_job_config, setup_logging
from ray_jobs.training.config import TrainJobConfig
from ray_jobs.training.loop import run_worker_loop

__all__ = ["TPOObjective", "TPOConfig", "TPOTask", "ADAPTERS", "TRAIN_COLUMNS", "segment_sigmas", "add_tpo_adapters",
           "draw_pair_prefix", "adapter_params", "tpo_card", "run", "main"]

log = logging.getLogger(__name__)

ADAPTERS: tuple[str, ...] = TPO_ADAPTERS
TRAIN_COLUMNS = ["ref_latent", "pose", "audio_feats", "ref_face_latent", "has_audio", "has_ref_face",
                 "winner_latents", "loser_latents", "is_motion"]


class TPOObjective(StrictConfig):
    """Diffusion-DPO per timestep segment, LoRA shape and export."""

    beta: float = Field(500.0, gt=0, description="DPO β on per-sample mean squared errors (papers: 2500-5000 for SD)")
    sigma_boundary: float = Field(0.875, gt=0, lt=1, description="σ_b: motion on [σ_b, 1], fidelity on [0, σ_b)")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0, description="None = rank (scale 1)")
    lora_targets: Literal["attn", "attn+ffn"] = "attn"
    schedule: Literal["mix"] = Field("mix", description="each micro-step trains both adapters on their own pairs")
    fused_export: bool = Field(False, description="also export the teacher with each adapter merged (diffusers folders)")
    motion_prefix_prob: float = Field(0.0, ge=0, le=1, description="share of pairs trained as continuations: the "
                                      "winner's first model.motion_frames latent frames given to both as the prefix "
                                      "(no loss on them); needs a teacher with motion_frames > 0")
    motion_prefix_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on the given prefix latents")

    @model_validator(mode="after")
    def _check(self) -> "TPOObjective":
        if self.sigma_boundary <= 0.0 or self.sigma_boundary >= 1.0:
            raise ValueError("sigma_boundary must be inside (0, 1)")
        return self


class TPOConfig(TrainJobConfig):
    """`python -m ray_jobs.train_tpo` config: ``data`` is the pairs folder of make_preferences."""

    tpo: TPOObjective = Field(default_factory=TPOObjective)

    @model_validator(mode="after")
    def _needs_teacher(self) -> "TPOConfig":
        if self.model.pretrained_path is None:
            raise ValueError("model.pretrained_path must name the teacher export (TPO fine-tunes a trained model)")
        return self


def segment_sigmas(n: int, adapter: str, boundary: float, generator: torch.Generator) -> torch.Tensor:
    """AlignHuman segment σ (n,): motion ~ U[σ_b, 1], fidelity ~ U[0, σ_b) (u in [0, 1) keeps the ends half-open)."""
    u = torch.rand(n, generator=generator)
    if adapter == "motion":
        return 1.0 - (1.0 - boundary) * u  # (σ_b, 1]; σ_b itself is the fidelity sampler's point
    if adapter == "fidelity":
        return boundary * u
    raise ValueError(f"adapter must be one of {ADAPTERS}, got {adapter!r}")


def add_tpo_adapters(model: torch.nn.Module, objective: TPOObjective) -> None:
    """Freeze ``model`` and add the two peft LoRA adapters; every LoRA weight trains."""
    from model.denoiser import lora_config

    model.requires_grad_(False)
    for name in ADAPTERS:
        model.add_adapter(lora_config(objective.lora_rank, objective.lora_alpha, objective.lora_targets), name)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)


def adapter_params(model: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA weights of one adapter (peft names them ``...lora_A.<adapter>.weight``)."""
    params = [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n]
    if not params:
        raise KeyError(f"model has no LoRA weights for adapter {adapter!r}")
    return params


def dpo_errors(model: torch.nn.Module, x0_w: torch.Tensor, x0_l: torch.Tensor, sigma: torch.Tensor,
               noise: torch.Tensor, cond: Conditions, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample flow-matching errors (B,) of winner and loser under one shared σ (B,) and ε (B, C, T, h, w);
    ``weight`` (B, 1, T, 1, 1) or None, the same for both (0 on a given motion prefix)."""
    x = torch.cat([add_noise(x0_w, noise, sigma), add_noise(x0_l, noise, sigma)])
    v = model(x, torch.cat([sigma, sigma]), Conditions.cat([cond, cond]))
    weights = None if weight is None else torch.cat([weight, weight])
    errors = flow_matching_loss(v.float(), torch.cat([x0_w, x0_l]).float(), torch.cat([noise, noise]).float(), weights)
    return errors.chunk(2)


def draw_pair_prefix(model: torch.nn.Module, cond: Conditions, x0_w: torch.Tensor, tpo: TPOObjective,
                     generator: torch.Generator) -> tuple[Conditions, torch.Tensor | None]:
    """Continuation pairs: with probability ``tpo.motion_prefix_prob`` both clips of a pair get the winner's first
    motion_frames latent frames as the prefix ("given the same past, which continuation is better"); the
    prefix frames are pinned in policy and reference alike, so they carry no preference signal (weight 0)."""
    frames = training_prefix_frames(model, tpo.motion_prefix_prob, "tpo.motion_prefix_prob")
    return draw_prefix(cond, x0_w, frames, tpo.motion_prefix_prob, tpo.motion_prefix_noise, generator)


class TPOTask:
    """The `TrainTask` of LoRA-TPO (see module docstring)."""

    ema_decay = None  # DPO on LoRA: the live weights are exported

    def __init__(self, cfg: TPOConfig, teacher_card: ModelCard):
        self.cfg = cfg
        self.card = tpo_card(cfg, teacher_card)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def build_model(self) -> torch.nn.Module:
        from artifacts.models import load_denoiser

        model = load_denoiser(self.cfg.model, Storage(self.cfg.storage))
        add_tpo_adapters(model, self.cfg.tpo)
        model.train()
        return model

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        """One optimizer group per adapter, built explicitly: `set_adapter` flips requires_grad, groups do not."""
        return [{"params": adapter_params(model, name), "name": name} for name in ADAPTERS]

    def on_engine_ready(self, engine: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def micro_step(self, engine: Any, batch: dict[str, torch.Tensor], generator: torch.Generator):
        is_motion = batch["is_motion"].reshape(-1).bool()
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {}
        for adapter, rows in (("motion", is_motion), ("fidelity", ~is_motion)):
            if bool(rows.any()):
                loss, adapter_metrics = self.adapter_loss(engine, batch, rows, adapter, generator)
                total = total + loss * rows.sum() / rows.numel()
                metrics.update(adapter_metrics)
            else:
                total = total + _zero_touch(getattr(engine, "module", engine), adapter)
        return total, metrics

    def adapter_loss(self, model: Any, batch: dict[str, torch.Tensor], rows: torch.Tensor, adapter: str,
                     generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Diffusion-DPO of ``adapter`` on the selected pairs, σ from its segment; mean loss and its metrics."""
        from model.denoiser import use_adapter

        sub = {k: v[rows] for k, v in batch.items()}
        x0_w, x0_l = (sub[k].to(self.device, self.dtype) for k in ("winner_latents", "loser_latents"))
        cond = Conditions.from_batch(sub, self.device, self.dtype)
        sigma = segment_sigmas(x0_w.shape[0], adapter, self.cfg.tpo.sigma_boundary, generator).to(self.device, self.dtype)
        noise = torch.randn(x0_w.shape, generator=generator).to(self.device, self.dtype)
        module = getattr(model, "module", model)
        cond, weight = draw_pair_prefix(module, cond, x0_w, self.cfg.tpo, generator)
        with torch.no_grad():
            use_adapter(module, None)
            ref_w, ref_l = dpo_errors(model, x0_w, x0_l, sigma, noise, cond, weight)
        use_adapter(module, adapter)
        err_w, err_l = dpo_errors(model, x0_w, x0_l, sigma, noise, cond, weight)
        out = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, self.cfg.tpo.beta)
        return out.loss.mean(), {
            f"dpo_loss_{adapter}": float(out.loss.detach().mean()),
            f"implicit_acc_{adapter}": float(out.implicit_acc.mean()),
            f"reward_margin_{adapter}": float(out.reward_margin.mean()),
            f"sigma_min_{adapter}": float(sigma.min()), f"sigma_max_{adapter}": float(sigma.max()),
            f"pairs_{adapter}": float(x0_w.shape[0]),
        }

    def export(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        export_adapters(model, weights, out_dir, self.card, fused=self.cfg.tpo.fused_export)

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        return {}  # the benchmark (benchmarks/tpo.py) evaluates the routed sampler end to end


def tpo_card(cfg: TPOConfig, teacher: ModelCard) -> ModelCard:
    """The TPO export's card: the teacher's model, frames and sampler settings, routed at ``tpo.sigma_boundary``.

    Both segments keep the teacher's CFG scale, shift and dropped conditions (`default_tpo_plan`'s
    30-NFE split of steps).
    """
    guidance = teacher.sampler.guidance if teacher.sampler.guidance is not None else 1.0
    plan = default_tpo_plan(cfg.tpo.sigma_boundary, motion_guidance=guidance, fidelity_guidance=guidance)
    sampler = SamplerSpec(kind="tpo", shift=teacher.sampler.shift, cfg_drop=list(teacher.sampler.cfg_drop),
                          tpo_boundary=cfg.tpo.sigma_boundary, tpo_plan=plan)
    return ModelCard(kind="tpo", format="lora", base_model=cfg.model.pretrained_path, model=teacher.model,
                     frames=teacher.frames, sampler=sampler, adapters=list(ADAPTERS))


def _zero_touch(model: torch.nn.Module, adapter: str) -> torch.Tensor:
    """0 x the sum of ``adapter``'s trainable weights: a zero gradient for every one of them.

    A rank whose batch holds no pairs of one dimension must still produce gradients for that
    adapter: DeepSpeed reduces gradients per parameter bucket across ranks, and a rank that skips
    some parameters posts different collectives than its peers (gloo aborts, NCCL hangs).
    """
    weights = [p for name, p in model.named_parameters() if p.requires_grad and f".{adapter}." in name]
    if not weights:
        raise RuntimeError(f"adapter {adapter!r} has no trainable weights")
    return torch.stack([p.sum() for p in weights]).sum() * 0.0


def _with_dimension_flag(batch: dict) -> dict:
    """Ray Data batch: the string column `dimension` -> bool `is_motion` (tensors only reach the workers)."""
    import numpy as np

    batch["is_motion"] = np.asarray(batch.pop("dimension")) == "motion"
    return batch


def _train_fn(loop_config: dict) -> None:
    cfg = TPOConfig.model_validate(loop_config["cfg"])
    task = TPOTask(cfg, ModelCard.model_validate(loop_config["teacher_card"]))
    run_worker_loop(cfg, task, columns=TRAIN_COLUMNS)


def run(cfg: TPOConfig):
    """Train (or resume) both TPO adapters on the pairs folder ``cfg.data``; returns its `ExportedRun`."""
    from artifacts.exports import read_export_card
    from artifacts.pairs import read_pairs
    from ray_jobs.training.driver import fit

    storage = Storage(cfg.storage)
    teacher = read_export_card(cfg.model.pretrained_path, storage)
    columns = [c for c in TRAIN_COLUMNS if c != "is_motion"] + ["dimension"]
    pairs = read_pairs(cfg.data, storage, columns=columns).map_batches(_with_dimension_flag)
    return fit(cfg, _train_fn, {"cfg": cfg.model_dump(mode="json"), "teacher_card": teacher.model_dump(mode="json")},
               {"train": pairs})


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(TPOConfig, argv, description=__doc__,
                           default_config=str(Path(__file__).parent / "configs/tiny/train_tpo.yaml"))
    init_ray(cfg.ray)
    result = run(cfg)
    print(json.dumps({"run": cfg.run.name, "export": result.export, "metrics": result.metrics}, default=str))


if __name__ == "__main__":
    main()
