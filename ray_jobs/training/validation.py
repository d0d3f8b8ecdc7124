"""The validation sample the training jobs write at checkpoints: one held-out clip, generated and scored.

Shared by the teacher and distillation jobs (each passes the `SamplerSpec` its model card will carry).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.storage import Storage
from model.conditions import Conditions
from model.sampling import SamplerSpec

__all__ = ["validation_sample"]


def validation_sample(model: torch.nn.Module, vae_path: str | None, storage: Storage, clip: dict[str, np.ndarray],
                      out_dir: Path, spec: SamplerSpec) -> dict[str, float]:
    """Generate the clip from its conditions with ``spec``; write sample.mp4 and ground_truth.mp4; metrics vs truth.

    PSNR, SSIM and motion error of the sample, and the same for the copy-the-reference baseline
    (every frame = the reference frame) on the same clip, so a run's metrics show when it beats it.
    """
    from artifacts.models import load_vae
    from core.media import mux_mp4
    from model.generate import generate
    from model.metrics import motion_error, psnr, ssim

    model.eval()
    try:
        device = next(model.parameters()).device
        batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in clip.items() if isinstance(v, np.ndarray)}
        cond = Conditions.from_batch(batch, device, torch.float32)
        truth = np.asarray(clip["frames"])
        result = generate(model, load_vae(vae_path, storage, device), cond, num_frames=truth.shape[0],
                          height=truth.shape[1], width=truth.shape[2], spec=spec, seed=0)
    finally:
        model.train()
    frames = result.frames.numpy()
    audio = np.asarray(clip["audio"], dtype=np.float32) if bool(clip.get("has_audio", False)) else None
    fps = float(clip.get("fps", 16))
    mux_mp4(frames, audio, fps, out_dir / "sample.mp4")
    mux_mp4(truth, audio, fps, out_dir / "ground_truth.mp4")
    values = {"psnr": psnr(frames, truth), "ssim": ssim(frames, truth), "motion_error": motion_error(frames, truth),
              "nfe": float(result.nfe)}
    if "ref_frame" in clip:
        copied = np.repeat(np.asarray(clip["ref_frame"], dtype=np.uint8)[None], truth.shape[0], axis=0)
        values.update({"copy_ref_psnr": psnr(copied, truth), "copy_ref_ssim": ssim(copied, truth),
                       "copy_ref_motion_error": motion_error(copied, truth)})
    (out_dir / "metrics.json").write_text(json.dumps(values))
    return values
