"""Fit the tiny `AutoencoderKLWan` to the synthetic puppet world and save it as a diffusers folder.

`python -m ray_jobs.fit_vae --out model/assets/tiny_vae [--steps N --seed S] [--set key=value ...]`
(`--set init_from=FOLDER` continues an earlier fit; FIT_REPORT.json then also counts total steps/seconds)

No pretrained VAE can be downloaded here, so the tiny default is fitted from scratch on frames the
synthetic renderer draws: 64x64 full frames and 32x32 face crops (the face path of the model encodes
those), held-out identities for evaluation. Loss: L1 + MSE on pixels plus a small KL, Adam.

The tiny VAE is made frame-wise on purpose: the causal convolutions' two past-time taps start at
zero and, since training sees single frames (T = 1, Wan's causal padding gives those taps zero
inputs and so zero gradients), they stay zero. A frame's latent then does not depend on its
neighbours (a reference frame encodes the same alone or inside a clip) and training is 1 frame per
sample instead of a clip. The class, config and decode loop are unchanged diffusers `AutoencoderKLWan`.
The output folder gets `latents_mean`/`latents_std` measured on the training frames and a
`FIT_REPORT.json` (steps, seconds, train/held-out PSNR on frames and face crops, encode+decode ms).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from core.config import StrictConfig
from model.face import crop_faces
from model.metrics import psnr
from model.vae import framewise_conv_forward, past_time_taps_are_zero, uint8_to_signed, zero_past_time_taps
from ray_jobs.common import parse_job_config, setup_logging

__all__ = ["TinyVAEArchitecture", "FitVAEConfig", "build_tiny_vae", "FACE_MARGIN", "render_identity_frames",
           "fit_vae", "main"]  # the frame-wise helpers live in model.vae

log = logging.getLogger(__name__)

FACE_MARGIN = 1.25  # face crops for fitting: the box edge times this (model.face.crop_faces)

# (identity, num_frames, rng) -> (frames uint8 (T, H, W, 3), face boxes (T, 4) x0 y0 x1 y1 pixels)
FrameSource = Callable[[object, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


class TinyVAEArchitecture(StrictConfig):
    """`AutoencoderKLWan` constructor arguments of the tiny VAE (spatial factor 2**(len(dim_mult)-1))."""

    base_dim: int = Field(16, ge=4)
    z_dim: int = Field(16, ge=1)
    dim_mult: list[int] = Field([1, 2, 2], min_length=2)
    num_res_blocks: int = Field(1, ge=1)


class FitVAEConfig(StrictConfig):
    """Options of `python -m ray_jobs.fit_vae`."""

    out: str = Field("model/assets/tiny_vae", description="output diffusers folder (local)")
    steps: int = Field(400, ge=1, description="optimizer steps")
    max_seconds: float | None = Field(None, gt=0, description="stop early after this much training time")
    seed: int = Field(0, ge=0, description="initialisation and batch sampling seed")
    lr: float = Field(2e-3, gt=0)
    batch_frames: int = Field(8, ge=1, description="64x64 frames per step")
    batch_faces: int = Field(8, ge=0, description="32x32 face crops per step")
    kl_weight: float = Field(1e-6, ge=0)
    mse_weight: float = Field(1.0, ge=0)
    l1_weight: float = Field(1.0, ge=0)
    world_seed: int = Field(0, ge=0, description="synthetic world whose held-out identities are evaluated on")
    num_identities: int = Field(8, ge=2, description="identities per world (as ray_jobs.synthetic)")
    heldout_identities: int = Field(2, ge=1)
    extra_train_seeds: int = Field(3, ge=0, description="extra worlds whose identities all train (more appearances)")
    frames_per_identity: int = Field(32, ge=1)
    size: int = Field(64, ge=16, description="full frame edge in pixels")
    face_size: int = Field(32, ge=8, description="face crop edge in pixels")
    eval_frames: int = Field(16, ge=1, description="frames per split for the PSNR report")
    threads: int | None = Field(None, ge=1, description="torch threads (None = torch default)")
    init_from: str | None = Field(None, description="continue fitting this local VAE folder (its arch must match `arch`)")
    decoder_only: bool = Field(False, description="train the decoder (and post_quant_conv) only: the encoder, its "
                               "latent statistics and every latent already made with them stay valid (needs init_from)")
    decoder_latent_noise: float = Field(0.0, ge=0, description="decode mode + s * latents_std * N(0, I), s ~ U(0, "
                                        "this) per sample: a decoder robust to a generator's small latent errors")

    @model_validator(mode="after")
    def _decoder_only_continues(self) -> "FitVAEConfig":
        if self.decoder_only and self.init_from is None:
            raise ValueError("decoder_only needs init_from: the encoder whose latents the decoder learns to read")
        return self
    arch: TinyVAEArchitecture = TinyVAEArchitecture()


def build_tiny_vae(arch: TinyVAEArchitecture, seed: int):
    """A freshly initialised frame-wise `AutoencoderKLWan` (temporal factor 1)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)  # diffusers initialises through the global generator
    stages = len(arch.dim_mult) - 1
    vae = AutoencoderKLWan(
        base_dim=arch.base_dim, z_dim=arch.z_dim, dim_mult=list(arch.dim_mult), num_res_blocks=arch.num_res_blocks,
        temperal_downsample=[False] * stages, latents_mean=[0.0] * arch.z_dim, latents_std=[1.0] * arch.z_dim,
        scale_factor_spatial=2**stages, scale_factor_temporal=1)
    zero_past_time_taps(vae)
    return vae


def render_identity_frames(identity, num_frames: int, rng: np.random.Generator, size: int = 64,
                           fps: float = 16.0) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 (T, size, size, 3) and face boxes (T, 4) of `identity` dancing, from ray_jobs.synthetic."""
    from ray_jobs.synthetic.motion import dance_keypoints, smooth_energy
    from ray_jobs.synthetic.puppet import face_boxes, render_frames

    energy = np.clip(smooth_energy(rng.uniform(0, 1, num_frames), fps), 0, 1)
    keypoints = dance_keypoints(identity, rng, energy, fps, size, size)
    mouth = rng.uniform(0, 1, num_frames)
    return render_frames(identity, keypoints, mouth, size, size), face_boxes(keypoints)


def _identities(cfg: FitVAEConfig) -> dict[str, list]:
    """Train / held-out puppet identities; held-out = the world's held-out split (ray_jobs.synthetic)."""
    from ray_jobs.synthetic import SyntheticConfig, identity_splits, make_identity

    world = SyntheticConfig(seed=cfg.world_seed, num_identities=cfg.num_identities,
                            heldout_identities=cfg.heldout_identities)
    heldout_ids = set(identity_splits(world)["heldout"])
    main_world = [make_identity(i, cfg.world_seed) for i in range(cfg.num_identities)]
    extra = [make_identity(i, cfg.world_seed + 1000 + s)
             for s in range(cfg.extra_train_seeds) for i in range(cfg.num_identities)]
    return {"train": [p for p in main_world if p.identity_id not in heldout_ids] + extra,
            "heldout": [p for p in main_world if p.identity_id in heldout_ids]}


def _to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, 1, H, W) in [-1, 1]: N single-frame clips."""
    return uint8_to_signed(torch.from_numpy(frames).permute(0, 3, 1, 2).unsqueeze(2))


def build_frame_pool(cfg: FitVAEConfig, split: str, rng: np.random.Generator,
                     source: FrameSource | None = None) -> dict[str, torch.Tensor]:
    """Rendered {'frames': (N, 3, 1, S, S), 'faces': (N, 3, 1, s, s)} pixels of one split's identities."""
    source = source or (lambda ident, n, r: render_identity_frames(ident, n, r, cfg.size))
    frames, faces = [], []
    for identity in _identities(cfg)[split]:
        clip, boxes = source(identity, cfg.frames_per_identity, rng)
        frames.append(clip)
        faces.append(crop_faces(clip, boxes, cfg.face_size, FACE_MARGIN))
    return {"frames": _to_pixels(np.concatenate(frames)), "faces": _to_pixels(np.concatenate(faces))}


def _step_loss(vae, pixels: torch.Tensor, cfg: FitVAEConfig) -> torch.Tensor:
    """L1 + MSE reconstruction of the posterior mean (optionally noised, `decoder_latent_noise`) plus KL to N(0, I)."""
    with torch.set_grad_enabled(not cfg.decoder_only):
        posterior = vae.encode(pixels).latent_dist
    latent = posterior.mode()
    if cfg.decoder_latent_noise > 0:  # in units of the latent std the denoiser works in (normalised latents)
        std = torch.tensor(vae.config.latents_std, dtype=latent.dtype).view(1, -1, 1, 1, 1)
        scale = torch.rand(latent.shape[0], 1, 1, 1, 1) * cfg.decoder_latent_noise
        latent = latent + scale * std * torch.randn_like(latent)
    recon = vae.decode(latent).sample
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return cfg.l1_weight * F.l1_loss(recon, pixels) + cfg.mse_weight * F.mse_loss(recon, pixels) + cfg.kl_weight * kl


def _sample(pool: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    return pool[torch.randint(len(pool), (count,), generator=gen)]


def train(vae, pool: dict[str, torch.Tensor], cfg: FitVAEConfig) -> tuple[int, float]:
    """Adam with cosine decay on random frames and face crops; returns (steps done, seconds)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # latent noise
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in vae.parameters() if p.requires_grad], lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps, eta_min=cfg.lr * 0.05)
    vae.train()
    start, step = time.perf_counter(), 0
    with framewise_conv_forward(vae):
        step = _train_loop(vae, pool, cfg, optimizer, schedule, gen, start)
    vae.eval()
    return step, time.perf_counter() - start


def _train_loop(vae, pool, cfg: FitVAEConfig, optimizer, schedule, gen: torch.Generator, start: float) -> int:
    step = 0
    while step < cfg.steps and (cfg.max_seconds is None or time.perf_counter() - start < cfg.max_seconds):
        loss = _step_loss(vae, _sample(pool["frames"], cfg.batch_frames, gen), cfg)
        if cfg.batch_faces:
            loss = loss + _step_loss(vae, _sample(pool["faces"], cfg.batch_faces, gen), cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        step += 1
        if step % 25 == 0 or step == 1:
            log.info("step %d/%d loss %.5f (%.0fs)", step, cfg.steps, loss.item(), time.perf_counter() - start)
    return step


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor, batch: int = 16) -> float:
    """PSNR (dB) of mode-encode -> decode over single-frame clips (N, 3, 1, H, W)."""
    recon = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in pixels.split(batch)])
    return psnr((pixels + 1) / 2, (recon + 1) / 2)  # [-1, 1] -> [0, 1]: the same dB


@torch.no_grad()
def latent_statistics(vae, pixels: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of posterior modes over the given single-frame clips."""
    latents = torch.cat([vae.encode(p).latent_dist.mode().transpose(0, 1).flatten(1) for p in pixels], dim=1)
    return latents.mean(dim=1).tolist(), latents.std(dim=1).clamp_min(1e-4).tolist()


@torch.no_grad()
def encode_decode_ms(vae, size: int, frames: int = 8, repeats: int = 3) -> float:
    """Median milliseconds of encode+decode of one (1, 3, frames, size, size) clip."""
    clip = torch.rand(1, 3, frames, size, size) * 2 - 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vae.decode(vae.encode(clip).latent_dist.mode())
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def fit_vae(cfg: FitVAEConfig, source: FrameSource | None = None) -> dict:
    """Fit, measure, save the diffusers folder and FIT_REPORT.json under cfg.out; return the report."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng([cfg.seed, 0xFA5E])
    pools = {split: build_frame_pool(cfg, split, rng, source) for split in ("train", "heldout")}
    vae, prior = _initial_vae(cfg)
    steps, seconds = train(vae, pools["train"], cfg)
    if not past_time_taps_are_zero(vae):  # Adam never moves a parameter whose gradient is always 0
        raise RuntimeError("past-time taps moved during training: the VAE is no longer frame-wise")
    eval_gen = np.random.default_rng(cfg.seed)
    report = {"steps": steps, "seconds": round(seconds, 1), "config": cfg.model_dump(),
              "total_steps": steps + prior.get("total_steps", prior.get("steps", 0)),
              "total_seconds": round(seconds + prior.get("total_seconds", prior.get("seconds", 0.0)), 1),
              "history": _history(prior)}
    for split, pool in pools.items():
        for kind in ("frames", "faces"):
            pick = torch.from_numpy(eval_gen.choice(len(pool[kind]), min(cfg.eval_frames, len(pool[kind])), replace=False))
            report[f"psnr_{split}_{kind}"] = round(reconstruction_psnr(vae, pool[kind][pick]), 2)
    if not cfg.decoder_only:  # a new encoder: new latent statistics (decoder-only keeps the loaded ones)
        mean, std = latent_statistics(vae, [pools["train"]["frames"][:256], pools["train"]["faces"][:256]])
        vae.register_to_config(latents_mean=mean, latents_std=std)
    report["encode_decode_ms_8x64x64"] = round(encode_decode_ms(vae, cfg.size), 1)
    report["parameters"] = sum(p.numel() for p in vae.parameters())
    out = Path(cfg.out)
    vae.save_pretrained(str(out))
    (out / "FIT_REPORT.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("saved %s: %s", out, {k: v for k, v in report.items() if k != "config"})
    return report


def _history(prior: dict) -> list[dict]:
    """Earlier fits this one continues, oldest first: steps, seconds, config (to reproduce the chain)."""
    if not prior:
        return []
    return prior.get("history", []) + [{key: prior[key] for key in ("steps", "seconds", "config") if key in prior}]


def _initial_vae(cfg: FitVAEConfig):
    """(vae, prior FIT_REPORT dict): fresh from `cfg.arch`, or loaded from `cfg.init_from` (arch checked)."""
    if cfg.init_from is None:
        return build_tiny_vae(cfg.arch, cfg.seed), {}
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(cfg.init_from)
    loaded = {key: vae.config[key] for key in ("base_dim", "z_dim", "dim_mult", "num_res_blocks")}
    if {**loaded, "dim_mult": list(loaded["dim_mult"])} != cfg.arch.model_dump():
        raise ValueError(f"init_from {cfg.init_from} has arch {loaded}, config asks for {cfg.arch.model_dump()}")
    if not past_time_taps_are_zero(vae):
        raise ValueError(f"init_from {cfg.init_from} is not frame-wise (past-time taps are non-zero)")
    report_path = Path(cfg.init_from) / "FIT_REPORT.json"
    return vae, (json.loads(report_path.read_text()) if report_path.exists() else {})


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    shortcuts = argparse.ArgumentParser(add_help=False)
    for flag in ("--out", "--steps", "--seed", "--max-seconds"):
        shortcuts.add_argument(flag)
    known, rest = shortcuts.parse_known_args(argv)
    overrides = [f"{key}={value}" for key, value in vars(known).items() if value is not None]
    rest = list(rest) + [item for pair in (("--set", o) for o in overrides) for item in pair]
    cfg = parse_job_config(FitVAEConfig, rest, description=__doc__)
    report = fit_vae(cfg)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
