"""Segmented consistency distillation (DanceLCM) of the teacher into a 1-4 step student without CFG.

    python -m ray_jobs.distill_lcm --config ray_jobs/configs/tiny/distill_lcm.yaml [--set k=v ...]

Objective (/work/shared/PAPERS.md, DanceLCM; PCM phased form), per training clip:
1. pick a segment k of the K segments [s_k, s_{k+1}] and σ_m inside it on a fine solver grid, σ_n the
   next grid point below (edges merged into the grid, so σ_n >= s_k) — `model.losses.sample_consistency_pair`;
2. x_m = (1 - σ_m) x0 + σ_m ε from the shard's real latents;
3. ONE teacher Euler step with CFG (w ~ U[w_min, w_max] per clip) x_m -> x̂_n (frozen, no grad);
   TPO adapters, when configured, are routed per σ like the TPO sampler;
4. student: f_θ(x_m, σ_m) = x_m + (s_k - σ_m) v_θ; target (EMA of the student): f_θ⁻(x̂_n, σ_n);
   L_CD = pseudo-Huber(f_θ, f_θ⁻) (c configurable), per element up-weighted on the motion mask;
5. aux head: x̂0_aux from the student's features vs the real latents, L_aux (weight λ), same weighting.
Every component has a switch in `objective` (aux, motion_loss, face, teacher_cfg, segments).

Two formulations (``student.mode``):
* ``lora`` (the one for real scale): ONE base network, the frozen teacher. The student is a LoRA
  adapter ("student") on it, the EMA target θ⁻ a second adapter ("target") holding the EMA of the
  student's adapter, and the teacher is the base with adapters off (or the TPO experts, loaded as
  adapters of the same base and routed per σ). A worker holds one base model plus adapters, not three
  models; ZeRO-3 works (the target EMA lerps each rank's own partitions, shapes being equal).
* ``full``: the student is a full copy of the teacher, the target a frozen full copy of the student
  on every worker, the teacher a third model. The target is lerped from the live student after each
  optimizer step, which needs the full student parameters on each rank: ZeRO 0-2 only (ZeRO-3 would
  gather every parameter every step), rejected loudly.
Either way the target is EMA-updated lazily, at the start of the next micro-step (detected by
`engine.global_steps`), and is part of each rank's checkpoint (the task's `state_dict`, saved by the
shared loop as task_rank{r}.pt), so a resume continues the same EMA.

Export (`artifacts.exports.export_student`): full student -> a diffusers folder; LoRA student -> the
peft adapter (`adapter/`) over the teacher; both with the model card (`student_card`: consistency
sampling on the segment edges), which `artifacts.exports.load_export` reads.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from artifacts.card import DataCard, ModelCard, check_data_matches_model
from artifacts.exports import STUDENT_ADAPTER, export_student
from core.storage import Storage
from model.conditions import CONDITION_NAMES, Conditions
from model.sampling import SamplerSpec
from core.config import StrictConfig
from model.flow import add_noise, cfg_velocity, euler_step
from model.motion_frames import draw_prefix, training_prefix_frames
from model.losses import consistency_distillation_loss, fine_solver_grid, motion_weight_map, pseudo_huber, sample_consistency_pair
from model.presets import ModelConfig
from model.samplers import SegmentPlan, segment_edges
from ray_jobs.common import init_ray, parse_job_config, setup_logging
from ray_jobs.training.teacher_objective import TRAIN_COLUMNS
from ray_jobs.training.validation import validation_sample
from ray_jobs.training.config import TrainJobConfig
from ray_jobs.training.loop import run_worker_loop

__all__ = ["DistillObjective", "StudentSection", "TeacherSource", "DistillConfig", "DistillTask",
           "teacher_jump", "distill_losses", "update_target", "update_target_adapter", "with_adapter", "TARGET_ADAPTER",
           "check_shared_base", "student_card", "run", "main"]

log = logging.getLogger(__name__)

class DistillObjective(StrictConfig):
    """DanceLCM objective; every component is a switch so an ablation is one `--set` away."""

    segments: int = Field(4, ge=1, description="K segments = inference steps; 1 = plain (VideoLCM) CD")
    edges: list[float] | None = Field(None, description="explicit edges 0 = s_0 < ... < s_K = 1 (overrides segments)")
    edge_shift: float | None = Field(None, gt=0, description="shift the evenly spaced edges (None = even in σ)")
    solver_points: int = Field(50, ge=2, le=1000, description="fine teacher grid points over [0, 1] (LCM: 50-100)")
    solver_shift: float = Field(1.0, gt=0, description="timestep shift of the fine grid")
    teacher_cfg: bool = Field(True, description="CFG in the teacher step (guidance distilled in); False = conditional only")
    w_min: float = Field(1.5, ge=1.0, description="CFG scale drawn per clip from U[w_min, w_max]")
    w_max: float = Field(3.0, ge=1.0)
    drop_for_uncond: list[str] | None = Field(None, description="conditions set to their nulls in the teacher's "
                                              "unconditional branch; None = the teacher card's cfg_drop")
    huber_c: float = Field(1e-3, gt=0, description="pseudo-Huber c (per element, LCM code)")
    target_ema_decay: float = Field(0.95, ge=0, lt=1, description="target network θ⁻ ← d θ⁻ + (1-d) θ")
    aux: bool = Field(True, description="aux head on the student predicting clean latents (L_aux)")
    aux_weight: float = Field(0.5, ge=0, description="λ of L_aux")
    motion_loss: bool = Field(True, description="up-weight the loss on the shard's motion_mask")
    motion_weight: float = Field(2.0, ge=1.0, description="weight on motion pixels (1 elsewhere)")
    face: bool = Field(True, description="face-latent cross-attention in the student (model.face_injection)")
    export_ema_decay: float | None = Field(None, ge=0, lt=1, description="loop EMA for the export; None = live student")
    motion_prefix_prob: float = Field(0.0, ge=0, le=1, description="share of clips distilled as continuations: their "
                                      "first model.motion_frames latent frames given clean to teacher, target and "
                                      "student (pinned there, so no loss on them); needs a teacher with motion_frames")
    motion_prefix_noise: float = Field(0.0, ge=0, description="std of Gaussian noise on the given prefix latents")

    @model_validator(mode="after")
    def _check(self) -> "DistillObjective":
        if self.w_min > self.w_max:
            raise ValueError(f"w_min {self.w_min} > w_max {self.w_max}")
        unknown = set(self.drop_for_uncond or ()) - set(CONDITION_NAMES)
        if unknown:
            raise ValueError(f"drop_for_uncond has unknown conditions {sorted(unknown)}")
        if self.edges is not None and len(self.edges) != self.segments + 1:
            raise ValueError(f"edges {self.edges} give {len(self.edges) - 1} segments, segments = {self.segments}")
        if self.edges is not None and self.edge_shift is not None:
            raise ValueError("give either edges or edge_shift, not both")
        self.edge_tensor()  # validates the edges
        return self

    def edge_tensor(self) -> torch.Tensor:
        """Segment edges (K+1,) ascending from 0 to 1."""
        return segment_edges(self.edges) if self.edges is not None else segment_edges(self.segments, self.edge_shift)


class StudentSection(StrictConfig):
    """The student: a full copy of the teacher, or LoRA adapters on it."""

    mode: Literal["full", "lora"] = "full"
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float | None = Field(None, gt=0)
    lora_targets: Literal["attn", "attn+ffn"] = "attn+ffn"


class TeacherSource(StrictConfig):
    """The frozen teacher: the teacher run's export, optionally with the TPO run's experts routed per σ.

    Both are export folders whose model cards say the rest (the teacher's architecture and CFG
    conditions; the TPO experts' names and σ segments), so nothing of them is restated here."""

    path: str = Field("outputs/runs/teacher/export", description="teacher export folder (local or s3://)")
    tpo_path: str | None = Field(None, description="TPO export folder (local or s3://) whose experts the teacher uses, "
                                              "routed on the segments of its card; None = the plain teacher")


class DistillValidation(StrictConfig):
    enabled: bool = True


class DistillConfig(TrainJobConfig):
    """`python -m ray_jobs.distill_lcm` config. ``model`` is the student: its ``aux_head`` and
    ``face_injection`` follow ``objective.aux`` / ``objective.face`` (setting them otherwise is an error);
    ``model.pretrained_path`` None means "start from the teacher"."""

    objective: DistillObjective = Field(default_factory=DistillObjective)
    student: StudentSection = Field(default_factory=StudentSection)
    teacher: TeacherSource = Field(default_factory=TeacherSource)
    validation: DistillValidation = Field(default_factory=DistillValidation)

    @model_validator(mode="before")
    @classmethod
    def _switches_into_model(cls, data: Any) -> Any:
        """Copy objective.aux/face into model.aux_head/face_injection; a contradicting explicit value is an error."""
        if not isinstance(data, dict):
            return data
        objective, model = (_as_dict(data.get(key)) for key in ("objective", "model"))
        for field, switch in (("aux_head", "aux"), ("face_injection", "face")):
            wanted = objective.get(switch, DistillObjective.model_fields[switch].default)
            if field in model and model[field] != wanted:
                raise ValueError(f"model.{field}={model[field]} contradicts objective.{switch}={wanted}; "
                                 f"set objective.{switch} only")
            model[field] = wanted
        return {**data, "model": model}

    @model_validator(mode="after")
    def _check(self) -> "DistillConfig":
        if self.deepspeed.zero_stage == 3 and self.student.mode == "full":
            raise ValueError("a full-copy student supports ZeRO <= 2: its EMA target network needs the full student "
                             "on every rank each step (see ray_jobs.distill_lcm docstring); use student.mode=lora "
                             "(one shared base, ZeRO-3 allowed) or zero_stage 1 or 2")
        return self

    def student_model_config(self) -> ModelConfig:
        """The student's ModelConfig: switches from the objective, weights from the teacher unless given."""
        path = self.model.pretrained_path or self.teacher.path
        return self.model.model_copy(update={"pretrained_path": path})


def _as_dict(section: Any) -> dict[str, Any]:
    """A config section given as a dict, a config object (its set fields) or None, as a new dict."""
    if section is None:
        return {}
    if isinstance(section, StrictConfig):
        return section.model_dump(exclude_unset=True)
    return dict(section)


# ---------------------------------------------------------------------- pure pieces
def teacher_jump(teacher: Any, x_m: torch.Tensor, sigma_m: torch.Tensor, sigma_n: torch.Tensor, cond: Conditions,
                 uncond: Conditions | None, guidance: torch.Tensor | None) -> torch.Tensor:
    """One teacher Euler step x̂_n = x_m + (σ_n - σ_m) v_cfg (DanceLCM); x (B, C, T, h, w), σ and w (B,); no CFG if w is None."""
    v = teacher(x_m, sigma_m, cond)
    if guidance is not None:
        v = cfg_velocity(v, teacher(x_m, sigma_m, uncond), guidance)
    return euler_step(x_m, sigma_m, sigma_n, v)


def routed_teacher(teacher: torch.nn.Module, plan: list[SegmentPlan]) -> Any:
    """Model fn applying, per sample, the TPO adapter of the plan segment holding its σ (segment-routed like the TPO sampler).

    Each adapter present in the batch runs on the whole batch and its samples are selected with
    torch.where: simpler than splitting `Conditions`, at most len(plan) evaluations per call.
    """
    from model.denoiser import use_adapter

    def model_fn(x: torch.Tensor, sigma: torch.Tensor, cond: Conditions) -> torch.Tensor:
        names = [_adapter_at(plan, float(s)) for s in sigma.tolist()]
        out = torch.zeros_like(x)
        for name in dict.fromkeys(names):
            use_adapter(teacher, name)
            chosen = torch.tensor([n == name for n in names], device=x.device).view(-1, 1, 1, 1, 1)
            out = torch.where(chosen, teacher(x, sigma, cond), out)
        return out

    return model_fn


def _adapter_at(plan: list[SegmentPlan], sigma: float) -> str | None:
    """The adapter of the plan segment sigma_low < σ <= sigma_high (an edge belongs to the segment below, as in the sampler)."""
    for seg in plan:
        if seg.sigma_low < sigma <= seg.sigma_high or (seg.sigma_low == 0.0 and sigma == 0.0):
            return seg.adapter
    raise ValueError(f"σ {sigma} is in no TPO plan segment")


def distill_losses(student: Any, target: Any, teacher: Any, x0: torch.Tensor, cond: Conditions,
                   uncond: Conditions | None, edges: torch.Tensor, grid: torch.Tensor, obj: DistillObjective,
                   generator: torch.Generator, motion_mask: torch.Tensor | None = None,
                   prefix_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss L_CD + λ L_aux (scalar) and its terms; x0 (B, C, T, h, w) real latents, mask (B, T, h, w).

    With a motion prefix in ``cond`` the student, target and teacher all pin those frames to it, so L_CD is
    zero there by construction; ``prefix_weight`` (B, 1, T, 1, 1), 0 on the prefix, keeps L_aux off them too."""
    batch, device = x0.shape[0], x0.device
    pair = sample_consistency_pair(edges, grid, batch, generator)
    sigma_m, sigma_n, edge = (t.to(device, x0.dtype) for t in (pair.sigma_m, pair.sigma_n, pair.sigma_edge))
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    x_m = add_noise(x0, noise, sigma_m)
    guidance = None
    if obj.teacher_cfg:
        guidance = (obj.w_min + (obj.w_max - obj.w_min) * torch.rand(batch, generator=generator)).to(device, x0.dtype)
    with torch.no_grad():
        x_hat_n = teacher_jump(teacher, x_m, sigma_m, sigma_n, cond, uncond, guidance)
        v_target = target(x_hat_n, sigma_n, cond)
    mask = motion_mask if obj.motion_loss else None
    out = student(x_m, sigma_m, cond, return_aux=True) if obj.aux else student(x_m, sigma_m, cond)
    v_student, x0_aux = out if obj.aux else (out, None)
    loss_cd = consistency_distillation_loss(x_m, sigma_m, v_student.float(), x_hat_n.float(), sigma_n, v_target.float(),
                                            edge, obj.huber_c, mask, obj.motion_weight).mean()
    terms = {"loss_cd": float(loss_cd.detach()), "sigma_m": float(sigma_m.float().mean()),
             "teacher_w": float(guidance.float().mean()) if guidance is not None else 1.0}
    total = loss_cd
    if obj.aux:
        weight = None if mask is None else motion_weight_map(mask, obj.motion_weight, x0)
        if prefix_weight is not None:
            weight = prefix_weight if weight is None else weight * prefix_weight
        loss_aux = pseudo_huber(x0_aux.float(), x0.float(), obj.huber_c, weight).mean()
        total = total + obj.aux_weight * loss_aux
        terms["loss_aux"] = float(loss_aux.detach())
    if mask is not None:
        terms["motion_fraction"] = float(mask.float().mean())
    return total, terms


@torch.no_grad()
def update_target(target: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← d θ⁻ + (1 - d) θ over the student's trainable parameters (frozen ones never differ)."""
    own = dict(target.named_parameters())
    for name, param in student.named_parameters():
        if param.requires_grad:
            own[name].lerp_(param.detach().to(own[name].dtype), 1.0 - decay)


TARGET_ADAPTER = "target"  # the EMA target θ⁻ of a LoRA student: a second adapter on the shared base


def with_adapter(module: torch.nn.Module, name: str | None, call: Any = None) -> Any:
    """A model fn that activates adapter ``name`` of ``module`` (None = base only) then runs ``call``
    (default the module itself; e.g. the DeepSpeed engine wrapping it, for the trained pass)."""
    from model.denoiser import use_adapter

    run = call if call is not None else module

    def model_fn(*args: Any, **kwargs: Any) -> Any:
        use_adapter(module, name)
        return run(*args, **kwargs)

    return model_fn


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its ZeRO-3 partition when partitioned, else the whole tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


def adapter_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(target, student) parameter pairs of the two LoRA adapters, matched by name."""
    params = dict(model.named_parameters())
    student, target = f".{STUDENT_ADAPTER}.", f".{TARGET_ADAPTER}."
    pairs = [(params[n.replace(student, target)], p) for n, p in params.items() if "lora_" in n and student in n]
    if not pairs:
        raise RuntimeError("the model has no student LoRA adapter")
    return pairs


@torch.no_grad()
def update_target_adapter(model: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← d θ⁻ + (1 - d) θ over the student adapter, into the target adapter (per rank partition under ZeRO-3)."""
    for target, student in adapter_pairs(model):
        _local(target).lerp_(_local(student).to(_local(target).dtype), 1.0 - decay)


# ---------------------------------------------------------------------- the task
class DistillTask:
    """DanceLCM on the shared loop: the student is the engine; teacher (+TPO experts) and EMA target are
    adapters of its base (``student.mode=lora``) or separate full copies (``full``)."""

    def __init__(self, cfg: DistillConfig, val_clip: dict[str, np.ndarray] | None, teacher_card: ModelCard,
                 data: DataCard):
        self.cfg = cfg
        self.val_clip = val_clip
        self.card = student_card(cfg, data)
        self.uncond_drop = set(cfg.objective.drop_for_uncond if cfg.objective.drop_for_uncond is not None
                               else teacher_card.sampler.cfg_drop)
        self.ema_decay = cfg.objective.export_ema_decay
        self.edges = cfg.objective.edge_tensor()
        self.grid = fine_solver_grid(cfg.objective.solver_points, cfg.objective.solver_shift)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.teacher_fn: Any = None
        self.target_fn: Any = None
        self.student_fn: Any = None
        self.target: torch.nn.Module | None = None  # full student only: the target copy
        self.tpo_plan: list[SegmentPlan] | None = None  # shared base with TPO experts: their σ plan
        self.engine: Any = None
        self._synced_step = 0
        self.motion_frames = 0  # prefix length drawn in training (set from the built model)

    @property
    def shared_base(self) -> bool:
        """LoRA student: teacher, student and target are one base network with adapters (module docstring)."""
        return self.cfg.student.mode == "lora"

    def build_model(self) -> torch.nn.Module:
        """The student network: the teacher's weights; with a LoRA student, also the teacher (base, TPO
        experts as adapters) and the target (an adapter initialised equal to the student's)."""
        from artifacts.models import load_denoiser
        from model.denoiser import lora_config, use_adapter

        model = load_denoiser(self.cfg.student_model_config(), Storage(self.cfg.storage))
        if self.shared_base:
            st = self.cfg.student
            model.requires_grad_(False)
            self._load_tpo_experts(model)
            for name in (TARGET_ADAPTER, STUDENT_ADAPTER):
                model.add_adapter(lora_config(st.lora_rank, st.lora_alpha, st.lora_targets), name)
            with torch.no_grad():
                for target, student in adapter_pairs(model):
                    _local(target).copy_(_local(student))
            use_adapter(model, STUDENT_ADAPTER)
            for name, param in model.named_parameters():  # the aux head is new: it trains in full
                param.requires_grad_(f".{STUDENT_ADAPTER}." in name or name.startswith("aux_"))
        model.train()
        return model

    def _load_tpo_experts(self, model: torch.nn.Module) -> None:
        """With ``teacher.tpo_path``: its experts as adapters of the shared base, their σ plan kept for routing."""
        from artifacts.exports import load_tpo_adapters, read_export_card
        from artifacts.models import local_folder

        source, storage = self.cfg.teacher, Storage(self.cfg.storage)
        if source.tpo_path is None:
            return
        card = read_export_card(source.tpo_path, storage)
        with local_folder(source.tpo_path, storage) as folder:
            load_tpo_adapters(model, folder, tuple(card.adapters))
        self.tpo_plan = card.sampler.segments()

    def param_groups(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def on_engine_ready(self, engine: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype, self.engine = device, dtype, engine
        self._synced_step = int(getattr(engine, "global_steps", 0))
        self.motion_frames = training_prefix_frames(engine, self.cfg.objective.motion_prefix_prob,
                                                    "objective.motion_prefix_prob")
        if self.shared_base:
            model = engine.module
            self.teacher_fn = (routed_teacher(model, self.tpo_plan) if self.tpo_plan is not None
                               else with_adapter(model, None))
            self.target_fn = with_adapter(model, TARGET_ADAPTER)
            self.student_fn = with_adapter(model, STUDENT_ADAPTER, engine)  # last: active in backward recompute
            return
        self.teacher_fn = self._build_teacher()
        group = getattr(engine.module, "sequence_parallel_group", None)
        if group is not None:  # the teacher splits its tokens like the student (the target is a copy: it does too)
            self.teacher.enable_sequence_parallel(group)
        self.target = copy.deepcopy(engine.module).requires_grad_(False).eval()
        self.target_fn, self.student_fn = self.target, engine

    def _build_teacher(self) -> Any:
        """Full student: the teacher as its export's card builds it; with a TPO export, its experts routed on the card's segments."""
        from artifacts.exports import load_export

        source = self.cfg.teacher
        loaded = load_export(source.tpo_path or source.path, Storage(self.cfg.storage), self.device,
                             base_model=source.path if source.tpo_path else None)
        self.teacher = loaded.model.to(self.dtype).requires_grad_(False).eval()
        if loaded.card.kind == "tpo":
            return routed_teacher(self.teacher, loaded.sampler.segments())
        return self.teacher

    def _target_tensors(self, engine: Any) -> dict[str, torch.Tensor]:
        """The target's state: the target adapter's local tensors (shared base) or the full target copy."""
        if not self.shared_base:
            return self.target.state_dict()
        names = {id(p): n for n, p in engine.module.named_parameters()}
        return {names[id(target)]: _local(target) for target, _ in adapter_pairs(engine.module)}

    def state_dict(self) -> dict[str, Any]:
        """The EMA target and the step it was synced at: restored on resume by the shared loop."""
        return {"target": {n: t.detach().clone() for n, t in self._target_tensors(self.engine).items()},
                "synced_step": self._synced_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = self._target_tensors(self.engine)
        if set(own) != set(state["target"]):
            raise ValueError("the checkpoint's distillation target does not match this student (mode/adapter changed?)")
        with torch.no_grad():
            for name, tensor in state["target"].items():
                own[name].copy_(tensor)
        self._synced_step = int(state["synced_step"])

    def sync_target(self, engine: Any) -> None:
        """EMA-update the target once per optimizer step DeepSpeed took since the last sync."""
        step = int(getattr(engine, "global_steps", self._synced_step))
        student = getattr(engine, "module", engine)
        decay = self.cfg.objective.target_ema_decay
        for _ in range(step - self._synced_step):
            if self.shared_base:
                update_target_adapter(student, decay)
            else:
                update_target(self.target, student, decay)
        self._synced_step = step

    def micro_step(self, engine: Any, batch: dict[str, torch.Tensor], generator: torch.Generator):
        self.sync_target(engine)
        obj = self.cfg.objective
        x0 = batch["latents"].to(self.device, self.dtype)
        cond = Conditions.from_batch(batch, self.device, self.dtype)
        cond, prefix_weight = draw_prefix(cond, x0, self.motion_frames, obj.motion_prefix_prob, obj.motion_prefix_noise,
                                          generator)
        uncond = cond.drop(self.uncond_drop) if obj.teacher_cfg else None
        mask = batch["motion_mask"].to(self.device) if "motion_mask" in batch else None
        if obj.motion_loss and mask is None:
            raise KeyError("objective.motion_loss needs the shard's motion_mask column")
        return distill_losses(self.student_fn, self.target_fn, self.teacher_fn, x0, cond, uncond, self.edges,
                              self.grid, obj, generator, mask, prefix_weight)

    def export(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        export_student(model, weights, out_dir, self.card)

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        if self.val_clip is None or not self.cfg.validation.enabled:
            return {}
        return validation_sample(model, self.cfg.model.vae_path, Storage(self.cfg.storage), self.val_clip, out_dir,
                                 self.card.sampler)


def check_tpo_matches_teacher(tpo: ModelCard, source: TeacherSource) -> None:
    """A TPO export's experts only fit the teacher they were trained on: refuse another one at start."""
    if tpo.kind != "tpo":
        raise ValueError(f"teacher.tpo_path={source.tpo_path} is a {tpo.kind} export, not a TPO one")
    if tpo.base_model is not None and tpo.base_model.rstrip("/") != source.path.rstrip("/"):
        raise ValueError(f"teacher.tpo_path={source.tpo_path} was trained on {tpo.base_model}, not on teacher.path={source.path}")


def check_shared_base(cfg: DistillConfig, teacher: ModelCard) -> None:
    """A LoRA student shares the teacher's network: it cannot drop a path the teacher has (the teacher's
    pass would lose it too). New paths are fine: they start as zero-init no-ops and stay frozen."""
    if cfg.student.mode == "lora" and teacher.model.face_injection and not cfg.objective.face:
        raise ValueError("student.mode=lora shares the teacher's network, which has face injection: "
                         "objective.face=false would remove it from the teacher too; use student.mode=full")


def student_card(cfg: DistillConfig, data: DataCard) -> ModelCard:
    """The student export's card: consistency sampling on its segment edges, no CFG; the aux head is
    a training device, so the served model is built without it."""
    model = cfg.model.model_copy(update={"pretrained_path": None, "aux_head": False})
    return ModelCard(kind="student", format=cfg.student.mode,
                     base_model=cfg.teacher.path if cfg.student.mode == "lora" else None, model=model,
                     frames=data.frames, sampler=SamplerSpec(kind="consistency", edges=cfg.objective.edge_tensor().tolist()))


# ---------------------------------------------------------------------- driver
def _train_fn(loop_config: dict) -> None:
    cfg = DistillConfig.model_validate(loop_config["cfg"])
    task = DistillTask(cfg, loop_config.get("val_clip"), ModelCard.model_validate(loop_config["teacher_card"]),
                       DataCard.model_validate(loop_config["data_card"]))
    run_worker_loop(cfg, task, columns=TRAIN_COLUMNS)


def run(cfg: DistillConfig):
    """Distil (or resume) the student; returns its `ExportedRun` (export folder + model card, metrics).

    Shards made with another VAE or audio geometry than the student fail here, before any worker starts.
    """
    from artifacts.exports import read_export_card
    from artifacts.shards import data_card, read_shards, take_clip
    from ray_jobs.training.driver import fit

    storage = Storage(cfg.storage)
    if not storage.exists(storage.join(cfg.teacher.path, "config.json")):
        raise FileNotFoundError(f"no teacher export at {cfg.teacher.path} (run ray_jobs.train_teacher first)")
    teacher = read_export_card(cfg.teacher.path, storage)
    check_shared_base(cfg, teacher)
    if cfg.teacher.tpo_path is not None:
        check_tpo_matches_teacher(read_export_card(cfg.teacher.tpo_path, storage), cfg.teacher)
    data = data_card(cfg.data, storage)
    check_data_matches_model(data, cfg.model, "distill_lcm")
    train_ds = read_shards(cfg.data, storage, split="train", columns=TRAIN_COLUMNS)
    val_clip = None
    if cfg.validation.enabled:
        val_clip = take_clip(cfg.data, storage, split="heldout")
        val_clip = {k: v for k, v in val_clip.items() if isinstance(v, (np.ndarray, float, int, bool, np.generic))}
    return fit(cfg, _train_fn, {"cfg": cfg.model_dump(mode="json"), "val_clip": val_clip,
                                "teacher_card": teacher.model_dump(mode="json"), "data_card": data.model_dump(mode="json")},
               {"train": train_ds})


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(DistillConfig, argv, description=__doc__,
                           default_config=str(Path(__file__).parent / "configs/tiny/distill_lcm.yaml"))
    init_ray(cfg.ray)
    result = run(cfg)
    print(json.dumps({"run": cfg.run.name, "export": result.export, "metrics": result.metrics,
                      "checkpoint": result.checkpoint}, default=str))


if __name__ == "__main__":
    main()
