"""Fit the puppet perception model (`model.perception`) on frames the synthetic world renders, with exact labels.

`python -m ray_jobs.fit_perception --config ray_jobs/configs/assets/fit_perception.yaml [--set key=value ...]`

Data: the synthetic world of `world_seed` (its own seed, never the demo's 0) with `num_identities`
identities, `heldout_identities` of them held out (`ray_jobs.synthetic.identity_splits`): their
videos (`generate_video`) give frames uint8 (N, 64, 64, 3), keypoints (N, 17, 3) and mouth openness
(N,). The detector will judge *generated* frames (VAE-decoded, blurry, small artifacts), so every
training frame is augmented: a share `augment.vae_fraction` of each batch comes from a precomputed
pool of tiny-VAE round trips (every `vae_pool_every`-th train frame; the VAE is slow on CPU) with
Gaussian noise of random strength on the latents; then every frame is blurred (some), colour-jittered
and noised. The mouth crop is placed by the true ears, jittered like a detection.

Output (`out`): the model folder (config.json + safetensors, rebuilt by `PuppetPerception.from_pretrained`)
and `FIT_REPORT.json`: config, steps, seconds, parameters, and the detector's own keypoint error
(px), PCK at 5 % of the frame height and mouth-openness Pearson r on ground-truth frames of the
held-out identities, on their VAE round trips, on train identities and on the demo world (seed 0).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from core.config import StrictConfig
from model.metrics import lip_sync, pck, pose_error
from model.perception import PuppetPerception, frames_to_input
from ray_jobs.common import parse_job_config, setup_logging

__all__ = ["PerceptionArchitecture", "AugmentConfig", "FitPerceptionConfig", "LabelledFrames", "render_world",
           "vae_pool", "augment", "train", "score_detector", "fit_perception", "main"]

log = logging.getLogger(__name__)


class PerceptionArchitecture(StrictConfig):
    """`PuppetPerception` constructor arguments."""

    size: int = Field(64, ge=32, multiple_of=8, description="input frame edge (frames are resized to it)")
    width: int = Field(16, ge=4, description="channels of the pose network's 32 px stage (x2, x4 deeper)")
    mouth_width: int = Field(16, ge=4, description="channels of the mouth network's first stage")
    mouth_crop_size: int = Field(24, ge=8, multiple_of=4, description="mouth crop edge in pixels after resampling")
    mouth_crop_scale: float = Field(2.0, gt=0, description="crop side in head radii")
    mouth_crop_offset: float = Field(0.35, description="crop centre below the head centre, in head radii")


class AugmentConfig(StrictConfig):
    """Degradations applied to training frames so the detector still reads generated ones."""

    vae_fraction: float = Field(0.5, ge=0, le=1, description="share of frames replaced by a tiny-VAE round trip")
    vae_latent_noise_max: float = Field(0.5, ge=0, description="max std of noise on the normalised latents before decoding")
    vae_pool_every: int = Field(8, ge=1, description="every k-th train frame gets a VAE round trip (the VAE is slow on CPU)")
    blur_prob: float = Field(0.5, ge=0, le=1)
    blur_sigma_max: float = Field(1.2, ge=0, description="Gaussian blur sigma in pixels, uniform in [0.3, max]")
    noise_std_max: float = Field(0.04, ge=0, description="pixel noise std in [0, 1] units, uniform in [0, max]")
    brightness: float = Field(0.06, ge=0, description="additive brightness shift range in [0, 1] units")
    contrast: float = Field(0.15, ge=0, description="contrast factor in [1 - c, 1 + c]")
    channel_gain: float = Field(0.06, ge=0, description="per-channel gain in [1 - g, 1 + g]")
    ear_jitter_px: float = Field(0.7, ge=0, description="std of the noise on the true ears that place the mouth crop")


class FitPerceptionConfig(StrictConfig):
    """Options of `python -m ray_jobs.fit_perception`."""

    out: str = Field("model/assets/puppet_perception", description="output model folder (local)")
    world_seed: int = Field(11, ge=1, description="the perception world's seed (0 is the demo's world: not allowed)")
    num_identities: int = Field(96, ge=64, description="identities in the perception world")
    heldout_identities: int = Field(12, ge=1, description="identities never trained on (evaluated)")
    videos_per_identity: int = Field(3, ge=1, description="videos rendered per identity")
    duration: float = Field(3.0, gt=0, description="seconds per video (16 fps)")
    eval_vae_every: int = Field(4, ge=1, description="every k-th held-out frame is scored after a VAE round trip")
    demo_seed: int = Field(0, ge=0, description="the demo world also evaluated on (all its identities are unseen)")
    demo_identities: int = Field(8, ge=1)
    demo_videos: int = Field(8, ge=1)
    steps: int = Field(4000, ge=1, description="optimizer steps")
    max_seconds: float | None = Field(960.0, gt=0, description="stop early after this much training time")
    batch_size: int = Field(32, ge=2)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    mouth_weight: float = Field(10.0, ge=0, description="weight of the mouth L1 (openness in [0, 1]) vs keypoint L1 (px)")
    seed: int = Field(0, ge=0, description="initialisation, augmentation and batch sampling seed")
    threads: int | None = Field(1, ge=1, description="torch threads (1 is fastest on 2 shared cores)")
    arch: PerceptionArchitecture = PerceptionArchitecture()
    augment: AugmentConfig = AugmentConfig()

    @field_validator("world_seed")
    @classmethod
    def _not_demo_world(cls, value: int) -> int:
        if value == 0:
            raise ValueError("world_seed 0 is the demo's world; fit on a world of its own")
        return value


@dataclass(frozen=True)
class LabelledFrames:
    """Frames uint8 (N, H, W, 3), keypoints float (N, 17, 3) pixels, mouth float (N,), video index (N,)."""

    frames: np.ndarray
    keypoints: np.ndarray
    mouth: np.ndarray
    video: np.ndarray


def _concat(parts: list[LabelledFrames]) -> LabelledFrames:
    return LabelledFrames(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in ("frames", "keypoints",
                                                                                         "mouth", "video")})


def render_world(seed: int, num_identities: int, heldout: int, num_videos: int, duration: float) -> dict[str, LabelledFrames]:
    """Frames and exact labels of videos 0..num_videos-1 of a world, per split ('train', 'heldout')."""
    from ray_jobs.synthetic.world import SyntheticConfig, generate_video

    world = SyntheticConfig(seed=seed, num_identities=num_identities, heldout_identities=heldout, duration=duration)
    parts: dict[str, list[LabelledFrames]] = {"train": [], "heldout": []}
    for index in range(num_videos):
        video = generate_video(world, index)
        keypoints = np.asarray(video.sidecar["keypoints"], dtype=np.float32)
        parts[video.sidecar["split"]].append(LabelledFrames(
            frames=video.frames, keypoints=keypoints, video=np.full(len(keypoints), index),
            mouth=np.asarray(video.sidecar["mouth_openness"], dtype=np.float32)))
    return {split: _concat(p) for split, p in parts.items() if p}


@torch.no_grad()
def vae_pool(frames: np.ndarray, noise_max: float, seed: int, chunk: int = 64) -> np.ndarray:
    """Tiny-VAE round trips uint8 (N, H, W, 3) of frames (N, H, W, 3), latents noised with std ~ U(0, noise_max)."""
    from model.vae import load_vae, video_to_uint8

    vae = load_vae(None)
    gen = torch.Generator().manual_seed(seed)
    out = np.empty_like(frames)
    log.info("VAE round trips of %d frames", len(frames))
    for start in range(0, len(frames), chunk):
        latents = vae.encode(torch.from_numpy(frames[start:start + chunk])[:, None])  # (n, C, 1, h, w)
        std = torch.rand(latents.shape[0], 1, 1, 1, 1, generator=gen) * noise_max
        latents = latents + std * torch.randn(latents.shape, generator=gen)
        out[start:start + chunk] = video_to_uint8(vae.decode(latents))[:, 0].numpy()
    return out


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of (B, 3, H, W) with sigma (B,) pixels (separable, reflect-padded)."""
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B*3, K)
    batch, channels, height, width = x.shape
    flat = F.pad(x.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def augment(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Blur, colour jitter and pixel noise on frames (B, 3, H, W) in [-1, 1] (keypoints unchanged)."""
    batch = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    if cfg.blur_sigma_max > 0:
        blurred = _blur(x, 0.3 + u(batch) * max(cfg.blur_sigma_max - 0.3, 0.0))
        x = torch.where((u(batch) < cfg.blur_prob)[:, None, None, None], blurred, x)
    pixels = (x + 1) / 2
    mean = pixels.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1 + cfg.contrast * (2 * u(batch, 1, 1, 1) - 1)
    gain = 1 + cfg.channel_gain * (2 * u(batch, 3, 1, 1) - 1)
    shift = cfg.brightness * (2 * u(batch, 1, 1, 1) - 1)
    pixels = ((pixels - mean) * contrast + mean) * gain + shift
    pixels = pixels + u(batch, 1, 1, 1) * cfg.noise_std_max * torch.randn(pixels.shape, generator=gen)
    return pixels.clamp(0, 1) * 2 - 1


def _batch(data: LabelledFrames, degraded: LabelledFrames | None, cfg: FitPerceptionConfig,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(frames (B, 3, S, S), true keypoints (B, 17, 2), crop keypoints (B, 17, 2), mouth (B,)) of random frames.

    A share `augment.vae_fraction` of the batch comes from the VAE pool ``degraded``, the rest from ``data``.
    """
    pick = torch.randint(len(data.frames), (cfg.batch_size,), generator=gen).numpy()
    frames, keypoints, mouth = data.frames[pick], data.keypoints[pick, :, :2], data.mouth[pick]
    if degraded is not None:
        use = torch.rand(cfg.batch_size, generator=gen).numpy() < cfg.augment.vae_fraction
        other = torch.randint(len(degraded.frames), (cfg.batch_size,), generator=gen).numpy()
        frames = np.where(use[:, None, None, None], degraded.frames[other], frames)
        keypoints = np.where(use[:, None, None], degraded.keypoints[other, :, :2], keypoints)
        mouth = np.where(use, degraded.mouth[other], mouth)
    x, _ = frames_to_input(frames, cfg.arch.size)
    x = augment(x, cfg.augment, gen)
    keypoints = torch.from_numpy(np.ascontiguousarray(keypoints)).float()
    crop = keypoints + cfg.augment.ear_jitter_px * torch.randn(keypoints.shape, generator=gen)
    return x, keypoints, crop, torch.from_numpy(np.ascontiguousarray(mouth)).float()


def _lr_factor(step: int, elapsed: float, cfg: FitPerceptionConfig) -> float:
    """Linear warm-up, then cosine decay to 5 % along whichever budget (steps or max_seconds) runs out first."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.max_seconds is not None:
        progress = max(progress, elapsed / cfg.max_seconds)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model: PuppetPerception, data: LabelledFrames, degraded: LabelledFrames | None,
          cfg: FitPerceptionConfig) -> tuple[int, float]:
    """AdamW on L1(keypoints, px) + mouth_weight * L1(mouth); returns (steps done, seconds)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    start, step = time.perf_counter(), 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, time.perf_counter() - start, cfg))
    while step < cfg.steps and (cfg.max_seconds is None or time.perf_counter() - start < cfg.max_seconds):
        x, keypoints, crop, mouth = _batch(data, degraded, cfg, gen)
        pred_keypoints, pred_mouth = model(x, crop)
        kp_loss = (pred_keypoints - keypoints).abs().mean()
        mouth_loss = (pred_mouth - mouth).abs().mean()
        loss = kp_loss + cfg.mouth_weight * mouth_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step % 50 == 0 or step == 1:
            log.info("step %d/%d keypoint L1 %.3f px, mouth L1 %.4f (%.0fs)", step, cfg.steps, kp_loss.item(),
                     mouth_loss.item(), time.perf_counter() - start)
    model.eval()
    return step, time.perf_counter() - start


def score_detector(model: PuppetPerception, data: LabelledFrames) -> dict[str, float]:
    """The detector's own error on labelled frames: keypoint px, PCK@5 % height, mouth r (pooled and per video)."""
    found = model.detect(data.frames)
    height = data.frames.shape[1]
    per_video = [lip_sync(found.mouth[data.video == v], data.mouth[data.video == v]) for v in np.unique(data.video)]
    return {"frames": int(len(data.frames)), "keypoint_error_px": round(pose_error(found.keypoints, data.keypoints), 3),
            "pck": round(pck(found.keypoints, data.keypoints, height), 4),
            "mouth_r": round(lip_sync(found.mouth, data.mouth), 4),
            "mouth_r_per_video": _nanmean(per_video),
            "mouth_mae": round(float(np.abs(found.mouth - data.mouth).mean()), 4)}


def _nanmean(values: list[float]) -> float | None:
    """Mean of the finite values, rounded; None (JSON null) when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return round(float(np.mean(finite)), 4) if finite else None


def _subsample(data: LabelledFrames, every: int) -> LabelledFrames:
    return LabelledFrames(**{k: getattr(data, k)[::every] for k in ("frames", "keypoints", "mouth", "video")})


def _evaluation_sets(cfg: FitPerceptionConfig, world: dict[str, LabelledFrames]) -> dict[str, LabelledFrames]:
    """Ground-truth sets the report scores: held-out, their VAE round trips, some train frames, the demo world."""
    heldout = world["heldout"]
    demo = render_world(cfg.demo_seed, cfg.demo_identities, min(2, cfg.demo_identities - 1), cfg.demo_videos,
                        cfg.duration)
    demo_all = _concat(list(demo.values()))
    sampled = _subsample(heldout, cfg.eval_vae_every)
    round_trip = replace(sampled, frames=vae_pool(sampled.frames, 0.0, cfg.seed))
    return {"heldout_truth": heldout, "heldout_vae_round_trip": round_trip,
            "train_truth": _subsample(world["train"], 8), f"demo_world_seed{cfg.demo_seed}_truth": demo_all}


def fit_perception(cfg: FitPerceptionConfig) -> dict:
    """Render, fit, score, save the model folder and FIT_REPORT.json under cfg.out; return the report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    world = render_world(cfg.world_seed, cfg.num_identities, cfg.heldout_identities,
                         cfg.num_identities * cfg.videos_per_identity, cfg.duration)
    degraded = None
    if cfg.augment.vae_fraction > 0:
        pool = _subsample(world["train"], cfg.augment.vae_pool_every)
        degraded = replace(pool, frames=vae_pool(pool.frames, cfg.augment.vae_latent_noise_max, cfg.seed + 1))
    prepare_seconds = time.perf_counter() - start
    log.info("rendered %d train / %d held-out frames (+VAE pool) in %.0fs", len(world["train"].frames),
             len(world["heldout"].frames), prepare_seconds)
    torch.manual_seed(cfg.seed)
    model = PuppetPerception(**cfg.arch.model_dump())
    steps, seconds = train(model, world["train"], degraded, cfg)
    report = {"steps": steps, "train_seconds": round(seconds, 1), "prepare_seconds": round(prepare_seconds, 1),
              "parameters": sum(p.numel() for p in model.parameters()),
              "train_frames": int(len(world["train"].frames)), "pck_threshold": "5 % of the frame height",
              "scores": {name: score_detector(model, data) for name, data in _evaluation_sets(cfg, world).items()}}
    report["wall_seconds"] = round(time.perf_counter() - start, 1)
    report["config"] = cfg.model_dump()
    out = Path(cfg.out)
    model.save_pretrained(str(out))
    (out / "FIT_REPORT.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved %s: %s", out, json.dumps(report["scores"]))
    return report


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    cfg = parse_job_config(FitPerceptionConfig, argv, description=__doc__)
    report = fit_perception(cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
