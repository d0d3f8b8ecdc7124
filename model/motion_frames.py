"""Motion frames: long videos as overlapping chunks, each continuing from the last frames of the one before.

The model is trained on clips of T frames; a 30-60 s request is many of them. Generating the chunks
independently gives seams (pose and identity jump between chunks) and drift. As in Wan-Animate's
temporal guidance frames and InfiniteTalk's context frames, each chunk after the first is conditioned on
the clean latents of the previous chunk's last ``k`` latent frames (``Conditions.motion``): the denoiser
pins its first ``k`` latent frames to them (`model.denoiser.AnimationDenoiser`, exact velocity there),
so a chunk *starts* where the previous one ended and only its remaining frames are new.

Layout (`plan_chunks`): with temporal factor tf, k latent frames are n = 1 + tf (k - 1) video frames
(Wan's causal layout). Chunk i covers frames [s_i, s_i + T) with s_{i+1} = s_i + T - n, i.e. it repeats
the previous chunk's last n frames as its prefix and adds T - n new ones; the last chunk's conditions are
padded by repeating their last frame and its output cut, so a request of N frames gives exactly N.

The prefix of the next chunk is taken from the previous chunk's *latents* when tf = 1 (exact), else
re-encoded from its last n decoded frames (causal layout: the first latent of a clip is one frame).

Training (`draw_prefix`): with probability p per sample the first k latent frames of a training clip
become its prefix (optionally with noise on them against error accumulation, as LongCat-Video does), and
they get no loss; TPO and distillation train on the same batches, so the students keep the ability.

Colour (`match_colour`): optional per-chunk correction of each channel's mean and spread in Lab toward
the reference image, against the slow colour drift peers report (InfiniteTalk's colour correction).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import cv2

import numpy as np
import torch

from model.conditions import Conditions

__all__ = ["prefix_pixel_frames", "ChunkPlan", "plan_chunks", "draw_prefix", "training_prefix_frames", "slice_conditions", "match_colour"]


def prefix_pixel_frames(latent_frames: int, temporal_factor: int) -> int:
    """Video frames n that k latent frames stand for at the start of a clip: 1 + tf (k - 1)."""
    if latent_frames < 1:
        raise ValueError(f"need at least one motion latent frame, got {latent_frames}")
    return 1 + temporal_factor * (latent_frames - 1)


@dataclass(frozen=True)
class ChunkPlan:
    """Where the chunks of an N-frame video lie: chunk i covers frames [starts[i], starts[i] + chunk_frames),
    its first ``overlap`` frames (i > 0) repeating the previous chunk's last ones."""

    num_frames: int
    chunk_frames: int
    overlap: int
    starts: tuple[int, ...]

    def new_frames(self, index: int) -> tuple[int, int]:
        """[first, stop) of the video frames chunk ``index`` adds (its prefix excluded, cut at num_frames)."""
        first = self.starts[index] + (self.overlap if index else 0)
        return first, min(self.starts[index] + self.chunk_frames, self.num_frames)


def plan_chunks(num_frames: int, chunk_frames: int, overlap: int) -> ChunkPlan:
    """Chunks of ``chunk_frames`` (the trained clip length) overlapping by ``overlap`` frames covering
    ``num_frames``; one chunk when it fits (a shorter request is one chunk, nothing padded)."""
    if not 0 <= overlap <= chunk_frames - overlap:
        raise ValueError(f"overlap {overlap} must lie in [0, chunk_frames / 2 = {chunk_frames / 2:g}]: each chunk's "
                         "next prefix is taken from the frames it adds (0: independent chunks)")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    starts, step = [0], chunk_frames - overlap
    while starts[-1] + chunk_frames < num_frames:
        starts.append(starts[-1] + step)
    return ChunkPlan(num_frames, min(chunk_frames, num_frames) if len(starts) == 1 else chunk_frames, overlap,
                     tuple(starts))


def slice_conditions(cond: Conditions, start: int, stop: int) -> Conditions:
    """The per-frame conditions of frames [start, stop): pose (B, 3, T, H, W) and audio (B, T, W, M) cut,
    frames past their end repeating the last one; reference, face and keep masks unchanged."""

    def cut(tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        if tensor is None:
            return None
        index = torch.arange(start, stop, device=tensor.device).clamp(max=tensor.shape[dim] - 1)
        return tensor.index_select(dim, index)

    return replace(cond, pose=cut(cond.pose, 2), audio=cut(cond.audio, 1), motion=None)


def draw_prefix(cond: Conditions, latents: torch.Tensor, frames: int, prob: float, noise_std: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[Conditions, torch.Tensor | None]:
    """Training: give each sample its own first ``frames`` latent frames as a clean prefix with probability
    ``prob`` (+ ``noise_std`` Gaussian noise on it). latents (B, C, T, h, w).

    Returns the conditions with ``motion`` and its keep mask, and a loss weight (B, 1, T, 1, 1) that is 0 on
    the given frames (None when ``frames`` or ``prob`` is 0: nothing changes)."""
    if not frames or not prob:
        return cond, None
    if frames >= latents.shape[2]:
        raise ValueError(f"a prefix of {frames} latent frames leaves nothing to learn in clips of {latents.shape[2]}")
    batch = latents.shape[0]
    keep = torch.rand(batch, generator=generator) < prob
    prefix = latents[:, :, :frames].float()
    if noise_std:
        prefix = prefix + noise_std * torch.randn(prefix.shape, generator=generator)
    weight = torch.ones(batch, 1, latents.shape[2], 1, 1)
    weight[keep, :, :frames] = 0.0
    keep_all = {**cond.keep, "motion": keep.to(latents.device)}
    return replace(cond, motion=prefix.to(latents), keep=keep_all), weight.to(latents.device)


def training_prefix_frames(model: Any, prob: float, setting: str) -> int:
    """The prefix length a training job draws (`draw_prefix`): the model's ``motion_frames`` when ``prob`` > 0,
    else 0. A model (or an engine wrapping one as ``.module``) without the path fails loudly, naming ``setting``."""
    if not prob:
        return 0
    frames = getattr(model, "module", model).config.motion_frames
    if not frames:
        raise ValueError(f"{setting} > 0 needs a model built with model.motion_frames > 0")
    return frames


def match_colour(frames: np.ndarray, reference: np.ndarray, strength: float = 1.0) -> np.ndarray:
    """Frames uint8 (T, H, W, 3) RGB with each Lab channel's mean and std over the chunk moved toward the
    reference image's (H, W, 3) by ``strength`` in [0, 1] (0: unchanged). One affine map per channel for
    the whole chunk, so motion inside the chunk is untouched."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if strength == 0:
        return frames  # no Lab round trip (it is not lossless in uint8)
    lab = cv2.cvtColor(frames.reshape(-1, frames.shape[2], 3), cv2.COLOR_RGB2LAB).astype(np.float32)
    ref = cv2.cvtColor(np.ascontiguousarray(reference), cv2.COLOR_RGB2LAB).astype(np.float32).reshape(-1, 3)
    mean, std = lab.reshape(-1, 3).mean(0), lab.reshape(-1, 3).std(0) + 1e-3
    target_mean = mean + strength * (ref.mean(0) - mean)
    target_std = std + strength * (ref.std(0) + 1e-3 - std)
    corrected = (lab - mean) * (target_std / std) + target_mean
    rgb = cv2.cvtColor(np.clip(corrected, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)
    return rgb.reshape(frames.shape)
