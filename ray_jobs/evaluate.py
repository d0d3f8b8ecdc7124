"""Evaluation against the synthetic world's exact ground truth, shared by the pipeline and benchmarks.

For every variant (a model + a sampler setting) and every held-out clip: generate from the clip's
conditions, compare with the exact ground-truth frames (re-rendered from the sidecar when it is
reachable, else the clip's decoded frames), and report PSNR, SSIM, motion error, audio-mouth sync,
NFE and end-to-end seconds (VAE decode included). The copy-the-reference baseline (every frame = the
reference frame) is always reported: a model that does not clearly beat it on motion error has not
learned motion. The VAE round trip (the clip's own latents decoded, `Variant(..., sampler=VAE_ROUND_TRIP)`)
is the ceiling of any model that generates in this latent space.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from model.conditions import Conditions
from model.metrics import EXTRA_METRICS, motion_error, mouth_sync, psnr, ssim
from model.storage import Storage

__all__ = ["VAE_ROUND_TRIP", "Variant", "heldout_clips", "ground_truth", "evaluate", "summarize", "write_grid"]

log = logging.getLogger(__name__)

VAE_ROUND_TRIP = "vae_round_trip"  # a model-less Variant's sampler: decode the clip's own latents


@dataclass
class Variant:
    """One row of the evaluation table: a model and how it samples."""

    name: str
    model: torch.nn.Module | None  # None = copy-the-reference baseline (or the VAE round trip, see sampler)
    sampler: str = "euler_cfg"
    sampler_kwargs: dict[str, Any] = field(default_factory=dict)
    drop_for_uncond: tuple[str, ...] = ("pose", "audio", "face")


def heldout_clips(data_uri: str, storage: Storage, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` held-out clips (train clips if the data has no held-out split), as numpy dicts."""
    from ray_jobs.training.driver import take_clips

    return take_clips(data_uri, storage, "heldout", limit)


def ground_truth(clip: dict[str, Any], storage: Storage) -> np.ndarray:
    """Exact frames from the puppet renderer when the source sidecar is readable, else decoded frames."""
    from ray_jobs.synthetic.world import ground_truth_frames

    frames = np.asarray(clip["frames"])
    sidecar_uri = str(clip.get("source", "")).rsplit(".", 1)[0] + ".json"
    try:
        sidecar = storage.read_json(sidecar_uri)
    except (OSError, ValueError):
        return frames
    return ground_truth_frames(sidecar, int(clip["start_frame"]), frames.shape[0], frames.shape[1], frames.shape[2])


def _mouth_boxes(face_boxes: np.ndarray) -> np.ndarray:
    """Lower half of each face box, where the puppet's mouth is."""
    boxes = np.asarray(face_boxes, dtype=np.float64).copy()
    boxes[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2
    return boxes


def _generate(variant: Variant, clip: dict[str, Any], vae: Any, seed: int) -> tuple[np.ndarray, int, float]:
    from model.generate import generate

    truth = np.asarray(clip["frames"])
    if variant.model is None and variant.sampler == VAE_ROUND_TRIP:
        from model.vae import video_to_uint8

        start = time.perf_counter()
        video = vae.decode(torch.as_tensor(np.asarray(clip["latents"]), dtype=torch.float32)[None].to(vae.device))
        return video_to_uint8(video)[0].numpy(), 0, time.perf_counter() - start
    if variant.model is None:
        start = time.perf_counter()
        return np.repeat(np.asarray(clip["ref_frame"])[None], truth.shape[0], axis=0), 0, time.perf_counter() - start
    device = next(variant.model.parameters()).device
    batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in clip.items()
             if isinstance(v, np.ndarray) and v.dtype != object}
    cond = Conditions.from_batch(batch, device, torch.float32)
    result = generate(variant.model, vae, cond, cond.drop(set(variant.drop_for_uncond)), num_frames=truth.shape[0],
                      height=truth.shape[1], width=truth.shape[2], sampler=variant.sampler, seed=seed,
                      **variant.sampler_kwargs)
    return result.frames.numpy(), result.nfe, result.seconds


def evaluate(variants: list[Variant], clips: list[dict[str, Any]], vae: Any, storage: Storage,
             seed: int = 0, keep_frames: bool = True) -> dict[str, Any]:
    """Metrics per variant and clip; returns {"rows": [...], "frames": {variant: [clip frames]}}."""
    rows, frames = [], {v.name: [] for v in variants}
    truths = [ground_truth(c, storage) for c in clips]
    for variant in variants:
        if variant.model is not None:
            variant.model.eval()
        for index, (clip, truth) in enumerate(zip(clips, truths)):
            with torch.no_grad():
                pred, nfe, seconds = _generate(variant, clip, vae, seed + index)
            rows.append(_clip_row(variant.name, index, pred, truth, clip, nfe, seconds))
            if keep_frames:
                frames[variant.name].append(pred)
        log.info("evaluated %s on %d clips", variant.name, len(clips))
    return {"rows": rows, "frames": frames, "truth": truths}


def _clip_row(name: str, index: int, pred: np.ndarray, truth: np.ndarray, clip: dict, nfe: int, seconds: float) -> dict:
    envelope = np.nan_to_num(np.asarray(clip.get("mouth_openness", np.zeros(len(truth))), dtype=np.float64))
    row = {"variant": name, "clip": index, "psnr": psnr(pred, truth), "ssim": ssim(pred, truth),
           "motion_error": motion_error(pred, truth),
           "mouth_sync": mouth_sync(pred, _mouth_boxes(clip["face_boxes"]), envelope),
           "nfe": nfe, "seconds": seconds}
    row.update({name_: fn(pred, truth) for name_, fn in EXTRA_METRICS.items()})
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each metric per variant (NaN-aware for mouth sync), in first-seen order."""
    table = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        summary = {"variant": name, "clips": len(mine)}
        for key in [k for k in mine[0] if k not in ("variant", "clip")]:
            values = np.asarray([r[key] for r in mine], dtype=np.float64)
            summary[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        table.append(summary)
    return table


def write_grid(frames: dict[str, list[np.ndarray]], truths: list[np.ndarray], out_path: Path, fps: float,
               columns: list[str] | None = None) -> Path:
    """MP4 grid: one row per clip, columns ground truth then each variant (labels in report)."""
    from model.media import mux_mp4

    names = columns or list(frames)
    rows = [np.concatenate([truth] + [frames[n][i] for n in names], axis=2) for i, truth in enumerate(truths)]
    mux_mp4(np.concatenate(rows, axis=1), None, fps, out_path)
    return out_path


def save_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


Loader = Callable[[], torch.nn.Module]
