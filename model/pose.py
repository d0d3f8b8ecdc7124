"""COCO-17 keypoints and the rendered skeleton maps the model takes as its pose condition.

The pose condition is an RGB image per frame (T, H, W, 3) uint8 with one fixed color per limb, as
in OpenPose/DWPose-style conditioning (Animate Anyone, UniAnimate): the denoiser's own conv encodes
it, so the drawing must be identical in preprocessing, serving and the synthetic world.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["COCO17_NAMES", "COCO17_LIMBS", "LIMB_COLORS", "JOINT_COLOR", "POSE_RENDER_COLUMNS", "render_pose",
           "render_pose_frame", "render_pose_batch", "transform_points"]

# Batch columns from which a worker renders the pose maps of shards written without them
# (`store_pixels: false`): the keypoints, and the canvas and threshold preprocessing drew with, added
# by `artifacts.shards.read_shards` from the data card (`model.conditions.Conditions.from_batch`).
POSE_RENDER_COLUMNS: tuple[str, ...] = ("keypoints", "pose_height", "pose_width", "pose_conf_threshold")

COCO17_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)

# (a, b) joint indices of each drawn limb; left side first, then right, then the trunk and head.
COCO17_LIMBS: tuple[tuple[int, int], ...] = (
    (5, 7), (7, 9), (11, 13), (13, 15),  # left arm, left leg
    (6, 8), (8, 10), (12, 14), (14, 16),  # right arm, right leg
    (5, 6), (11, 12), (5, 11), (6, 12),  # shoulders, hips, torso sides
    (0, 1), (0, 2), (1, 3), (2, 4),  # face
)

# One RGB color per limb (same order as COCO17_LIMBS): distinct hues so left/right are separable.
LIMB_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 128, 0), (255, 0, 170), (170, 0, 255),
    (0, 255, 0), (128, 255, 0), (0, 170, 255), (0, 85, 255),
    (255, 255, 0), (0, 255, 255), (255, 85, 85), (85, 255, 85),
    (255, 255, 255), (200, 200, 200), (160, 160, 255), (160, 255, 160),
)
JOINT_COLOR: tuple[int, int, int] = (255, 255, 255)

_SHIFT = 4  # cv2 sub-pixel bits: coordinates are drawn at 1/16 px precision


def _thickness(height: int, width: int) -> int:
    """Line thickness: 2 px at 64x64 (visible after VAE downsampling), DWPose's 4 px at 512."""
    return max(2, int(round(min(height, width) / 128)))


def _fixed_point(keypoints: np.ndarray, conf_threshold: float) -> tuple[list, list]:
    """(..., 17, 3) keypoints -> nested lists of cv2 fixed-point (x, y) ints and visibility flags.

    Python lists once for all frames: cv2 wants Python ints, and converting per call (or even
    per frame) dominated the rendering cost.
    """
    visible = (keypoints[..., 2] >= conf_threshold).tolist()
    points = np.round(np.nan_to_num(keypoints[..., :2]) * (1 << _SHIFT)).astype(np.int64).tolist()
    return points, visible


def _draw_skeleton(canvas: np.ndarray, points: list, visible: list) -> None:
    """Draw one frame's limbs, then joints, into `canvas` (H, W, 3) uint8 in place."""
    thickness = _thickness(*canvas.shape[:2])
    joint_radius = int(round((thickness / 2 + 0.5) * (1 << _SHIFT)))  # joints a bit wider than limbs
    for (a, b), color in zip(COCO17_LIMBS, LIMB_COLORS):
        if visible[a] and visible[b]:
            cv2.line(canvas, tuple(points[a]), tuple(points[b]), color, thickness, cv2.LINE_AA, _SHIFT)
    for joint, seen in enumerate(visible):
        if seen:
            cv2.circle(canvas, tuple(points[joint]), joint_radius, JOINT_COLOR, -1, cv2.LINE_AA, _SHIFT)


def render_pose_frame(keypoints: np.ndarray, height: int, width: int, conf_threshold: float = 0.3) -> np.ndarray:
    """Draw one (17, 3) [x, y, conf] pixel skeleton on black; returns uint8 (H, W, 3)."""
    canvas = np.zeros((height, width, 3), np.uint8)
    _draw_skeleton(canvas, *_fixed_point(np.asarray(keypoints, np.float64), conf_threshold))
    return canvas


def render_pose(keypoints: np.ndarray, height: int, width: int, conf_threshold: float = 0.3,
                out: np.ndarray | None = None) -> np.ndarray:
    """Render COCO-17 keypoints (T, 17, 3) [x, y, conf] in pixels to skeleton maps uint8 (T, H, W, 3).

    Joints with conf < conf_threshold, and limbs touching them, are not drawn. `out`: a zero-filled
    C-contiguous uint8 (T, H, W, 3) array to draw into (e.g. a row of a batch from `np.zeros`)
    instead of a new one; it is not cleared here, since that would touch every page again.
    """
    keypoints = np.asarray(keypoints, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (17, 3):
        raise ValueError(f"keypoints must be (T, 17, 3), got {keypoints.shape}")
    if not np.isfinite(keypoints[..., 2]).all():
        raise ValueError("keypoint confidences must be finite (use 0 for missing joints)")
    shape = (len(keypoints), height, width, 3)
    if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous):
        raise ValueError(f"out must be C-contiguous uint8 {shape}, got {out.dtype} {out.shape}")
    frames = np.zeros(shape, np.uint8) if out is None else out
    for canvas, points, visible in zip(frames, *_fixed_point(keypoints, conf_threshold)):
        _draw_skeleton(canvas, points, visible)  # each frames[t] is a contiguous view cv2 draws into
    return frames


def render_pose_batch(keypoints: np.ndarray, height: int, width: int, conf_threshold: float) -> np.ndarray:
    """(B, T, 17, 3) keypoints -> uint8 (B, T, H, W, 3) maps, clip by clip with `render_pose`.

    Why: shards of real presets hold keypoints, not the ~97 MB a clip of maps (`store_pixels`); the
    training worker draws them with this, the very renderer preprocessing used, so they are bitwise
    the maps preprocessing would have stored (tests/test_preprocess.py checks it on the tiny data).
    """
    keypoints = np.asarray(keypoints)
    if keypoints.ndim != 4:
        raise ValueError(f"keypoints must be (B, T, 17, 3), got {keypoints.shape}")
    maps = np.zeros((keypoints.shape[0], keypoints.shape[1], height, width, 3), np.uint8)
    for clip, out in zip(keypoints, maps):
        render_pose(clip, height, width, conf_threshold, out=out)
    return maps


def transform_points(points: np.ndarray, transform: tuple[float, float, float]) -> np.ndarray:
    """Keypoints (..., 17, 3) [x, y, conf] in source pixels -> decoded-frame pixels (conf unchanged).

    `transform` is (scale, tx, ty) of `core.media.fit_transform`: x' = x * scale + tx."""
    scale, tx, ty = transform
    out = points.astype(np.float32, copy=True)
    out[..., 0] = points[..., 0] * scale + tx
    out[..., 1] = points[..., 1] * scale + ty
    return out
