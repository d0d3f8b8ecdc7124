"""The per-clip metrics of model.metrics on cases with known answers (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import (PCK_FRACTION, flicker, keypoint_distances, lip_sync, motion_error, pck, pck_threshold,
                           pose_error, psnr, ssim)


def _moving_clip(frames: int = 6) -> np.ndarray:
    """A static textured background with a bright square moving 3 px right per frame: (T, 32, 32, 3) uint8."""
    ys, xs = np.mgrid[0:32, 0:32]
    background = (80 + 40 * np.sin(xs / 5.0) + 20 * np.cos(ys / 7.0)).astype(np.uint8)
    video = np.repeat(np.repeat(background[None, :, :, None], 3, axis=3), frames, axis=0).copy()
    for t in range(frames):
        video[t, 10:18, 2 + 3 * t:10 + 3 * t] = 240
    return video


def test_pose_error_and_pck_on_known_offsets():
    truth = np.zeros((2, 17, 3))
    truth[..., 2] = 1.0
    detected = truth[..., :2].copy()
    detected[0, :, 0] += 3.0  # frame 0: every point 3 px off
    detected[1, :, 1] += 4.0  # frame 1: every point 4 px off
    assert pose_error(detected, truth) == pytest.approx(3.5)
    assert pck_threshold(64) == pytest.approx(PCK_FRACTION * 64) == pytest.approx(3.2)
    assert pck(detected, truth, height=64) == pytest.approx(0.5)  # 3 px within 3.2, 4 px not
    assert pck(detected, truth, height=100) == pytest.approx(1.0)  # 5 px radius
    truth[1, :, 2] = 0.0  # frame 1 invisible: ignored
    assert pose_error(detected, truth) == pytest.approx(3.0)
    assert np.isnan(keypoint_distances(detected, truth)[1]).all()
    truth[..., 2] = 0.0
    assert math.isnan(pose_error(detected, truth)) and math.isnan(pck(detected, truth, 64))
    with pytest.raises(ValueError, match="shape mismatch"):
        pose_error(detected[:, :5], truth)


def test_lip_sync_is_pearson_and_nan_safe():
    truth = np.array([0.0, 0.5, 1.0, 0.2, 0.8, 0.1])
    assert lip_sync(truth, truth) == pytest.approx(1.0)
    assert lip_sync(0.3 * truth + 0.1, truth) == pytest.approx(1.0)  # scale-free
    assert lip_sync(1 - truth, truth) == pytest.approx(-1.0)
    assert lip_sync(np.full(6, 0.4), truth) == 0.0  # a still mouth follows nothing
    assert math.isnan(lip_sync(truth, np.full(6, 0.5)))  # nothing to follow
    with_nan = truth.copy()
    with_nan[2] = np.nan
    assert lip_sync(truth, with_nan) == pytest.approx(1.0)  # NaN frames dropped
    assert math.isnan(lip_sync(truth[:2], truth[:2]))


def test_flicker_sees_only_static_pixels():
    truth = _moving_clip()
    assert flicker(truth, truth) == 0.0  # the exact truth is perfectly steady where it is static
    rng = np.random.default_rng(0)
    noisy = np.clip(truth.astype(np.int16) + rng.integers(-12, 13, truth.shape), 0, 255).astype(np.uint8)
    assert flicker(noisy, truth) > 0.02
    copied = np.repeat(truth[:1], len(truth), axis=0)  # a frozen video: no flicker, but no motion either
    assert flicker(copied, truth) == 0.0
    assert motion_error(copied, truth) > motion_error(truth, truth) == 0.0
    all_moving = (np.arange(4)[:, None, None, None] * 30 * np.ones((4, 8, 8, 3))).astype(np.uint8)
    assert math.isnan(flicker(all_moving, all_moving))  # no static pixel: undefined


def test_psnr_ssim_unchanged_on_identity():
    truth = _moving_clip()
    assert psnr(truth, truth) == float("inf")
    assert ssim(truth, truth) == pytest.approx(1.0)
