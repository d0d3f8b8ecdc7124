"""Faces of the reference image: one detector and one crop, shared by preprocessing and serving.

The face condition of the denoiser is the VAE latent of *one* face crop of the reference image
(DanceLCM's face feature; ../shared/PAPERS.md), never the target clip's own per-frame crops: those
would hand the model the ground-truth mouth in training while serving only has the reference.
Preprocessing (`ray_jobs.preprocess`) and serving (`serving.engine`) both call `reference_face`, so
the crop a model was trained on is the crop it is served with.

Detection (`FaceCropConfig.detector`): OpenCV's bundled frontal-face Haar cascade (OpenCV 4.x), also
used as a track over clips by `ray_jobs.preprocess.stages.detect_faces_haar`; or MediaPipe's BlazeFace
(`model.blazepose.BlazeFaceDetector`, a trained CNN, from the model cache that
``python -m ray_jobs.fetch_models`` fills); 'auto' takes BlazeFace when its model is in the cache and
Haar otherwise. Both sides read the detector from the same config class, so they cut the same face.
A caller that knows the box (a sidecar, a client's `face_box`) passes it and nothing is detected.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Literal, NamedTuple

import cv2
import numpy as np
from pydantic import Field

from core.config import StrictConfig

__all__ = ["FaceCropConfig", "ReferenceFace", "haar_cascade", "largest_face", "detect_face", "crop_faces",
           "reference_face", "face_detector", "resolve_detector"]


class FaceCropConfig(StrictConfig):
    """Geometry of a face crop: the same in preprocessing (`face:` section) and serving (`face:`)."""

    size: int = Field(32, ge=8, description="face crop edge in pixels (Hf = Wf)")
    margin: float = Field(1.2, ge=1.0, description="crop edge = margin * max(box w, h), so the crop holds the whole head")
    min_side: int = Field(192, ge=24, description="Haar: images are upscaled to this short side first (the "
                                                  "cascade's 24x24 window misses the few-pixel faces of small frames)")
    detector: Literal["haar", "auto", "blazeface"] = Field(
        "auto", description="face detector when no box is given: 'auto': MediaPipe BlazeFace when its model is "
        "in model_dir (`python -m ray_jobs.fetch_models`), else OpenCV's Haar cascade; 'blazeface' (its model "
        "required); 'haar'. Serving must detect as preprocessing did (BlazeFace's boxes are tighter than Haar's)")
    model_dir: str | None = Field(None, description="local BlazeFace model cache; None = "
                                  "~/.cache/human-animation/mediapipe (resolved when a face is detected)")


class ReferenceFace(NamedTuple):
    """The reference's face: crop uint8 (size, size, 3), box float32 (4,) [x0, y0, x1, y1] (NaN: none)."""

    crop: np.ndarray
    box: np.ndarray
    found: bool


@lru_cache(maxsize=1)
def haar_cascade() -> cv2.CascadeClassifier:
    """OpenCV's bundled frontal-face Haar cascade, loaded once per process."""
    if not hasattr(cv2, "CascadeClassifier"):  # OpenCV 5 moved Haar cascades out of the main wheel
        raise RuntimeError(f"OpenCV {cv2.__version__} has no Haar cascades (removed in OpenCV 5): install "
                           "'opencv-python-headless<5', ship sidecar face_boxes, or set face.detector='none'")
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise RuntimeError(f"could not load the Haar cascade from {cv2.data.haarcascades}")
    return cascade


def largest_face(cascade, gray: np.ndarray, upscale: float, sizes: tuple[int, int] | None = None,
                 origin: tuple[int, int] = (0, 0)) -> np.ndarray | None:
    """Largest cascade detection in `gray` (a frame, or a window of it at `origin`) in frame pixels, or None.

    `sizes`: (min, max) face side in upscaled pixels; None searches every size.
    """
    if upscale > 1.0:
        gray = cv2.resize(gray, None, fx=upscale, fy=upscale, interpolation=cv2.INTER_LINEAR)
    limits = {} if sizes is None else {"minSize": (sizes[0],) * 2, "maxSize": (sizes[1],) * 2}
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, **limits)
    if not len(found):
        return None
    x, y, w, h = max(found, key=lambda r: r[2] * r[3])
    return np.array([x, y, x + w, y + h], np.float32) / upscale + np.array(origin * 2, np.float32)


def resolve_detector(detector: str, model_dir: str | None) -> str:
    """'auto' -> 'blazeface' when its model is in `model_dir` (None: the default cache), else 'haar'."""
    from model.blazepose import has_model

    if detector == "auto":
        return "blazeface" if has_model(model_dir, "face_detection_short_range.tflite") else "haar"
    return detector


def face_detector(cfg: FaceCropConfig) -> Callable[[np.ndarray], np.ndarray | None]:
    """RGB uint8 (H, W, 3) -> face box float32 (4,) or None, by `cfg.detector` (BlazeFace loaded once a process)."""
    if resolve_detector(cfg.detector, cfg.model_dir) == "blazeface":
        from model.blazepose import default_model_dir, load_blazeface

        return load_blazeface(str(cfg.model_dir or default_model_dir()))
    return lambda image: detect_face(image, cfg.min_side)


def detect_face(image: np.ndarray, min_side: int = 192) -> np.ndarray | None:
    """The largest Haar face of an RGB image uint8 (H, W, 3) as float32 (4,) [x0, y0, x1, y1], or None."""
    upscale = max(1.0, min_side / min(image.shape[:2]))
    return largest_face(haar_cascade(), cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY), upscale)


def crop_faces(frames: np.ndarray, boxes: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Square crops around each box: uint8 (T, H, W, 3), boxes (T, 4) -> uint8 (T, size, size, 3).

    The square's edge is margin * max(box w, h) around the box centre; outside the frame is black.
    One affine warp per frame (cv2 has no batched warp).
    """
    crops = np.zeros((len(frames), size, size, 3), np.uint8)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    edge = np.maximum((boxes[:, 2:] - boxes[:, :2]).max(axis=1) * margin, 1.0)
    scale = size / edge
    for t, frame in enumerate(frames):
        shift = size / 2.0 - centre[t] * scale[t]
        affine = np.array([[scale[t], 0, shift[0]], [0, scale[t], shift[1]]], np.float64)
        crops[t] = cv2.warpAffine(frame, affine, (size, size), flags=cv2.INTER_AREA,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crops


def reference_face(image: np.ndarray, cfg: FaceCropConfig, box: np.ndarray | None = None,
                   detect: bool = True) -> ReferenceFace:
    """The reference's face crop: around `box` when given (finite), else the detected face.

    image uint8 (H, W, 3). Not found (no box, nothing detected or `detect` False): a zero crop,
    a NaN box and found False; the denoiser then uses its learned null face.
    """
    box = None if box is None or not np.isfinite(np.asarray(box, np.float32)).all() else np.asarray(box, np.float32)
    if box is None and detect:
        box = face_detector(cfg)(image)
    if box is None:
        return ReferenceFace(np.zeros((cfg.size, cfg.size, 3), np.uint8), np.full(4, np.nan, np.float32), False)
    crop = crop_faces(np.asarray(image)[None], box[None], cfg.size, cfg.margin)[0]
    return ReferenceFace(crop, box, True)
