"""Frontal faces OpenCV's Haar cascade detects, moving over a textured background, with exact boxes.

The puppet world's cartoon heads are not faces to the cascade, so the Haar face track of the
preprocessing job (videos without sidecar boxes) is measured on these instead: a shaded frontal
face (dark eye sockets and brows, a lit nose bridge, mouth) that the bundled
`haarcascade_frontalface_default.xml` finds from ~30 px up, boxed to within a few pixels of the
square it is drawn in. Ground truth = that square.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["frontal_face", "face_track_clip"]


def frontal_face(side: int) -> np.ndarray:
    """A shaded frontal face filling a (side, side) uint8 gray square (background 90)."""
    big = 200  # drawn at one size and resized, so every side gives the same face
    img = np.full((big, big), 90, np.uint8)
    c = big // 2
    cv2.ellipse(img, (c, c), (70, 92), 0, 0, 360, 200, -1)  # skin
    for dx in (-32, 32):
        cv2.ellipse(img, (c + dx, c - 22), (18, 9), 0, 0, 360, 70, -1)  # eye socket
        cv2.circle(img, (c + dx, c - 22), 5, 20, -1)  # pupil
        cv2.line(img, (c + dx * 14 // 32, c - 42), (c + dx * 52 // 32, c - 44), 60, 6)  # brow
    cv2.ellipse(img, (c, c + 8), (9, 26), 0, 0, 360, 225, -1)  # lit nose bridge
    cv2.ellipse(img, (c, c + 36), (9, 4), 0, 0, 360, 120, -1)  # nostril shadow
    cv2.ellipse(img, (c, c + 56), (28, 8), 0, 0, 360, 90, -1)  # mouth
    img = cv2.GaussianBlur(img, (0, 0), 3)
    return cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA)


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth random texture (mid-grey clutter, so the cascade has something to reject)."""
    noise = rng.integers(0, 256, (height, width), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (0, 0), 4)


def face_track_clip(num_frames: int, height: int, width: int, side: tuple[float, float] = (0.2, 0.26),
                    path: tuple[tuple[float, float], tuple[float, float]] = ((0.3, 0.35), (0.6, 0.45)),
                    seed: int = 0, face: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One face moving along `path` and growing through `side` -> (frames uint8 (T, H, W, 3), boxes float32 (T, 4)).

    `side`: face side at the first and last frame as a fraction of the short side; `path`: its
    centre at the first and last frame as fractions of (W, H). Boxes are (x0, y0, x1, y1) in pixels.
    `face=False`: the same background without the face, boxes NaN.
    """
    rng = np.random.default_rng(seed)
    background = _background(height, width, rng)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    boxes = np.empty((num_frames, 4), np.float32)
    for t, a in enumerate(np.linspace(0.0, 1.0, num_frames)):
        edge = int(round((side[0] + a * (side[1] - side[0])) * min(height, width)))
        cx = (path[0][0] + a * (path[1][0] - path[0][0])) * width
        cy = (path[0][1] + a * (path[1][1] - path[0][1])) * height
        x0, y0 = int(round(cx - edge / 2)), int(round(cy - edge / 2))
        if x0 < 0 or y0 < 0 or x0 + edge > width or y0 + edge > height:
            raise ValueError(f"frame {t}: the face ({x0}, {y0}, side {edge}) leaves the {width}x{height} frame")
        gray = background.copy()
        if face:
            gray[y0:y0 + edge, x0:x0 + edge] = frontal_face(edge)
        frames[t] = gray[..., None]
        boxes[t] = (x0, y0, x0 + edge, y0 + edge) if face else np.nan
    return frames, boxes
