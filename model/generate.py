"""End-to-end generation: seeded noise -> `model.sampling.sample` (a `SamplerSpec`) -> VAE decode -> uint8 frames, with NFE and wall time.

`generate` is what the benchmarks and the Serve app call. The wall time covers sampling and VAE
decode (the end-to-end figure the evaluation reports). Noise is drawn on the CPU from
``torch.Generator().manual_seed(seed)`` and then moved, so a seed gives the same noise on any device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from pydantic import Field

from core.config import StrictConfig
from model.motion_frames import match_colour, plan_chunks, prefix_pixel_frames, slice_conditions
from model.samplers import ProgressCallback, SamplerProgress
from model.sampling import SamplerSpec, sample
from model.vae import video_to_uint8

__all__ = ["GenerateResult", "generate", "generate_long", "LongFormConfig", "ChunkDone", "latent_shape"]


@dataclass(frozen=True)
class GenerateResult:
    """Decoded frames uint8 (T, H, W, 3) on the CPU, model evaluations spent, seconds end to end (decode included)."""

    frames: torch.Tensor
    nfe: int
    seconds: float
    latents: torch.Tensor | None = None  # final latents (1, C, t, h, w) when asked (return_latents)


def latent_shape(vae: Any, num_frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """Latent shape (1, C, t, h, w) for a clip of T x H x W pixels: t = 1 + (T - 1) / temporal_factor (Wan's causal frame)."""
    temporal, spatial = int(vae.temporal_factor), int(vae.spatial_factor)
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ValueError(f"num_frames {num_frames} must be 1 + k * temporal_factor ({temporal})")
    if height % spatial or width % spatial:
        raise ValueError(f"frame size {height}x{width} must be a multiple of the spatial factor {spatial}")
    return (1, int(vae.latent_channels), 1 + (num_frames - 1) // temporal, height // spatial, width // spatial)


@torch.no_grad()
def generate(
    model: Any,
    vae: Any,
    cond: Any,
    num_frames: int,
    height: int = 64,
    width: int = 64,
    spec: SamplerSpec | None = None,
    seed: int = 0,
    adapter_switch: Callable[[str | None], None] | None = None,
    callback: ProgressCallback | None = None,
    device: torch.device | str | None = None,
    return_latents: bool = False,
) -> GenerateResult:
    """Generate one clip: ``model(x, sigma, cond) -> v`` sampled by `model.sampling.sample` with ``spec``
    (None = `SamplerSpec()`; normally the model card's) from seeded noise (1, C, t, h, w), decoded by ``vae``.

    ``vae.decode(latents (B, C, t, h, w)) -> (B, 3, T, H, W)`` in [-1, 1] (`model.vae.VideoVAE`).
    """
    start = time.perf_counter()
    if device is None:
        first = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        device = first.device if first is not None else "cpu"
    shape = latent_shape(vae, num_frames, height, width)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    result = sample(model, noise.to(device), cond, spec or SamplerSpec(), adapter_switch, callback)
    video = vae.decode(result.x)
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3 or tuple(video.shape[2:]) != (num_frames, height, width):
        raise RuntimeError(f"VAE decoded {tuple(video.shape)}, expected (1, 3, {num_frames}, {height}, {width})")
    frames = video_to_uint8(video)[0]
    return GenerateResult(frames=frames, nfe=result.nfe, seconds=time.perf_counter() - start,
                          latents=result.x.detach().cpu() if return_latents else None)


class LongFormConfig(StrictConfig):
    """How a video longer than one trained clip is generated (`generate_long`, `model.motion_frames`)."""

    chunk_frames: int = Field(..., ge=1, description="frames per chunk: the clip length the model was trained on")
    motion_frames: int = Field(1, ge=0, description="latent frames of the previous chunk each chunk continues from "
                               "(<= the model's motion_frames); 0 = independent chunks (the baseline)")
    colour_correction: float = Field(0.0, ge=0, le=1, description="strength of each chunk's Lab mean/std match "
                                     "toward the reference image (0 = off)")


@dataclass(frozen=True)
class ChunkDone:
    """Handed to ``on_chunk`` after each chunk: its index, the chunk count, the frames [first, stop) it added
    (uint8 (n, H, W, 3)) and its final latents (1, C, t, h, w), so a caller can store them and resume."""

    index: int
    total: int
    first: int
    frames: torch.Tensor
    latents: torch.Tensor


@torch.no_grad()
def generate_long(model: Any, vae: Any, cond: Any, num_frames: int, long: LongFormConfig, height: int = 64,
                  width: int = 64, spec: SamplerSpec | None = None, seed: int = 0,
                  reference: np.ndarray | None = None, adapter_switch: Callable[[str | None], None] | None = None,
                  callback: ProgressCallback | None = None, on_chunk: Callable[[ChunkDone], None] | None = None,
                  resume: list[ChunkDone] | None = None, device: torch.device | str | None = None) -> GenerateResult:
    """Any length as overlapping chunks of ``long.chunk_frames`` (`model.motion_frames.plan_chunks`): chunk i
    is sampled from noise seeded ``seed + i`` with the reference, its own slice of the pose/audio conditions
    and, unless ``long.motion_frames`` is 0, the previous chunk's last latent frames as its prefix.

    ``cond``: the `Conditions` of all ``num_frames`` frames (sliced per chunk, `slice_conditions`), or a
    function ``(first, stop) -> Conditions`` of frames [first, stop) for a caller that builds them per chunk.

    Returns exactly ``num_frames`` frames. ``callback`` sees steps numbered across all chunks
    (``total_steps`` = steps per chunk x chunks). ``resume``: chunks already done (from ``on_chunk``) are
    reused, not sampled again, and the result equals an uninterrupted run. ``reference`` uint8 (H, W, 3)
    is needed for colour correction.
    """
    start = time.perf_counter()
    temporal = int(vae.temporal_factor)
    overlap = prefix_pixel_frames(long.motion_frames, temporal) if long.motion_frames else 0
    plan = plan_chunks(num_frames, long.chunk_frames, overlap)
    if long.colour_correction and reference is None:
        raise ValueError("colour_correction needs the reference image")
    done = {chunk.index: chunk for chunk in resume or []}
    pieces, nfe, previous = [], 0, None
    for index, first in enumerate(plan.starts):
        chunk = done.get(index)
        if chunk is None:
            chunk, used = _one_chunk(model, vae, cond, plan, index, previous, long, height, width, spec, seed,
                                     reference, adapter_switch, _chunk_progress(callback, index, len(plan.starts)),
                                     device)
            nfe += used
            if on_chunk is not None:
                on_chunk(chunk)
        pieces.append(chunk.frames)
        previous = chunk
    return GenerateResult(frames=torch.cat(pieces)[:num_frames], nfe=nfe, seconds=time.perf_counter() - start)


def _one_chunk(model, vae, cond, plan, index: int, previous: ChunkDone | None, long: LongFormConfig, height: int,
               width: int, spec, seed: int, reference, adapter_switch, callback, device) -> tuple[ChunkDone, int]:
    """Sample, decode and (optionally) colour-correct chunk ``index``; returns it and the NFE spent."""
    begin = plan.starts[index]
    stop = begin + plan.chunk_frames
    chunk_cond = cond(begin, stop) if callable(cond) else slice_conditions(cond, begin, stop)
    if previous is not None and long.motion_frames:
        chunk_cond = replace(chunk_cond, motion=_prefix(vae, previous, long.motion_frames, plan.overlap),
                             keep={**chunk_cond.keep})
    result = generate(model, vae, chunk_cond, plan.chunk_frames, height, width, spec, seed + index,
                      adapter_switch, callback, device, return_latents=True)
    frames = result.frames
    if long.colour_correction:
        frames = torch.from_numpy(match_colour(frames.numpy(), reference, long.colour_correction))
    first, stop = plan.new_frames(index)
    return ChunkDone(index, len(plan.starts), first, frames[first - begin:stop - begin], result.latents), result.nfe


def _prefix(vae: Any, previous: ChunkDone, latent_frames: int, overlap: int) -> torch.Tensor:
    """The previous chunk's last ``latent_frames`` latent frames: its latents when the VAE has no temporal
    compression, else its last ``overlap`` frames encoded again (a clip's first latent is one frame)."""
    if int(vae.temporal_factor) == 1:
        return previous.latents[:, :, -latent_frames:]
    return vae.encode(previous.frames[-overlap:][None].numpy()).to(previous.latents)


def _chunk_progress(callback: ProgressCallback | None, index: int, chunks: int) -> ProgressCallback | None:
    """The sampler's per-step progress renumbered across chunks."""
    if callback is None:
        return None

    def report(progress: SamplerProgress) -> None:
        callback(replace(progress, step=index * progress.total_steps + progress.step,
                         total_steps=chunks * progress.total_steps))

    return report
