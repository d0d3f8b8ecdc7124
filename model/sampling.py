"""One sampling entry point: a `SamplerSpec` (what a model card says about how its model samples) -> samples.

Every consumer (validation, evaluation, preference generation, serving, the benchmarks) runs its
model through `sample(model, x, cond, spec)`; none picks a sampler or restates a default of its own.
The spec is written into each export's model card (`artifacts.card`) by the job that trained it, so
a teacher trained for shift 3 and guidance 1.5, a TPO export with its segment boundary, or a student
with its consistency edges are sampled the way they were trained without any consumer knowing.

Kinds (the three samplers of `model.samplers`):
* ``euler_cfg``: Euler ODE on `inference_sigmas(steps, shift)` with CFG ``guidance`` (1 = no
  unconditional pass); NFE = steps x (2 if guidance != 1 else 1).
* ``tpo``: AlignHuman's segment-routed sampler on ``tpo_plan`` (None = `default_tpo_plan(tpo_boundary)`);
  steps and guidance live in the plan's segments.
* ``consistency``: the DanceLCM student on its segment ``edges`` (None = ``steps`` segments evenly
  spaced after ``shift``); never CFG.

``cfg_drop`` names the conditions the unconditional branch drops (the training recipe's joint CFG
dropout, `Conditions.random_drop_joint`); the reference latent always stays.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from core.config import StrictConfig
from model.conditions import CONDITION_NAMES
from model.flow import inference_sigmas
from model.samplers import (
    ProgressCallback,
    SampleResult,
    SegmentPlan,
    default_tpo_plan,
    sample_consistency,
    sample_euler_cfg,
    sample_segment_routed,
    segment_edges,
    validate_segments,
)

__all__ = ["SamplerSpec", "sample"]

SamplerKind = Literal["euler_cfg", "tpo", "consistency"]
_DEFAULT_STEPS = {"euler_cfg": 50, "consistency": 4}


class SamplerSpec(StrictConfig):
    """How a model is sampled (module doc). Validated per kind: fields a kind would ignore are errors."""

    kind: SamplerKind = Field("euler_cfg", description="euler_cfg (teacher), tpo (two LoRA experts), consistency (student)")
    steps: int | None = Field(None, ge=1, description="euler_cfg: Euler steps (default 50); consistency: segments "
                              "when edges is None (default 4); tpo: unset (the plan holds its steps)")
    guidance: float | None = Field(None, ge=0.0, description="euler_cfg CFG scale (None = 1, no CFG); unset for tpo, "
                                   "None or 1 for consistency")
    shift: float = Field(1.0, gt=0.0, description="flow shift of the sigma table (euler_cfg, tpo, default edges)")
    cfg_drop: list[str] = Field(default_factory=lambda: ["pose", "audio", "face"],
                                description="conditions the unconditional branch drops")
    edges: list[float] | None = Field(None, description="consistency: the student's segment edges 0 = s_0 < ... < s_K = 1")
    tpo_boundary: float = Field(0.875, gt=0.0, lt=1.0, description="tpo: sigma where motion hands over to fidelity")
    tpo_plan: list[SegmentPlan] | None = Field(None, description="tpo: explicit segments (None = default_tpo_plan(tpo_boundary))")

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> "SamplerSpec":
        unknown = set(self.cfg_drop) - set(CONDITION_NAMES)
        if unknown:
            raise ValueError(f"cfg_drop names unknown conditions {sorted(unknown)}; known: {list(CONDITION_NAMES)}")
        if self.kind != "consistency" and self.edges is not None:
            raise ValueError(f"edges belong to the consistency sampler, not {self.kind!r}")
        if self.kind != "tpo" and self.tpo_plan is not None:
            raise ValueError(f"tpo_plan belongs to the tpo sampler, not {self.kind!r}")
        if self.kind == "tpo" and (self.steps is not None or self.guidance is not None):
            raise ValueError("the tpo sampler takes its steps and guidance from its plan, not steps/guidance")
        if self.kind == "tpo" and self.tpo_plan is not None:
            validate_segments(self.tpo_plan)
        if self.kind == "consistency":
            if self.guidance not in (None, 1.0):
                raise ValueError(f"the consistency student never runs CFG; got guidance {self.guidance}")
            if self.edges is not None:
                edges = segment_edges(self.edges)
                if self.steps is not None and self.steps != len(edges) - 1:
                    raise ValueError(f"steps {self.steps} != segments in edges ({len(edges) - 1})")
        return self

    # ------------------------------------------------------------------ resolved values
    def segments(self) -> list[SegmentPlan]:
        """The tpo plan in effect (explicit or the default at ``tpo_boundary``)."""
        return list(self.tpo_plan) if self.tpo_plan is not None else default_tpo_plan(self.tpo_boundary)

    def consistency_edges(self) -> torch.Tensor:
        """The consistency edges in effect, (K+1,) float32."""
        if self.edges is not None:
            return segment_edges(self.edges)
        return segment_edges(self.steps or _DEFAULT_STEPS["consistency"], self.shift)

    @property
    def steps_in_effect(self) -> int:
        """Sampler steps one sample runs: the TPO plan's total, the student's segments, or the Euler steps."""
        if self.kind == "tpo":
            return sum(seg.steps for seg in self.segments())
        if self.kind == "consistency":
            return len(self.consistency_edges()) - 1
        return self.steps or _DEFAULT_STEPS["euler_cfg"]

    @property
    def nfe(self) -> int:
        """Model evaluations one sample costs."""
        if self.kind == "tpo":
            return sum(seg.nfe for seg in self.segments())
        if self.kind == "consistency":
            return len(self.consistency_edges()) - 1
        steps = self.steps or _DEFAULT_STEPS["euler_cfg"]
        return steps * (1 if self.guidance in (None, 1.0) else 2)

    def with_steps(self, steps: int | None) -> "SamplerSpec":
        """This spec with a request's step count (None keeps it); loud where the model fixes its steps."""
        if steps is None:
            return self
        if self.kind == "tpo":
            if steps != self.steps_in_effect:
                raise ValueError(f"a TPO model samples its plan's {self.steps_in_effect} steps, not {steps}")
            return self
        if self.kind == "consistency" and self.edges is not None:
            if steps != len(self.edges) - 1:
                raise ValueError(f"this student was distilled for {len(self.edges) - 1} steps (its edges), not {steps}")
            return self
        return self.model_copy(update={"steps": steps})


    def consistency_at(self, steps: int) -> "SamplerSpec":
        """A student's spec at ``steps`` segments: its own edges when they have that many, else evenly spaced in sigma
        (how a 4-segment student is also run at 2 or 1 steps)."""
        if self.kind != "consistency":
            raise ValueError(f"consistency_at is for students, this spec is {self.kind!r}")
        if self.edges is not None and len(self.edges) - 1 == steps:
            return self
        return self.model_copy(update={"edges": None, "steps": steps, "shift": 1.0})


def sample(model: Any, x: torch.Tensor, cond: Any, spec: SamplerSpec,
           adapter_switch: Callable[[str | None], None] | None = None,
           callback: ProgressCallback | None = None) -> SampleResult:
    """Sample ``model(x, sigma, cond) -> v`` from x (B, C, T, h, w) at sigma 1 as ``spec`` says.

    ``cond``: `model.conditions.Conditions`; the unconditional branch is ``cond.drop(spec.cfg_drop)``.
    ``adapter_switch``: the tpo kind's LoRA switch (see `model.samplers.sample_segment_routed`).
    """
    if spec.kind == "consistency":
        return sample_consistency(model, x, cond, spec.consistency_edges(), callback=callback)
    uncond = cond.drop(set(spec.cfg_drop))
    if spec.kind == "tpo":
        return sample_segment_routed(model, x, cond, uncond, spec.segments(), adapter_switch, spec.shift,
                                     callback=callback)
    steps = spec.steps or _DEFAULT_STEPS["euler_cfg"]
    guidance = 1.0 if spec.guidance is None else spec.guidance
    return sample_euler_cfg(model, x, inference_sigmas(steps, spec.shift), cond, uncond, guidance, callback=callback)
