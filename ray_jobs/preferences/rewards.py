"""Preference rewards for TPO pairs (AlignHuman): a registry of scorers, higher = better.

A reward is ``fn(generated (T, H, W, 3) uint8, clip: Mapping[str, np.ndarray]) -> float``; ``clip``
holds the shard columns of the condition (docs/design.md). Each reward belongs to one dimension:
``motion`` (dynamics, decided at high noise) or ``fidelity`` (appearance and structure, decided at low
noise). The job config names one reward per dimension (`PreferencesConfig.rewards`).

Built in, with ground truth (the synthetic world: `frames`, `motion_mask`, `face_boxes` are exact):
* ``gt_motion``: minus the mean |Δgenerated - Δtruth| of consecutive-frame luma differences
  (`model.metrics.motion_error`, in [0, 1] units of pixel value): 0 is perfect, a frozen video scores
  minus the mean true motion.
* ``gt_fidelity``: mean of (PSNR in the static region / 40 dB) and (SSIM in the face box): appearance
  where nothing moves (inverse motion mask, so motion differences are not punished twice) and in the
  face, where identity lives. Unitless, about [0, 1].

Without ground truth (real data; only the conditions: `ref_frame`, `pose`, `face_boxes`):
* ``pose_following`` (motion): Pearson r between where the generated video changes and where the
  driving pose maps change (both |Δframe| blurred by 4x4 pooling): it follows the pose when the two
  change in the same places; a frozen video scores 0.
* ``motion_smoothness`` (motion): minus the jerk ratio mean|Δ²x| / (mean|Δx| + 1e-3): flicker
  raises it; note it does not reward *amount* of motion, so pair it with pose_following on real data.
* ``sharpness`` (fidelity): minus |log(Laplacian variance of generated / of the reference frame)|:
  0 when the video is as sharp as the reference, negative when blurrier or noisier.
* ``ref_face_consistency`` (fidelity): mean SSIM between each frame's face box and the reference
  frame's face box (resized to it), the identity-preservation proxy without a face-ID network.
We write these small scorers ourselves (numpy/torch) because the usual ones (Sync-C, ArcFace,
DOVER) need pretrained networks that cannot be downloaded here. A user's reward is named in the
config by import path (``"my_pkg.rewards:lip_sync"``, optionally with a ``dimension`` attribute that
is then checked): it is imported in every actor, where a driver-side registration would not exist.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from core.imports import import_object, is_import_path
from model.metrics import luma, motion_error, ssim

__all__ = ["RewardFn", "DIMENSIONS", "REWARDS", "register_reward", "get_reward", "reward_dimension"]

Dimension = Literal["motion", "fidelity"]
DIMENSIONS: tuple[str, ...] = ("motion", "fidelity")
RewardFn = Callable[[np.ndarray, Mapping[str, np.ndarray]], float]

REWARDS: dict[str, tuple[str, RewardFn]] = {}


def register_reward(name: str, dimension: Dimension, fn: RewardFn) -> None:
    """Add a reward under ``name`` for ``dimension``; loud on a duplicate name."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}, got {dimension!r}")
    if name in REWARDS:
        raise KeyError(f"reward {name!r} is already registered")
    REWARDS[name] = (dimension, fn)


def get_reward(name: str) -> RewardFn:
    """A built-in reward by name, or the user's by import path ``"package.module:function"`` (works in Ray
    actors, where a reward registered on the driver does not exist)."""
    if is_import_path(name):
        fn = import_object(name)
        if not callable(fn):
            raise TypeError(f"reward {name!r} is not callable")
        return fn
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; built in: {sorted(REWARDS)}; or give 'package.module:function'")
    return REWARDS[name][1]


def reward_dimension(name: str) -> str | None:
    """The reward's dimension: a built-in's, an imported function's ``dimension`` attribute, else None (unsaid)."""
    fn = get_reward(name)
    if is_import_path(name):
        return getattr(fn, "dimension", None)
    return REWARDS[name][0]


def _pixel_mask(motion_mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Latent-resolution motion mask (T, h, w) -> pixel resolution (T, H, W), nearest."""
    mask = torch.as_tensor(np.asarray(motion_mask, dtype=np.float32))[:, None]
    return F.interpolate(mask, size=(height, width), mode="nearest")[:, 0].numpy()


def _box_crops(video: np.ndarray, boxes: np.ndarray, size: int = 16) -> np.ndarray:
    """Per-frame crops of (T, H, W, 3) at boxes (T, 4) (x0, y0, x1, y1), resized to size x size; uint8."""
    crops = []
    for frame, box in zip(video, boxes):
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = max(min(x1, frame.shape[1]), x0 + 1), max(min(y1, frame.shape[0]), y0 + 1)
        patch = torch.as_tensor(frame[y0:y1, x0:x1]).permute(2, 0, 1)[None].float()
        crops.append(F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)[0])
    return torch.stack(crops).permute(0, 2, 3, 1).clamp(0, 255).round().to(torch.uint8).numpy()


def gt_motion(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """-motion_error(generated, truth): agreement of frame differences with the true ones (0 = exact)."""
    return -motion_error(generated, np.asarray(clip["frames"]))


def static_psnr(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """PSNR (dB) against the truth over pixels the motion mask marks static (weight 1 - mask)."""
    truth = np.asarray(clip["frames"])
    static = 1.0 - _pixel_mask(clip["motion_mask"], truth.shape[1], truth.shape[2])
    err = (luma(generated) - luma(truth)) ** 2
    mse = float((err * static).sum() / max(static.sum(), 1.0))
    return float(10.0 * np.log10(1.0 / max(mse, 1e-10)))


def face_ssim(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """SSIM of the face-box crops (truth boxes) of generated vs truth."""
    boxes = np.asarray(clip["face_boxes"])
    return ssim(_box_crops(generated, boxes), _box_crops(np.asarray(clip["frames"]), boxes), window=7)


def gt_fidelity(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """Mean of static-region PSNR / 40 dB and face-box SSIM against the truth."""
    return 0.5 * (static_psnr(generated, clip) / 40.0 + face_ssim(generated, clip))


def _change_map(video: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) -> (T-1, H/4, W/4) |Δluma| average-pooled 4x4 (where the video changes)."""
    diff = torch.as_tensor(np.abs(np.diff(luma(video), axis=0)), dtype=torch.float32)[:, None]
    return F.avg_pool2d(diff, 4)[:, 0].numpy()


def pose_following(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """Pearson r between the generated video's change map and the driving pose maps' change map (no truth)."""
    gen, pose = _change_map(generated).ravel(), _change_map(np.asarray(clip["pose"])).ravel()
    if gen.std() < 1e-8 or pose.std() < 1e-8:
        return 0.0
    return float(np.corrcoef(gen, pose)[0, 1])


def motion_smoothness(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """-mean|Δ²x| / (mean|Δx| + 1e-3) over luma: flicker and jitter lower it (no truth)."""
    y = luma(generated)
    first, second = np.abs(np.diff(y, axis=0)), np.abs(np.diff(y, n=2, axis=0))
    return -float(second.mean() / (first.mean() + 1e-3))


def _laplacian_var(video: np.ndarray) -> float:
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    y = torch.as_tensor(luma(video), dtype=torch.float32)[:, None]
    return float(F.conv2d(y, kernel).var())


def sharpness(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """-|log(Laplacian variance of generated / of the reference frame)| (no truth; 0 = as sharp as the reference)."""
    ref = np.asarray(clip["ref_frame"])[None]
    return -abs(float(np.log((_laplacian_var(generated) + 1e-8) / (_laplacian_var(ref) + 1e-8))))


def ref_face_consistency(generated: np.ndarray, clip: Mapping[str, np.ndarray]) -> float:
    """Mean SSIM between each frame's face box and the reference frame's face box (no truth)."""
    boxes = np.asarray(clip["face_boxes"])
    gen = _box_crops(generated, boxes)
    ref = _box_crops(np.asarray(clip["ref_frame"])[None], boxes[:1])
    return ssim(gen, np.repeat(ref, gen.shape[0], axis=0), window=7)


for _name, _dim, _fn in (
    ("gt_motion", "motion", gt_motion), ("gt_fidelity", "fidelity", gt_fidelity),
    ("static_psnr", "fidelity", static_psnr), ("face_ssim", "fidelity", face_ssim),
    ("pose_following", "motion", pose_following), ("motion_smoothness", "motion", motion_smoothness),
    ("sharpness", "fidelity", sharpness), ("ref_face_consistency", "fidelity", ref_face_consistency),
):
    register_reward(_name, _dim, _fn)
