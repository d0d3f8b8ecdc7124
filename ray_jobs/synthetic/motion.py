"""Dance-like puppet motion: forward kinematics of smooth random joint-angle tracks, audio-modulated.

Every angle is a sum of a few low-frequency sinusoids with random frequencies and phases (random per
clip). The audio drives three parts: mouth openness (frame RMS, set by the caller), a head nod whose
depth follows the smoothed audio energy, and arm gesture amplitude that grows with that energy.
"""

from __future__ import annotations

import numpy as np

from ray_jobs.synthetic.puppet import PuppetIdentity

__all__ = ["smooth_track", "smooth_energy", "dance_keypoints"]


def smooth_track(rng: np.random.Generator, num_frames: int, fps: float, amplitude: float,
                 num_components: int = 3, max_hz: float = 1.2) -> np.ndarray:
    """Sum of `num_components` sinusoids in [0.2, max_hz] Hz, peak |value| <= amplitude; shape (T,)."""
    t = np.arange(num_frames) / fps
    freqs = rng.uniform(0.2, max_hz, num_components)
    phases = rng.uniform(0, 2 * np.pi, num_components)
    weights = rng.uniform(0.3, 1.0, num_components)
    track = (weights[:, None] * np.sin(2 * np.pi * freqs[:, None] * t + phases[:, None])).sum(0)
    return amplitude * track / weights.sum()


def smooth_energy(energy: np.ndarray, fps: float, window_s: float = 0.25) -> np.ndarray:
    """Moving average (T,) of per-frame energy over ~window_s, scaled to peak 1 (gestures lag speech)."""
    width = max(1, int(round(window_s * fps)))
    smoothed = np.convolve(np.pad(energy, (width // 2, width - 1 - width // 2), mode="edge"),
                           np.ones(width) / width, mode="valid")
    return smoothed / max(smoothed.max(), 1e-9)


def _unit(angle: np.ndarray) -> np.ndarray:
    """Direction (T, 2) at `angle` radians from straight down, positive toward image +x."""
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1)


def _arm_and_leg_angles(rng: np.random.Generator, num_frames: int, fps: float,
                         gesture: np.ndarray) -> dict[str, np.ndarray]:
    """Shoulder/elbow/hip/knee angles (radians from down, outward positive) for both sides."""
    angles = {}
    for side in ("left", "right"):
        raise_base = rng.uniform(0.25, 0.7)
        angles[f"{side}_shoulder"] = raise_base + gesture * (0.9 + smooth_track(rng, num_frames, fps, 0.9))
        angles[f"{side}_elbow"] = 0.3 + gesture * (0.6 + smooth_track(rng, num_frames, fps, 0.6, max_hz=1.5))
        angles[f"{side}_hip"] = rng.uniform(0.05, 0.15) + smooth_track(rng, num_frames, fps, 0.12)
        angles[f"{side}_knee"] = np.abs(smooth_track(rng, num_frames, fps, 0.35))
    return angles


def dance_keypoints(identity: PuppetIdentity, rng: np.random.Generator, energy: np.ndarray, fps: float,
                    height: int, width: int) -> np.ndarray:
    """Keypoints (T, 17, 3) [x, y, conf=1] in pixels for a dance driven by per-frame audio energy (T,)."""
    num_frames = len(energy)
    unit = float(height)
    talk = smooth_energy(energy, fps)
    gesture = 0.35 + 0.65 * talk  # gesture amplitude follows audio energy
    standing_y = (identity.floor_y + 0.02) * unit - 0.95 * (identity.thigh + identity.shin) * unit  # feet on floor
    pelvis = np.stack([
        width / 2 + smooth_track(rng, num_frames, fps, 0.06 * unit),
        standing_y + smooth_track(rng, num_frames, fps, 0.015 * unit, max_hz=2.0),
    ], axis=-1)
    lean = smooth_track(rng, num_frames, fps, 0.12)
    up = np.stack([np.sin(lean), -np.cos(lean)], axis=-1)  # torso axis pointing up, tilted by lean
    across = np.stack([np.cos(lean), np.sin(lean)], axis=-1)  # toward image +x (person's left)
    shoulder_mid = pelvis + up * identity.torso * unit
    angles = _arm_and_leg_angles(rng, num_frames, fps, gesture)

    points = np.zeros((num_frames, 17, 2))
    for sign, (sh, el, wr, hp, kn, an), side in ((1, (5, 7, 9, 11, 13, 15), "left"),
                                                  (-1, (6, 8, 10, 12, 14, 16), "right")):
        points[:, sh] = shoulder_mid + sign * across * identity.shoulder_width * unit / 2
        points[:, hp] = pelvis + sign * across * identity.hip_width * unit / 2
        upper = angles[f"{side}_shoulder"]
        points[:, el] = points[:, sh] + _unit(sign * upper) * identity.upper_arm * unit
        points[:, wr] = points[:, el] + _unit(sign * (upper + angles[f"{side}_elbow"])) * identity.forearm * unit
        thigh = angles[f"{side}_hip"]
        points[:, kn] = points[:, hp] + _unit(sign * thigh) * identity.thigh * unit
        points[:, an] = points[:, kn] + _unit(sign * (thigh - angles[f"{side}_knee"])) * identity.shin * unit
    _place_head(points, identity, rng, shoulder_mid, up, talk, fps, unit)
    return np.concatenate([points, np.ones((num_frames, 17, 1))], axis=-1)


def _place_head(points: np.ndarray, identity: PuppetIdentity, rng: np.random.Generator, shoulder_mid: np.ndarray,
                up: np.ndarray, talk: np.ndarray, fps: float, unit: float) -> None:
    """Head disc on the neck; roll is a slow sway, the nod (features drop) deepens with audio energy."""
    num_frames = len(talk)
    radius = identity.head_radius * unit
    center = shoulder_mid + up * (identity.neck * unit + radius)
    roll = smooth_track(rng, num_frames, fps, 0.15)
    nod = 0.5 * talk * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * np.arange(num_frames) / fps))
    ear_axis = np.stack([np.cos(roll), np.sin(roll)], axis=-1)
    down_axis = np.stack([-ear_axis[:, 1], ear_axis[:, 0]], axis=-1)
    feature_drop = (nod * 0.25 * radius)[:, None] * down_axis
    points[:, 3] = center + ear_axis * radius  # left ear: image +x when facing the camera
    points[:, 4] = center - ear_axis * radius
    points[:, 1] = center + ear_axis * 0.38 * radius - down_axis * 0.12 * radius + feature_drop
    points[:, 2] = center - ear_axis * 0.38 * radius - down_axis * 0.12 * radius + feature_drop
    points[:, 0] = center + down_axis * 0.2 * radius + feature_drop
