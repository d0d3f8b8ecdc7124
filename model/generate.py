"""End-to-end generation: seeded noise -> `model.sampling.sample` (a `SamplerSpec`) -> VAE decode -> uint8 frames, with NFE and wall time.

`generate` is what the benchmarks and the Serve app call. The wall time covers sampling and VAE
decode (the end-to-end figure the evaluation reports). Noise is drawn on the CPU from
``torch.Generator().manual_seed(seed)`` and then moved, so a seed gives the same noise on any device.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from model.samplers import ProgressCallback
from model.sampling import SamplerSpec, sample
from model.vae import video_to_uint8

__all__ = ["GenerateResult", "generate", "latent_shape"]


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
    return GenerateResult(frames=frames, nfe=result.nfe, seconds=time.perf_counter() - start)
