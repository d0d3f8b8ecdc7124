"""End-to-end generation: seeded noise -> one of the three samplers -> VAE decode -> uint8 frames, with NFE and wall time.

`generate` is what the benchmarks and the Serve app call. The wall time covers sampling and VAE
decode (the end-to-end figure the evaluation reports). Noise is drawn on the CPU from
``torch.Generator().manual_seed(seed)`` and then moved, so a seed gives the same noise on any device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch

from model.samplers import (
    ProgressCallback,
    SegmentPlan,
    default_tpo_plan,
    sample_consistency,
    sample_euler_cfg,
    sample_segment_routed,
    segment_edges,
)
from model.flow import inference_sigmas
from model.vae import video_to_uint8

__all__ = ["GenerateResult", "generate", "latent_shape"]

SamplerName = Literal["euler_cfg", "tpo", "consistency"]


@dataclass(frozen=True)
class GenerateResult:
    """Decoded frames uint8 (T, H, W, 3) on the CPU, model evaluations spent, seconds end to end (decode included)."""

    frames: torch.Tensor
    nfe: int
    seconds: float


def latent_shape(vae: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """Latent shape (1, C, t, h, w) for a clip of T x H x W pixels: t = 1 + (T - 1) / temporal_factor (Wan's causal frame)."""
    temporal, spatial = int(vae.temporal_factor), int(vae.spatial_factor)
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames {num_frames} must be 1 + k * temporal_factor ({temporal})")
    if height % spatial or width % spatial:
        raise ValueError(f"frame size {height}x{width} must be a multiple of the spatial factor {spatial}")
    return (1, int(vae.latent_channels), 1 + (num_frames - 1) // temporal, height // spatial, width // spatial)


def _run_sampler(
    model: Any,
    x: torch.Tensor,
    cond: Any,
    uncond: Any,
    sampler: SamplerName,
    steps: int | None,
    guidance: float | None,
    shift: float,
    tpo_plan: Sequence[SegmentPlan] | None,
    adapter_switch: Callable[[str | None], None] | None,
    consistency_edges: Sequence[float] | None,
    callback: ProgressCallback | None,
):
    """Dispatch to one sampler with its defaults; loud on arguments that the sampler would ignore."""
    if sampler == "euler_cfg":
        sigmas = inference_sigmas(50 if steps is None else steps, shift)
        return sample_euler_cfg(model, x, sigmas, cond, uncond, 5.0 if guidance is None else guidance, callback=callback)
    if sampler == "tpo":
        if steps is not None or guidance is not None:
            raise ValueError("sampler 'tpo' takes its steps and guidance from tpo_plan, not steps/guidance")
        plan = list(tpo_plan) if tpo_plan is not None else default_tpo_plan()
        return sample_segment_routed(model, x, cond, uncond, plan, adapter_switch, shift, callback=callback)
    if sampler == "consistency":
        if guidance not in (None, 1.0):
            raise ValueError(f"the consistency student never runs CFG; got guidance {guidance}")
        if consistency_edges is not None and steps is not None and steps != len(consistency_edges) - 1:
            raise ValueError(f"steps {steps} != segments in consistency_edges ({len(consistency_edges) - 1})")
        edges = segment_edges(list(consistency_edges)) if consistency_edges else segment_edges(4 if steps is None else steps, shift)
        return sample_consistency(model, x, cond, edges, callback=callback)
    raise ValueError(f"sampler must be 'euler_cfg', 'tpo' or 'consistency', got {sampler!r}")


@torch.no_grad()
def generate(
    model: Any,
    vae: Any,
    cond: Any,
    uncond: Any,
    num_frames: int,
    height: int = 64,
    width: int = 64,
    sampler: SamplerName = "euler_cfg",
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    shift: float = 1.0,
    tpo_plan: Sequence[SegmentPlan] | None = None,
    adapter_switch: Callable[[str | None], None] | None = None,
    consistency_edges: Sequence[float] | None = None,
    callback: ProgressCallback | None = None,
    device: torch.device | str | None = None,
) -> GenerateResult:
    """Generate one clip: ``model(x, sigma, cond) -> v`` sampled from seeded noise (1, C, t, h, w), decoded by ``vae``.

    Defaults per sampler: euler_cfg 50 steps at guidance 5 (100 NFE); tpo `default_tpo_plan()` (30 NFE)
    unless ``tpo_plan`` is given; consistency 4 segments from `segment_edges(steps, shift)` unless
    ``consistency_edges`` is given (the student's training edges should be passed), no CFG.
    ``vae.decode(latents (B, C, t, h, w)) -> (B, 3, T, H, W)`` in [-1, 1] (`model.vae.VideoVAE`).
    """
    start = time.perf_counter()
    if device is None:
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else "cpu"
    shape = latent_shape(vae, num_frames, height, width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    result = _run_sampler(
        model, noise.to(device), cond, uncond, sampler, steps, guidance, shift,
        tpo_plan, adapter_switch, consistency_edges, callback,
    )
    video = vae.decode(result.x)
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3 or tuple(video.shape[2:]) != (num_frames, height, width):
        raise RuntimeError(f"VAE decoded {tuple(video.shape)}, expected (1, 3, {num_frames}, {height}, {width})")
    frames = video_to_uint8(video)[0]
    return GenerateResult(frames=frames, nfe=result.nfe, seconds=time.perf_counter() - start)
