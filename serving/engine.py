"""The in-process animation engine: model + VAE, request -> conditions -> sampled frames -> MP4.

The `Animator` replica wraps exactly this class, and the benchmark calls it directly to measure
what Serve's HTTP path adds. Nothing here imports Ray.

Why not `model.generate.generate`: it samples batch 1. `generate_batch` runs the same steps
(seeded CPU noise per request, the same sampler, VAE decode) for B requests that share a shape, so
`@serve.batch` can put them through one model call per step; with B = 1 it reproduces `generate`
(tested).

Conditions from a request (shapes as in `model.conditions`):
* ref: VAE latent of the reference image (1, C, 1, h, w).
* audio: `model.audio.audio_features` of the 16 kHz wave (1, T, W, M); no audio -> zeros with keep False.
* pose: `model.pose.render_pose` maps from keypoints (1, 3, T, H, W); none -> zeros with keep False.
* face: the VAE latent of a face crop of the reference, repeated over latent frames. The crop is a
  fixed centred upper box (top half, middle half of the width): right for the tiny synthetic puppet
  world, whose head sits there; a real deployment would plug in a face detector here.
Absent conditions are present-but-dropped (keep False) rather than None so that any requests can
be concatenated into one batch; the denoiser then uses the learned null, as for None.

No checkpoint (``model.pretrained_path`` None) builds the preset with random init: the app runs
end to end, but the video is noise-like until a trained student checkpoint is configured.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from model.audio import audio_features
from model.conditions import Conditions
from model.flow import inference_sigmas
from model.media import mux_mp4
from model.pose import render_pose
from model.presets import build_denoiser
from model.samplers import SamplerProgress, sample_consistency, sample_euler_cfg, segment_edges
from model.storage import Storage
from model.vae import load_vae, video_to_uint8
from serving.config import ServeAppConfig
from serving.inputs import AnimationRequest

__all__ = ["AnimationEngine", "Animation", "face_box"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Animation:
    """One finished request: frames uint8 (T, H, W, 3), model evaluations, sampling + decode seconds."""

    frames: np.ndarray
    nfe: int
    seconds: float


def face_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the fixed face crop: top half, middle half of the width (tiny puppet world)."""
    return width // 4, 0, width // 4 + width // 2, height // 2


class AnimationEngine:
    """Holds the denoiser and VAE on one device; turns `AnimationRequest`s into frames and MP4 bytes."""

    def __init__(self, cfg: ServeAppConfig, storage: Storage | None = None) -> None:
        self.cfg = cfg
        self.storage = storage or Storage(cfg.storage)
        self.device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.model = build_denoiser(cfg.model, self.storage).to(self.device).eval().requires_grad_(False)
        if cfg.adapter_path is not None:
            with self.storage.local_copy(cfg.adapter_path) as folder:
                self.model.load_lora_adapter(str(folder), adapter_name="serve")
        self.vae = load_vae(cfg.model.vae_path, self.storage, self.device)
        if self.vae.spatial_factor * 2 > min(cfg.height, cfg.width) or cfg.height % self.vae.spatial_factor or cfg.width % self.vae.spatial_factor:
            raise ValueError(f"height/width {cfg.height}x{cfg.width} do not fit the VAE's spatial factor {self.vae.spatial_factor}")

    # ------------------------------------------------------------------ conditions
    def conditions(self, request: AnimationRequest) -> Conditions:
        """Batch-1 `Conditions` for a request, every condition present (absent ones with keep False)."""
        cfg, frames = self.cfg, request.num_frames
        ref = self.vae.encode(request.ref_image[None, None])  # (1, C, 1, h, w)
        audio_keep = request.audio is not None
        wave = request.audio if audio_keep else np.zeros(1, np.float32)
        audio = torch.from_numpy(audio_features(wave, request.fps, frames, cfg.model.audio))[None]
        pose_keep = request.keypoints is not None
        pose_maps = (render_pose(request.keypoints, cfg.height, cfg.width) if pose_keep
                     else np.zeros((frames, cfg.height, cfg.width, 3), np.uint8))
        pose = torch.from_numpy(pose_maps).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        keep = {"audio": torch.tensor([audio_keep]), "pose": torch.tensor([pose_keep])}
        face = None
        if self.model.config.face_injection:
            x0, y0, x1, y1 = face_box(cfg.height, cfg.width)
            face_latent = self.vae.encode(np.ascontiguousarray(request.ref_image[y0:y1, x0:x1])[None, None])
            face = face_latent.repeat(1, 1, self.vae.num_latent_frames(frames), 1, 1)
        cond = Conditions(ref_latent=ref, pose=pose, audio=audio, face=face, keep=keep)
        return cond.to(self.device, torch.float32)

    # ------------------------------------------------------------------ sampling
    def _sample(self, x: torch.Tensor, cond: Conditions, steps: int, progress: Callable[[SamplerProgress], None]):
        """The configured sampler on x (B, C, t, h, w) from sigma 1: consistency (no CFG) or Euler + CFG."""
        cfg = self.cfg
        if cfg.sampler == "consistency":
            edges = segment_edges(list(cfg.consistency_edges)) if cfg.consistency_edges else segment_edges(steps, 1.0)
            if len(edges) - 1 != steps:
                raise ValueError(f"steps {steps} != the student's {len(edges) - 1} segments")
            return sample_consistency(self.model, x, cond, edges, callback=progress)
        uncond = cond.drop(set(cfg.cfg_drop))
        guidance = 5.0 if cfg.guidance is None else cfg.guidance
        return sample_euler_cfg(self.model, x, inference_sigmas(steps, 1.0), cond, uncond, guidance, callback=progress)

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[AnimationRequest],
                       progress: Sequence[ProgressFn | None] | None = None) -> list[Animation]:
        """Sample B requests sharing `shape_key` as one batch; per-request seeded noise (1, C, t, h, w) as `generate`."""
        start = time.perf_counter()
        keys = {r.shape_key for r in requests}
        if len(keys) != 1:
            raise ValueError(f"generate_batch needs requests of one shape (frames, steps), got {sorted(keys)}")
        frames, steps = keys.pop()
        shape = (1, self.vae.latent_channels, self.vae.num_latent_frames(frames),
                 self.cfg.height // self.vae.spatial_factor, self.cfg.width // self.vae.spatial_factor)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(r.seed)) for r in requests])
        cond = Conditions.cat([self.conditions(r) for r in requests])
        callbacks = [fn for fn in (progress or []) if fn is not None]

        def report(p: SamplerProgress) -> None:
            for fn in callbacks:
                fn(p.step, p.total_steps)

        result = self._sample(noise.to(self.device), cond, steps, report)
        video = video_to_uint8(self.vae.decode(result.x)).numpy()  # (B, T, H, W, 3)
        seconds = time.perf_counter() - start
        return [Animation(frames=video[i], nfe=result.nfe, seconds=seconds) for i in range(len(requests))]

    def render_mp4(self, request: AnimationRequest, animation: Animation) -> bytes:
        """H.264 MP4 of the frames with the request's audio (trimmed/padded to frames / fps) muxed in."""
        audio = None
        if request.audio is not None:
            rate = self.cfg.model.audio.sample_rate
            samples = round(request.num_frames / request.fps * rate)
            audio = np.zeros(samples, np.float32)
            clip = request.audio[:samples]
            audio[: clip.size] = clip
        return mux_mp4(animation.frames, audio, request.fps, sample_rate=self.cfg.model.audio.sample_rate)

    def animate(self, request: AnimationRequest, progress: ProgressFn | None = None) -> tuple[bytes, Animation]:
        """One request end to end (the in-process reference path the benchmark compares Serve with)."""
        animation = self.generate_batch([request], [progress])[0]
        return self.render_mp4(request, animation), animation

    def warmup(self) -> float:
        """One 1-step generation of a grey reference (allocations, kernels); returns seconds."""
        start = time.perf_counter()
        grey = np.full((self.cfg.height, self.cfg.width, 3), 128, np.uint8)
        frames = 1 + self.vae.temporal_factor
        steps = self.cfg.steps if self.cfg.consistency_edges else 1  # a student's edges fix its step count
        self.generate_batch([AnimationRequest(grey, None, None, frames, self.cfg.default_fps, steps, 0)])
        return time.perf_counter() - start
