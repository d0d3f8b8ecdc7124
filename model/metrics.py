"""Video quality metrics against exact ground truth: PSNR, SSIM, motion error, audio-mouth sync.

Pure functions on uint8 or float videos shaped (T, H, W, 3). SSIM is the standard Gaussian-window
form (Wang et al. 2004, eq. 13; window 11, σ 1.5, K1 0.01, K2 0.03) on luma, written here in torch
because no image-metrics package is in our dependency set. FVD/LPIPS need pretrained networks that
cannot be downloaded here: `register_metric` is the hook for a user who has the weights.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "motion_error", "mouth_sync", "frame_differences", "register_metric", "EXTRA_METRICS"]

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


def mouth_sync(pred: np.ndarray, mouth_boxes: np.ndarray, audio_envelope: np.ndarray) -> float:
    """Pearson r between mouth-region luma change per frame and the audio envelope per frame.

    ``mouth_boxes`` (T, 4) pixel boxes (x0, y0, x1, y1); ``audio_envelope`` (T,). NaN when either
    signal is constant (e.g. a static video), which callers report as no sync.
    """
    diffs = frame_differences(pred)
    change = []
    for t in range(diffs.shape[0]):
        x0, y0, x1, y1 = (int(round(v)) for v in mouth_boxes[t + 1])
        region = diffs[t, max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)]
        change.append(float(region.mean()) if region.numel() else 0.0)
    env = np.abs(np.diff(np.asarray(audio_envelope, dtype=np.float64)))
    change_arr = np.asarray(change)
    if change_arr.std() < 1e-12 or env.std() < 1e-12:
        return float("nan")
    return float(np.corrcoef(change_arr, env)[0, 1])
