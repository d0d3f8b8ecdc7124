"""The puppet: per-identity appearance and a deterministic renderer of (identity, keypoints, mouth) frames.

Geometry is carried entirely by the COCO-17 keypoints (pixels), so ground truth for any clip is a
pure function of its sidecar. The head is a disc centred between the ears with radius half the ear
distance; eyes sit on the eye keypoints and the mouth below the nose, opening with mouth_openness.
Drawing is OpenCV at 4x supersampling, then an area downsample (anti-aliasing).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["PuppetIdentity", "make_identity", "identity_index", "head_geometry", "face_boxes", "render_frames"]

Color = tuple[int, int, int]
_SUPERSAMPLE = 4
_SHIFT = 4  # cv2 sub-pixel bits
# COCO-17 indices used by the renderer.
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = 0, 1, 2, 3, 4
L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 5, 6, 7, 8, 9, 10
L_HIP, R_HIP, L_KNEE, R_KNEE, L_ANKLE, R_ANKLE = 11, 12, 13, 14, 15, 16


@dataclass(frozen=True)
class PuppetIdentity:
    """Appearance and proportions of one puppet; lengths are fractions of the frame height."""

    identity_id: str
    skin: Color
    hair: Color
    shirt: Color
    pants: Color
    shoes: Color
    wall_a: Color
    wall_b: Color
    floor: Color
    wall_freq: tuple[float, float]  # cycles per frame along x and y (low: codec-friendly)
    wall_phase: float
    floor_y: float  # floor line height, fraction of frame height
    head_radius: float
    neck: float
    torso: float
    shoulder_width: float
    hip_width: float
    upper_arm: float
    forearm: float
    thigh: float
    shin: float
    limb_thickness: float


def identity_index(identity_id: str) -> int:
    """Index of an identity id of the form 'id007'."""
    if not identity_id.startswith("id") or not identity_id[2:].isdigit():
        raise ValueError(f"identity id must look like 'id007', got {identity_id!r}")
    return int(identity_id[2:])


def _hsv(hue: float, sat: float, val: float) -> Color:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, val))  # type: ignore[return-value]


def _palette(rng: np.random.Generator) -> dict[str, Color]:
    """Saturated clothes on a pale, desaturated background so the figure always stands out."""
    skin_tones = [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 33)]
    wall_hue, shirt_hue = rng.random(), rng.random()
    return {
        "skin": skin_tones[int(rng.integers(len(skin_tones)))],
        "hair": _hsv(rng.uniform(0.0, 0.12), rng.uniform(0.3, 0.8), rng.uniform(0.1, 0.45)),
        "shirt": _hsv(shirt_hue, rng.uniform(0.65, 0.95), rng.uniform(0.6, 0.9)),
        "pants": _hsv(shirt_hue + rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.9), rng.uniform(0.25, 0.55)),
        "shoes": _hsv(rng.random(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.3)),
        "wall_a": _hsv(wall_hue, rng.uniform(0.1, 0.3), rng.uniform(0.8, 0.95)),
        "wall_b": _hsv(wall_hue + rng.uniform(-0.15, 0.15), rng.uniform(0.2, 0.45), rng.uniform(0.65, 0.85)),
        "floor": _hsv(rng.random(), rng.uniform(0.15, 0.4), rng.uniform(0.45, 0.65)),
    }


def make_identity(index: int, seed: int) -> PuppetIdentity:
    """Deterministic appearance of identity `index` in the world of `seed`."""
    rng = np.random.default_rng([seed, 0x1D, index])
    palette = _palette(rng)
    return PuppetIdentity(
        identity_id=f"id{index:03d}",
        **palette,
        wall_freq=(float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0))),
        wall_phase=float(rng.uniform(0, 2 * np.pi)),
        floor_y=float(rng.uniform(0.8, 0.86)),
        head_radius=float(rng.uniform(0.095, 0.12)),
        neck=float(rng.uniform(0.015, 0.035)),
        torso=float(rng.uniform(0.2, 0.25)),
        shoulder_width=float(rng.uniform(0.17, 0.24)),
        hip_width=float(rng.uniform(0.1, 0.15)),
        upper_arm=float(rng.uniform(0.11, 0.14)),
        forearm=float(rng.uniform(0.1, 0.13)),
        thigh=float(rng.uniform(0.13, 0.16)),
        shin=float(rng.uniform(0.12, 0.15)),
        limb_thickness=float(rng.uniform(0.045, 0.065)),
    )


def head_geometry(keypoints: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Head disc of one (17, 3) frame: (center (2,), radius, unit ear axis (2,), unit down axis (2,))."""
    left_ear, right_ear = keypoints[L_EAR, :2], keypoints[R_EAR, :2]
    span = left_ear - right_ear
    radius = float(np.hypot(*span)) / 2
    ear_axis = span / max(2 * radius, 1e-6)
    down_axis = np.array([-ear_axis[1], ear_axis[0]])
    return (left_ear + right_ear) / 2, radius, ear_axis, down_axis


def face_boxes(keypoints: np.ndarray) -> np.ndarray:
    """Tight boxes (T, 4) [x0, y0, x1, y1] in pixels around the rendered head disc."""
    boxes = []
    for frame_keypoints in keypoints:
        center, radius, _, _ = head_geometry(frame_keypoints)
        boxes.append([center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _background(identity: PuppetIdentity, height: int, width: int) -> np.ndarray:
    """Static wall (low-frequency sinusoidal texture) above a floor band; float RGB (H, W, 3)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (xs + 0.5) / width, (ys + 0.5) / height
    fx, fy = identity.wall_freq
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * (fx * u + fy * v) + identity.wall_phase)
    wall = (1 - wave[..., None]) * np.array(identity.wall_a) + wave[..., None] * np.array(identity.wall_b)
    floor = np.array(identity.floor) * (0.85 + 0.3 * (v[..., None] - identity.floor_y))
    return np.where(v[..., None] >= identity.floor_y, floor, wall)


def _pt(point: np.ndarray) -> tuple[int, int]:
    return int(round(point[0] * (1 << _SHIFT))), int(round(point[1] * (1 << _SHIFT)))


def _len(value: float) -> int:
    return max(1, int(round(value * (1 << _SHIFT))))


def _limb(canvas: np.ndarray, a: np.ndarray, b: np.ndarray, color: Color, thickness: float) -> None:
    """A limb is a round-capped thick line (caps are discs so joints look continuous)."""
    cv2.line(canvas, _pt(a), _pt(b), color, max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)
    for end in (a, b):
        cv2.circle(canvas, _pt(end), _len(thickness / 2), color, -1, cv2.LINE_AA, _SHIFT)


def _draw_body(canvas: np.ndarray, identity: PuppetIdentity, points: np.ndarray, thickness: float) -> None:
    """Legs, torso and arms (drawn back to front); `points` are (17, 2) canvas pixels."""
    for hip, knee, ankle in ((L_HIP, L_KNEE, L_ANKLE), (R_HIP, R_KNEE, R_ANKLE)):
        _limb(canvas, points[hip], points[knee], identity.pants, thickness)
        _limb(canvas, points[knee], points[ankle], identity.pants, thickness)
        cv2.circle(canvas, _pt(points[ankle]), _len(0.8 * thickness), identity.shoes, -1, cv2.LINE_AA, _SHIFT)
    torso = np.stack([points[L_SHOULDER], points[R_SHOULDER], points[R_HIP], points[L_HIP]])
    cv2.fillConvexPoly(canvas, np.array([_pt(p) for p in torso], np.int32), identity.shirt, cv2.LINE_AA, _SHIFT)
    _limb(canvas, points[L_SHOULDER], points[R_SHOULDER], identity.shirt, thickness)
    _limb(canvas, points[L_HIP], points[R_HIP], identity.pants, thickness)
    for shoulder, elbow, wrist in ((L_SHOULDER, L_ELBOW, L_WRIST), (R_SHOULDER, R_ELBOW, R_WRIST)):
        _limb(canvas, points[shoulder], points[elbow], identity.shirt, thickness)
        _limb(canvas, points[elbow], points[wrist], identity.skin, 0.8 * thickness)
        cv2.circle(canvas, _pt(points[wrist]), _len(0.6 * thickness), identity.skin, -1, cv2.LINE_AA, _SHIFT)


def _draw_head(canvas: np.ndarray, identity: PuppetIdentity, keypoints: np.ndarray, mouth_openness: float) -> None:
    """Hair disc, face disc inside it, eyes on the eye keypoints, a mouth below the nose."""
    center, radius, ear_axis, down_axis = head_geometry(keypoints)
    shoulder_mid = (keypoints[L_SHOULDER, :2] + keypoints[R_SHOULDER, :2]) / 2
    _limb(canvas, shoulder_mid, center, identity.skin, 0.7 * radius)
    cv2.circle(canvas, _pt(center), _len(radius), identity.hair, -1, cv2.LINE_AA, _SHIFT)
    cv2.circle(canvas, _pt(center + 0.15 * radius * down_axis), _len(0.85 * radius), identity.skin, -1,
               cv2.LINE_AA, _SHIFT)
    for eye in (L_EYE, R_EYE):
        cv2.circle(canvas, _pt(keypoints[eye, :2]), _len(0.24 * radius), (255, 255, 255), -1, cv2.LINE_AA, _SHIFT)
        cv2.circle(canvas, _pt(keypoints[eye, :2]), _len(0.14 * radius), (20, 20, 30), -1, cv2.LINE_AA, _SHIFT)
    mouth_center = keypoints[NOSE, :2] + 0.3 * radius * down_axis
    openness = float(np.clip(mouth_openness, 0.0, 1.0))
    axes = (_len(0.34 * radius), _len(radius * (0.06 + 0.26 * openness)))
    angle = float(np.degrees(np.arctan2(ear_axis[1], ear_axis[0])))
    cv2.ellipse(canvas, _pt(mouth_center), axes, angle, 0, 360, (110, 20, 30), -1, cv2.LINE_AA, _SHIFT)


def render_frames(identity: PuppetIdentity, keypoints: np.ndarray, mouth_openness: np.ndarray,
                  height: int, width: int) -> np.ndarray:
    """Render the puppet: keypoints (T, 17, 3) pixels, mouth_openness (T,) in [0, 1] -> uint8 (T, H, W, 3)."""
    keypoints = np.asarray(keypoints, dtype=np.float64)
    mouth_openness = np.asarray(mouth_openness, dtype=np.float64)
    if keypoints.ndim != 3 or keypoints.shape[1:] != (17, 3) or mouth_openness.shape != (len(keypoints),):
        raise ValueError(f"need keypoints (T, 17, 3) and mouth (T,), got {keypoints.shape}, {mouth_openness.shape}")
    ss = _SUPERSAMPLE
    background = np.round(_background(identity, height * ss, width * ss)).astype(np.uint8)
    thickness = identity.limb_thickness * height * ss
    frames = np.empty((len(keypoints), height, width, 3), np.uint8)
    for t in range(len(keypoints)):
        canvas = background.copy()
        scaled = keypoints[t].copy()
        scaled[:, :2] *= ss
        _draw_body(canvas, identity, scaled[:, :2], thickness)
        _draw_head(canvas, identity, scaled, mouth_openness[t])
        frames[t] = cv2.resize(canvas, (width, height), interpolation=cv2.INTER_AREA)
    return frames
