"""Stateless flow-matching samplers (k-diffusion style: model, x, sigmas in; x and the exact NFE out).

A model function is ``model_fn(x (B, C, T, h, w), sigma (B,), cond) -> v (B, C, T, h, w)`` (the model
call of docs/design.md). Conditions are opaque here (a `model.conditions.Conditions` or anything the
model accepts); samplers only pass them through. NFE counts network evaluations: one call of
``model_fn`` on the batch is one NFE, so a guided step is 2 NFE (conditional + unconditional).
We call the two branches separately instead of concatenating them into one batch because the
conditions are opaque here; the NFE count is the same either way.

Three samplers:
1. `sample_euler_cfg`: Euler ODE with classifier-free guidance (the teacher). We do not drive
   diffusers' `FlowMatchEulerDiscreteScheduler.step` because it keeps a step index in the scheduler
   object (not stateless) and works on one shared timestep; the update is the same x + (s' - s) v.
2. `sample_segment_routed`: TPO (AlignHuman): contiguous sigma segments, each with its own step
   budget, CFG scale and LoRA adapter (the adapter is switched on entering the segment).
3. `sample_consistency`: the DanceLCM/PCM multi-segment student: one NFE per segment, each step
   jumps from the segment's upper edge to its lower edge with f = x + (s_k - sigma) v; no CFG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Protocol, Sequence

import torch
from pydantic import Field, model_validator

from core.config import StrictConfig
from model.flow import cfg_velocity, euler_step, inference_sigmas, noise_from_velocity, shift_sigmas, x0_from_velocity

__all__ = [
    "ModelFn",
    "SampleResult",
    "SamplerProgress",
    "SegmentPlan",
    "default_tpo_plan",
    "validate_segments",
    "sample_euler_cfg",
    "sample_segment_routed",
    "sample_consistency",
    "segment_edges",
    "segment_index",
    "consistency_target_edge",
]


class ModelFn(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class SampleResult:
    """Final latents x (B, C, T, h, w) and the exact number of model evaluations spent."""

    x: torch.Tensor
    nfe: int


@dataclass(frozen=True)
class SamplerProgress:
    """Reported to a callback after each step: ``step`` of ``total_steps`` done (1-based), NFE so far."""

    step: int
    total_steps: int
    sigma: float
    sigma_next: float
    nfe: int
    segment: str | None = None


ProgressCallback = Callable[[SamplerProgress], None]


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """The (B,) float32 sigma tensor the model call expects."""
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def _check_sigma_table(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with >= 2 entries, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or sigmas.min() < 0 or sigmas.max() > 1:
        raise ValueError(f"sigmas must be strictly decreasing within [0, 1], got {sigmas.tolist()}")


def _guided_velocity(
    model_fn: ModelFn, x: torch.Tensor, sigma: float, cond: Any, uncond: Any, guidance: float
) -> tuple[torch.Tensor, int]:
    """CFG velocity v_u + w (v_c - v_u) and the NFE it cost (1 when w == 1: v_u cancels exactly)."""
    sigma_b = _sigma_batch(sigma, x)
    v_cond = model_fn(x, sigma_b, cond)
    if guidance == 1.0:
        return v_cond, 1
    if uncond is None:
        raise ValueError(f"guidance {guidance} != 1 needs unconditional conditions (uncond is None)")
    return cfg_velocity(v_cond, model_fn(x, sigma_b, uncond), guidance), 2


def _euler_loop(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    uncond: Any,
    guidance: float,
    report: Callable[[int, float, float, int], None],
) -> SampleResult:
    """Guided Euler through one descending sigma table; ``report(step, sigma, sigma_next, nfe)`` after each step."""
    _check_sigma_table(sigmas)
    table = sigmas.tolist()
    nfe = 0
    for i, (sigma, sigma_next) in enumerate(zip(table[:-1], table[1:])):
        v, cost = _guided_velocity(model_fn, x, sigma, cond, uncond, guidance)
        nfe += cost
        x = euler_step(x, sigma, sigma_next, v)
        report(i + 1, sigma, sigma_next, nfe)
    return SampleResult(x=x, nfe=nfe)


def sample_euler_cfg(
    model_fn: ModelFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Any,
    uncond: Any,
    guidance: float,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
) -> SampleResult:
    """Euler ODE sampler with CFG over ``sigmas`` (N+1,) descending; x (B, C, T, h, w) at sigmas[0].

    Costs 2 NFE per step, or 1 when ``guidance == 1`` (50 CFG steps = 100 NFE). ``generator`` is
    unused (the ODE is deterministic); it is accepted so every sampler shares the k-diffusion signature.
    """
    del generator
    total = sigmas.shape[0] - 1

    def report(step: int, sigma: float, sigma_next: float, nfe: int) -> None:
        if callback is not None:
            callback(SamplerProgress(step, total, sigma, sigma_next, nfe))

    return _euler_loop(model_fn, x, sigmas, cond, uncond, guidance, report)


class SegmentPlan(StrictConfig):
    """One TPO sampling segment: sigma in [sigma_low, sigma_high], its step budget, CFG scale and LoRA adapter."""

    name: str = Field(min_length=1, description="segment name, reported in progress (e.g. 'motion')")
    sigma_high: float = Field(gt=0.0, le=1.0, description="upper sigma edge (the segment starts here)")
    sigma_low: float = Field(ge=0.0, lt=1.0, description="lower sigma edge (the segment ends here)")
    steps: int = Field(ge=1, description="Euler steps inside the segment")
    guidance: float = Field(ge=0.0, description="CFG scale; 1 disables CFG (1 NFE per step instead of 2)")
    adapter: str | None = Field(default=None, description="LoRA adapter active in the segment; None = base model")

    @model_validator(mode="after")
    def _ordered(self) -> "SegmentPlan":
        if not self.sigma_low < self.sigma_high:
            raise ValueError(f"segment {self.name!r}: sigma_low {self.sigma_low} must be < sigma_high {self.sigma_high}")
        return self

    @property
    def nfe(self) -> int:
        """Model evaluations this segment costs."""
        return self.steps * (1 if self.guidance == 1.0 else 2)


def default_tpo_plan(
    boundary: float = 0.875,
    motion_steps: int = 5,
    fidelity_steps: int = 10,
    motion_guidance: float = 1.5,
    fidelity_guidance: float = 1.5,
    motion_adapter: str | None = "motion",
    fidelity_adapter: str | None = "fidelity",
) -> list[SegmentPlan]:
    """AlignHuman's two-segment TPO plan: motion adapter on [boundary, 1], fidelity adapter on [0, boundary).

    Defaults spend 30 NFE: 5 guided steps in the motion segment (10 NFE) and 10 guided steps in the
    fidelity segment (20 NFE). Why: the paper finds motion is settled in the high-noise interval and
    tolerates coarse stepping, while the low-noise interval (87.5% of the sigma range here) shapes
    structure and detail, so it gets twice the steps. CFG is kept in both segments because both are
    conditional (pose/audio drive motion, the reference image drives fidelity); the paper's exact
    split is not public, so every field is configurable and the split is to be swept. The boundary
    0.875 is diffusers' Wan 2.2 T2V expert boundary (PAPERS.md suggests 0.8-0.9 for sweeps); with a
    shift of 3, a uniform 15-step table also puts about 5 steps above it. Guidance 1.5 is the tiny
    teacher's measured best (model/assets/tiny_teacher/FIT_REPORT.json: 1.0 / 1.5 / 2.0); Wan uses ~5.
    """
    return [
        SegmentPlan(
            name="motion", sigma_high=1.0, sigma_low=boundary, steps=motion_steps,
            guidance=motion_guidance, adapter=motion_adapter,
        ),
        SegmentPlan(
            name="fidelity", sigma_high=boundary, sigma_low=0.0, steps=fidelity_steps,
            guidance=fidelity_guidance, adapter=fidelity_adapter,
        ),
    ]


def validate_segments(segments: Sequence[SegmentPlan]) -> None:
    """Raise unless the segments tile [0, 1] from the top: first starts at 1, each ends where the next starts, last ends at 0."""
    if not segments:
        raise ValueError("segment plan is empty")
    if segments[0].sigma_high != 1.0:
        raise ValueError(f"first segment {segments[0].name!r} must start at sigma 1.0, starts at {segments[0].sigma_high}")
    for upper, lower in zip(segments[:-1], segments[1:]):
        if upper.sigma_low != lower.sigma_high:
            raise ValueError(
                f"segments {upper.name!r} and {lower.name!r} are not contiguous: "
                f"{upper.name!r} ends at {upper.sigma_low}, {lower.name!r} starts at {lower.sigma_high}"
            )
    if segments[-1].sigma_low != 0.0:
        raise ValueError(f"last segment {segments[-1].name!r} must end at sigma 0.0, ends at {segments[-1].sigma_low}")


def _report_in_segment(
    callback: ProgressCallback | None, segment: str, steps_before: int, total: int, nfe_before: int,
    step: int, sigma: float, sigma_next: float, segment_nfe: int,
) -> None:
    """Progress of a step inside one segment, counted over the whole plan."""
    if callback is not None:
        callback(SamplerProgress(steps_before + step, total, sigma, sigma_next, nfe_before + segment_nfe, segment))


def sample_segment_routed(
    model_fn: ModelFn,
    x: torch.Tensor,
    cond: Any,
    uncond: Any,
    segments: Sequence[SegmentPlan],
    adapter_switch: Callable[[str | None], None] | None,
    shift: float = 1.0,
    callback: ProgressCallback | None = None,
) -> SampleResult:
    """TPO segment-routed Euler/CFG sampler (AlignHuman); x (B, C, T, h, w) pure noise at sigma 1.

    Each segment gets its own table `inference_sigmas(steps, shift, sigma_low, sigma_high)`;
    ``adapter_switch(segment.adapter)`` is called on entering each segment (callers wrap the
    peft/diffusers `set_adapters`/`disable_adapters` calls) and the last adapter stays active on return.
    A segment evaluates the model at its upper edge and inside it, never at its lower edge, so a
    boundary sigma_b is evaluated once, with the lower segment's adapter (its first Euler point).
    """
    validate_segments(segments)
    if adapter_switch is None and any(seg.adapter is not None for seg in segments):
        raise ValueError("segments name adapters but adapter_switch is None")
    total = sum(seg.steps for seg in segments)
    done_steps, nfe = 0, 0
    for seg in segments:
        if adapter_switch is not None:
            adapter_switch(seg.adapter)
        sigmas = inference_sigmas(seg.steps, shift, low=seg.sigma_low, high=seg.sigma_high)
        report = partial(_report_in_segment, callback, seg.name, done_steps, total, nfe)
        result = _euler_loop(model_fn, x, sigmas, cond, uncond, seg.guidance, report)
        x, nfe, done_steps = result.x, nfe + result.nfe, done_steps + seg.steps
    return SampleResult(x=x, nfe=nfe)


def segment_edges(segments: int | Sequence[float], shift: float | None = None) -> torch.Tensor:
    """Consistency segment edges (K+1,) float32 ascending, 0 = s_0 < ... < s_K = 1 (DanceLCM/PCM phases).

    An int K gives K segments evenly spaced in unshifted time, then shifted by ``shift`` (None or 1 =
    evenly spaced in sigma, as PCM's default phases); an explicit list is validated and used as is.
    """
    if isinstance(segments, int):
        if segments < 1:
            raise ValueError(f"need at least 1 segment, got {segments}")
        edges = torch.linspace(0.0, 1.0, segments + 1, dtype=torch.float64)
        if shift is not None:
            edges = shift_sigmas(edges, shift)
        edges = edges.to(torch.float32)
        edges[0], edges[-1] = 0.0, 1.0
        return edges
    if shift is not None:
        raise ValueError("pass either an explicit edge list or a shift, not both")
    edges = torch.as_tensor(list(segments), dtype=torch.float32)
    if edges.ndim != 1 or edges.shape[0] < 2:
        raise ValueError(f"edges must be a list of >= 2 values, got {list(segments)}")
    if edges[0] != 0.0 or edges[-1] != 1.0 or not bool((edges[1:] > edges[:-1]).all()):
        raise ValueError(f"edges must be strictly increasing from 0.0 to 1.0, got {edges.tolist()}")
    return edges


def segment_index(sigma: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Segment k (B,) int64 of each sigma (B,): s_k < sigma <= s_{k+1}, so an upper edge belongs to the segment below it."""
    edges = edges.to(device=sigma.device, dtype=sigma.dtype)
    if bool((sigma <= 0).any()) or bool((sigma > 1).any()):
        raise ValueError(f"sigma must lie in (0, 1] to have a segment, got {sigma.tolist()}")
    return torch.searchsorted(edges, sigma, right=False) - 1


def consistency_target_edge(sigma: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Lower edge s_k (B,) of each sigma's segment: where the phased consistency function maps x_sigma."""
    edges = edges.to(device=sigma.device, dtype=sigma.dtype)
    return edges[segment_index(sigma, edges)]


def sample_consistency(
    model_fn: ModelFn,
    x: torch.Tensor,
    cond: Any,
    edges: torch.Tensor,
    renoise: float = 0.0,
    generator: torch.Generator | None = None,
    callback: ProgressCallback | None = None,
) -> SampleResult:
    """Multi-segment consistency student (DanceLCM, PCM phased form): K = len(edges) - 1 NFE, no CFG.

    From sigma = s_K = 1 each step jumps to the lower edge: f = x + (s_{k-1} - s_k) v_theta(x, s_k).
    ``renoise`` = gamma in [0, 1] is the optional stochastic variant (off by default): at each inner
    edge the predicted noise eps_hat = x + (1 - s) v is mixed with fresh noise,
    sqrt(1 - gamma) eps_hat + sqrt(gamma) z, and x is rebuilt from x0_hat at the edge (gamma = 1 is
    LCM's multistep re-noising; gamma = 0 equals the deterministic jump exactly).
    """
    if not 0.0 <= renoise <= 1.0:
        raise ValueError(f"renoise must be in [0, 1], got {renoise}")
    if renoise > 0 and generator is None:
        raise ValueError("renoise > 0 draws fresh noise and needs an explicit generator")
    table = segment_edges(edges.tolist()).flip(0).tolist()  # validated, descending 1 -> 0
    total = len(table) - 1
    for i, (sigma, edge) in enumerate(zip(table[:-1], table[1:])):
        v = model_fn(x, _sigma_batch(sigma, x), cond)
        if renoise > 0 and edge > 0:
            x = _renoised_jump(x, sigma, edge, v, renoise, generator)
        else:
            x = euler_step(x, sigma, edge, v)
        if callback is not None:
            callback(SamplerProgress(i + 1, total, sigma, edge, i + 1))
    return SampleResult(x=x, nfe=total)


def _renoised_jump(
    x: torch.Tensor, sigma: float, edge: float, v: torch.Tensor, gamma: float, generator: torch.Generator
) -> torch.Tensor:
    """Jump to ``edge`` with a fraction gamma of the predicted noise replaced by fresh noise (PCM stochastic sampling)."""
    x0_hat = x0_from_velocity(x, sigma, v)
    eps_hat = noise_from_velocity(x, sigma, v)
    fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    eps = math.sqrt(1.0 - gamma) * eps_hat + math.sqrt(gamma) * fresh
    return (1.0 - edge) * x0_hat + edge * eps
