"""Video quality metrics against exact ground truth: PSNR, SSIM, motion error, pose error, PCK, lip sync, flicker.

Pure functions. Pixel metrics take uint8 or float videos shaped (T, H, W, 3):
- `psnr`, `ssim`: appearance per frame;
- `motion_error`: |Δpred - Δtruth| of frame differences, which mixes pose-following with flicker;
- `flicker`: frame-to-frame change of the prediction inside pixels static in the truth.
Perception metrics take what a perception model (`model.perception`) detects on the video under
test and the clip's exact labels:
- `pose_error` (mean px) and `pck` (share within 5 % of the frame height) on keypoints (T, K, 2|3);
- `lip_sync`: Pearson r of detected vs true mouth openness (T,).

SSIM is the standard Gaussian-window form (Wang et al. 2004, eq. 13; window 11, σ 1.5, K1 0.01,
K2 0.03) on luma, written here in torch because no image-metrics package is in our dependency set. FVD/LPIPS need pretrained networks that
cannot be downloaded here: `register_metric` is the hook for a user who has the weights.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "motion_error", "frame_differences", "keypoint_distances", "pose_error", "pck",
           "pck_threshold", "lip_sync", "static_mask", "flicker", "register_metric", "EXTRA_METRICS", "PCK_FRACTION",
           "STATIC_THRESHOLD"]

PCK_FRACTION = 0.05  # PCK radius as a fraction of the frame height
STATIC_THRESHOLD = 2.0 / 255.0  # luma change (in [0, 1]) below which a true pixel counts as static

EXTRA_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {}


def register_metric(name: str, fn: Callable[[np.ndarray, np.ndarray], float]) -> None:
    """Add a metric (e.g. FVD or LPIPS with local weights) computed by the evaluations on (pred, truth)."""
    EXTRA_METRICS[name] = fn


def _as_float(video: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) uint8 or float in [0, 1] -> float64 tensor in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(video))
    if tensor.dtype == torch.uint8:
        return tensor.double() / 255.0
    return tensor.double()


def psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole clip (T, H, W, 3), peak 1.0."""
    a, b = _as_float(pred), _as_float(truth)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def luma(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """(T, H, W, 3) uint8 (or float in [0, 1]) -> (T, H, W) float64 BT.601 luma in [0, 1]."""
    return _luma(_as_float(video))[:, 0].numpy()


def _luma(video: torch.Tensor) -> torch.Tensor:
    """(T, H, W, 3) -> (T, 1, H, W) ITU-R BT.601 luma."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=video.dtype)
    return (video * weights).sum(-1).unsqueeze(1)


def ssim(pred: np.ndarray, truth: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM over frames (Wang et al. 2004, eq. 13) on luma; (T, H, W, 3) inputs."""
    a, b = _luma(_as_float(pred)), _luma(_as_float(truth))
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    coords = torch.arange(window, dtype=a.dtype) - (window - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    blur = lambda x: F.conv2d(x, kernel)  # noqa: E731 - valid-region filtering, as the reference code
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def frame_differences(video: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) -> (T-1, H, W) mean absolute luma change between consecutive frames."""
    luma = _luma(_as_float(video))[:, 0]
    return (luma[1:] - luma[:-1]).abs()


def motion_error(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean |Δpred - Δtruth| of consecutive-frame luma differences: 0 when the motion matches exactly.

    A static video (e.g. copy-the-reference) scores the mean magnitude of the true motion.
    """
    dp, dt = frame_differences(pred), frame_differences(truth)
    if dp.shape != dt.shape:
        raise ValueError(f"shape mismatch {tuple(dp.shape)} vs {tuple(dt.shape)}")
    return float((dp - dt).abs().mean())


def _truth_xy(truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True keypoints (T, K, 2) or (T, K, 3) -> (xy (T, K, 2), visible (T, K) bool: confidence > 0 and finite)."""
    truth = np.asarray(truth, dtype=np.float64)
    xy = truth[..., :2]
    visible = np.isfinite(xy).all(-1)
    if truth.shape[-1] > 2:
        visible &= np.nan_to_num(truth[..., 2]) > 0
    return xy, visible


def keypoint_distances(detected: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Euclidean pixel distance (T, K) of detected (T, K, 2) to true (T, K, 2|3) keypoints; NaN where not visible."""
    xy, visible = _truth_xy(truth)
    detected = np.asarray(detected, dtype=np.float64)[..., :2]
    if detected.shape != xy.shape:
        raise ValueError(f"shape mismatch {detected.shape} vs {xy.shape}")
    distances = np.linalg.norm(detected - xy, axis=-1)
    return np.where(visible, distances, np.nan)


def pose_error(detected: np.ndarray, truth: np.ndarray) -> float:
    """Mean pixel distance of detected keypoints (T, K, 2) to the true ones (T, K, 2|3) over visible points.

    ``detected`` comes from a perception model run on the video under test (`model.perception`),
    ``truth`` from the clip's exact labels, both in the video's own pixels. NaN when nothing is visible.
    """
    distances = keypoint_distances(detected, truth)
    return float(np.nanmean(distances)) if np.isfinite(distances).any() else float("nan")


def pck_threshold(height: int, fraction: float = PCK_FRACTION) -> float:
    """PCK radius in pixels: ``fraction`` of the frame height (5 % by default: 3.2 px at 64x64)."""
    return float(fraction) * float(height)


def pck(detected: np.ndarray, truth: np.ndarray, height: int, fraction: float = PCK_FRACTION) -> float:
    """Percentage of correct keypoints: share of visible keypoints within ``fraction`` x ``height`` px of the truth.

    In [0, 1]; shapes as `pose_error`; NaN when nothing is visible.
    """
    distances = keypoint_distances(detected, truth)
    finite = distances[np.isfinite(distances)]
    return float((finite <= pck_threshold(height, fraction)).mean()) if finite.size else float("nan")


def lip_sync(detected_openness: np.ndarray, true_openness: np.ndarray) -> float:
    """Pearson r of the detected mouth openness (T,) on the video under test against the true track (T,).

    The role SyncNet plays in the papers, measured against exact labels: 1 when the mouth opens and
    closes with the truth. NaN-safe: frames where either value is NaN are dropped; NaN when the
    truth is constant or fewer than 3 frames are left (nothing to follow); 0.0 when the detected
    openness is constant (a still mouth, e.g. copy-the-reference, follows nothing).
    """
    detected = np.asarray(detected_openness, dtype=np.float64).reshape(-1)
    truth = np.asarray(true_openness, dtype=np.float64).reshape(-1)
    if detected.shape != truth.shape:
        raise ValueError(f"shape mismatch {detected.shape} vs {truth.shape}")
    keep = np.isfinite(detected) & np.isfinite(truth)
    detected, truth = detected[keep], truth[keep]
    if detected.size < 3 or truth.std() < 1e-9:
        return float("nan")
    if detected.std() < 1e-6:
        return 0.0
    return float(np.corrcoef(detected, truth)[0, 1])


def static_mask(truth: np.ndarray, threshold: float = STATIC_THRESHOLD) -> torch.Tensor:
    """(T-1, H, W) bool: pixels whose true luma changes by less than ``threshold`` (in [0, 1]) between frames."""
    return frame_differences(truth) < threshold


def flicker(pred: np.ndarray, truth: np.ndarray, threshold: float = STATIC_THRESHOLD) -> float:
    """Mean absolute frame-to-frame luma change (in [0, 1]) of ``pred`` inside pixels static in ``truth``.

    Both (T, H, W, 3). Static = true luma change below ``threshold`` (2/255 by default) between the
    same two frames. The truth itself scores below ``threshold`` (0 on an exactly rendered static
    background); a model that repaints the background differently each frame scores its change.
    Unlike `motion_error` it is blind to the moving figure, so it separates flicker from motion.
    NaN when no pixel is static.
    """
    dp = frame_differences(pred)
    mask = static_mask(truth, threshold)
    if dp.shape != mask.shape:
        raise ValueError(f"shape mismatch {tuple(dp.shape)} vs {tuple(mask.shape)}")
    return float(dp[mask].mean()) if bool(mask.any()) else float("nan")
