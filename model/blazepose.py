"""MediaPipe's BlazePose (pose) and BlazeFace (face) TFLite models, run through LiteRT (`ai-edge-litert`).

Why these: they are real, trained models that install with pip alone. The ``.tflite`` files ship inside
the ``mediapipe==0.10.21`` wheel, but that wheel pins numpy<2 and protobuf<5, which clash with ours, so
it is never installed: ``python -m ray_jobs.fetch_models`` downloads it with pip, extracts the four
files into a model cache and records their sha256 (`MODELS_JSON`). We deliberately do not use the
``mediapipe`` package (dependency clash) nor its graph runner: the few calculators a single-person
video needs (SSD anchors, box decoding, weighted NMS, ROI from alignment keypoints, landmark mapping)
are re-implemented here in numpy, with MediaPipe's parameters (``pose_detection_cpu.pbtxt``,
``pose_landmark_by_roi_cpu.pbtxt``, ``face_detection_short_range.pbtxt``).

Pipeline per frame (`BlazePoseExtractor`): letterboxed 224x224 detector, inputs in [-1, 1] -> best
person box and its 4 alignment keypoints (0: mid-hip, 1: a point on the body's circle) -> a square ROI
2.5x the hip-to-circle distance, rotated so the body is upright (MediaPipe's
``AlignmentPointsRectsCalculator`` + ``RectTransformationCalculator`` scale 1.25) -> 256x256 landmark
model, inputs in [0, 1] -> 33 landmarks (+ 6 auxiliary) -> COCO-17 (`COCO_FROM_BLAZEPOSE`), visibility
(sigmoid) as confidence. Later frames take their ROI from the previous frame's auxiliary landmarks
33/34 (MediaPipe's tracking) and fall back to the detector when the pose presence drops below 0.5.
Tracks are smoothed with a One Euro filter (`one_euro`), pure numpy.

model/ takes local paths only: a cache on ``s3://`` is copied to a local folder by the caller.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

__all__ = ["MODEL_FILES", "MODELS_JSON", "MEDIAPIPE_WHEEL", "FETCH_COMMAND", "COCO_FROM_BLAZEPOSE",
           "default_model_dir", "check_model_dir", "has_model", "ssd_anchors", "BlazePoseExtractor",
           "BlazeFaceDetector", "one_euro", "load_blazepose", "load_blazeface"]

MEDIAPIPE_WHEEL = "mediapipe==0.10.21"
# file in the cache -> its path inside the mediapipe wheel
MODEL_FILES: dict[str, str] = {
    "pose_detection.tflite": "mediapipe/modules/pose_detection/pose_detection.tflite",
    "pose_landmark_full.tflite": "mediapipe/modules/pose_landmark/pose_landmark_full.tflite",
    "face_detection_short_range.tflite": "mediapipe/modules/face_detection/face_detection_short_range.tflite",
    "face_detection_full_range_sparse.tflite":
        "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite",
}
MODELS_JSON = "models.json"
FETCH_COMMAND = "python -m ray_jobs.fetch_models"
# MediaPipe's 33 pose landmarks -> COCO-17 order: nose 0; left/right eye 2/5; ears 7/8; shoulders 11/12;
# elbows 13/14; wrists 15/16; hips 23/24; knees 25/26; ankles 27/28 (both use the person's left first).
COCO_FROM_BLAZEPOSE: tuple[int, ...] = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)


def default_model_dir() -> Path:
    """``$XDG_CACHE_HOME/human-animation/mediapipe`` (``~/.cache/...``), resolved at call time."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "human-animation" / "mediapipe"


def has_model(model_dir: str | os.PathLike | None, name: str) -> bool:
    """Whether `name` is in the (local) cache; None means the default cache."""
    folder = Path(model_dir) if model_dir else default_model_dir()
    return (folder / name).is_file()


def check_model_dir(model_dir: str | os.PathLike | None, names: tuple[str, ...]) -> Path:
    """The local cache folder holding `names`, or FileNotFoundError naming the command that fills it."""
    folder = Path(model_dir) if model_dir else default_model_dir()
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"model cache {folder} lacks {', '.join(missing)}: fill it with "
                                f"`{FETCH_COMMAND} --cache {folder}`")
    return folder


def ssd_anchors(input_size: int, strides: tuple[int, ...], per_layer: int = 2) -> np.ndarray:
    """Anchor centres (N, 2) [x, y] in [0, 1], as MediaPipe's SsdAnchorsCalculator with fixed anchor size.

    Consecutive layers of one stride share a grid: `per_layer` anchors each (2 with the interpolated
    aspect ratio, 1 without) per cell, cells row-major, offset 0.5.
    """
    centres, i = [], 0
    while i < len(strides):
        same = next((k for k in range(i, len(strides)) if strides[k] != strides[i]), len(strides)) - i
        grid = math.ceil(input_size / strides[i])
        y, x = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid, indexing="ij")
        cells = np.stack([x.ravel(), y.ravel()], axis=1)
        centres.append(np.repeat(cells, per_layer * same, axis=0))
        i += same
    return np.concatenate(centres).astype(np.float32)


class _Letterbox(NamedTuple):
    """Square model input of an (H, W) frame: input = frame * scale + offset."""

    scale: float
    offset: np.ndarray

    @classmethod
    def of(cls, height: int, width: int, size: int) -> "_Letterbox":
        scale = size / max(height, width)
        return cls(scale, np.array([(size - width * scale) / 2, (size - height * scale) / 2], np.float32))

    def warp(self, frame: np.ndarray, size: int) -> np.ndarray:
        affine = np.array([[self.scale, 0, self.offset[0]], [0, self.scale, self.offset[1]]], np.float64)
        return cv2.warpAffine(frame, affine, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        return (points - self.offset) / self.scale


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


class _Tflite:
    """One LiteRT interpreter: float32 NHWC (1, S, S, 3) in, every output out (by output order)."""

    def __init__(self, path: Path):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as exc:
            raise ImportError("BlazePose/BlazeFace need LiteRT: pip install 'ai-edge-litert>=2.3'") from exc
        # one thread: a Ray task holds one CPU, and side-by-side tasks would oversubscribe the cores
        self.interpreter = Interpreter(model_path=str(path), num_threads=1)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.size = int(self.input["shape"][1])
        self.outputs = [d["index"] for d in self.interpreter.get_output_details()]

    def __call__(self, image: np.ndarray) -> list[np.ndarray]:
        self.interpreter.set_tensor(self.input["index"], image[None].astype(np.float32))
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(i)[0] for i in self.outputs]


class _SsdDetector:
    """Single-class SSD (BlazePose detector, BlazeFace): best detection's box and keypoints in frame pixels.

    Weighted NMS as MediaPipe's: the boxes overlapping the best one (IoU > 0.3) are averaged by score.
    """

    def __init__(self, path: Path, strides: tuple[int, ...], per_layer: int, min_score: float):
        self.model = _Tflite(path)
        self.anchors = ssd_anchors(self.model.size, strides, per_layer)
        self.min_score = min_score

    def detect(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
        """frame uint8 (H, W, 3) RGB -> (box (4,) [x0, y0, x1, y1], keypoints (K, 2), score) or None."""
        size = self.model.size
        box = _Letterbox.of(frame.shape[0], frame.shape[1], size)
        raw, logits = self.model(box.warp(frame, size).astype(np.float32) / 127.5 - 1.0)
        scores = _sigmoid(logits[:, 0])
        if scores.max() < self.min_score:
            return None
        centre = raw[:, :2] / size + self.anchors
        half = raw[:, 2:4] / size / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
        points = raw[:, 4:].reshape(len(raw), -1, 2) / size + self.anchors[:, None]
        keep = (_iou(boxes, boxes[scores.argmax()]) > 0.3) & (scores >= self.min_score)
        weights = scores[keep] / scores[keep].sum()
        best_box = (boxes[keep] * weights[:, None]).sum(0) * size
        best_points = (points[keep] * weights[:, None, None]).sum(0) * size
        frame_box = box.to_frame(best_box.reshape(2, 2)).ravel()
        return frame_box.astype(np.float32), box.to_frame(best_points).astype(np.float32), float(scores.max())


def _iou(boxes: np.ndarray, box: np.ndarray) -> np.ndarray:
    """IoU of boxes (N, 4) with one box (4,), [x0, y0, x1, y1]."""
    low, high = np.maximum(boxes[:, :2], box[:2]), np.minimum(boxes[:, 2:], box[2:])
    inter = np.clip(high - low, 0, None).prod(axis=1)
    area = (boxes[:, 2:] - boxes[:, :2]).clip(0).prod(axis=1) + (box[2:] - box[:2]).clip(0).prod()
    return inter / np.maximum(area - inter, 1e-9)


class BlazeFaceDetector:
    """BlazeFace short range (128x128, 896 anchors from strides 8/16/16/16): the largest-score face box.

    For faces within ~2 m of the camera (talking heads, dance shots' reference frames); MediaPipe's
    full-range model is fetched too but not used here.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, min_score: float = 0.5):
        folder = check_model_dir(model_dir, ("face_detection_short_range.tflite",))
        self.ssd = _SsdDetector(folder / "face_detection_short_range.tflite", (8, 16, 16, 16), 2, min_score)

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """RGB uint8 (H, W, 3) -> the face box float32 (4,) [x0, y0, x1, y1] in image pixels, or None."""
        found = self.ssd.detect(np.ascontiguousarray(image))
        return None if found is None else found[0]


class _Roi(NamedTuple):
    """A square, rotated region: centre (2,), side (pixels), up (2,) unit vector of the body's 'up'."""

    centre: np.ndarray
    side: float
    up: np.ndarray

    @classmethod
    def from_alignment(cls, hip: np.ndarray, circle: np.ndarray, expand: float = 1.25) -> "_Roi":
        """MediaPipe's rect: side 2 |circle - hip| * expand, centred on the hip point, up = hip -> circle."""
        vector = circle - hip
        radius = float(np.linalg.norm(vector))
        return cls(hip.astype(np.float64), 2 * radius * expand, vector / max(radius, 1e-6))

    def to_frame_affine(self, size: int) -> np.ndarray:
        """2x3 affine from model-input pixels (size x size) to frame pixels."""
        right, down = np.array([-self.up[1], self.up[0]]), -self.up
        unit = self.side / size
        origin = self.centre - (right + down) * self.side / 2
        return np.stack([right * unit, down * unit, origin], axis=1)


def one_euro(track: np.ndarray, fps: float, min_cutoff: float = 1.0, beta: float = 10.0,
             d_cutoff: float = 1.0) -> np.ndarray:
    """One Euro filter (Casiez et al. 2012) over axis 0 of `track` (T, ...): little lag on fast motion,
    strong smoothing of jitter at rest. Units of `beta`: per (track unit / second)."""
    out = np.array(track, np.float64)
    if len(out) < 2:
        return out.astype(np.float32)

    def alpha(cutoff):
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau * fps)

    speed = np.zeros_like(out[0])
    for t in range(1, len(out)):
        raw_speed = (track[t] - out[t - 1]) * fps
        speed = speed + alpha(d_cutoff) * (raw_speed - speed)
        a = alpha(min_cutoff + beta * np.abs(speed))
        out[t] = out[t - 1] + a * (track[t] - out[t - 1])
    return out.astype(np.float32)


class BlazePoseExtractor:
    """Frames uint8 (T, H, W, 3) RGB -> COCO-17 keypoints float32 (T, 17, 3) [x, y, conf] in frame pixels.

    Same call as `ray_jobs.preprocess.pose.PoseExtractor`; frames are seen at their own resolution (the
    models letterbox/crop to 224 and 256 themselves). A frame without a person gets zeros (conf 0).
    `smooth`: One Euro filter over the track, positions normalised by the frame's long side.
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, fps: float = 16.0, smooth: bool = True,
                 min_presence: float = 0.5):
        folder = check_model_dir(model_dir, ("pose_detection.tflite", "pose_landmark_full.tflite"))
        self.detector = _SsdDetector(folder / "pose_detection.tflite", (8, 16, 32, 32, 32), 2, 0.5)
        self.landmarks = _Tflite(folder / "pose_landmark_full.tflite")
        self.fps, self.smooth, self.min_presence = fps, smooth, min_presence

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        out = np.zeros((len(frames), 17, 3), np.float32)
        roi = None
        for t, frame in enumerate(frames):
            roi = self._detect_roi(frame) if roi is None else roi
            if roi is None:
                continue
            landmarks, presence = self.landmarks_in(frame, roi)
            if presence < self.min_presence:
                roi = None
                continue
            out[t] = landmarks[list(COCO_FROM_BLAZEPOSE)][:, :3]
            roi = _Roi.from_alignment(landmarks[33, :2], landmarks[34, :2])
        return self._smoothed(out, frames.shape[1:3]) if self.smooth else out

    def _detect_roi(self, frame: np.ndarray) -> _Roi | None:
        found = self.detector.detect(np.ascontiguousarray(frame))
        return None if found is None else _Roi.from_alignment(found[1][0], found[1][1])

    def landmarks_in(self, frame: np.ndarray, roi: _Roi) -> tuple[np.ndarray, float]:
        """39 landmarks (39, 3) [x, y, visibility] in frame pixels and the pose presence, for one ROI."""
        size = self.landmarks.size
        to_frame = roi.to_frame_affine(size)
        crop = cv2.warpAffine(np.ascontiguousarray(frame), cv2.invertAffineTransform(to_frame), (size, size),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        raw, presence = self.landmarks(crop.astype(np.float32) / 255.0)[:2]
        raw = raw.reshape(39, 5)
        xy = raw[:, :2] @ to_frame[:, :2].T + to_frame[:, 2]
        return np.concatenate([xy, _sigmoid(raw[:, 3:4])], axis=1).astype(np.float32), float(presence.ravel()[0])

    def _smoothed(self, keypoints: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """One Euro over runs of frames where the person was found (a gap restarts the filter)."""
        scale = float(max(shape))
        found = keypoints[:, :, 2].max(axis=1) > 0
        out, start = keypoints.copy(), 0
        for t in range(1, len(found) + 1):
            if t == len(found) or found[t] != found[start]:
                if found[start]:
                    out[start:t, :, :2] = one_euro(keypoints[start:t, :, :2] / scale, self.fps) * scale
                start = t
        return out


@lru_cache(maxsize=4)
def load_blazepose(model_dir: str, fps: float = 16.0) -> BlazePoseExtractor:
    """One extractor per process, cache folder and frame rate (interpreters are slow to build)."""
    return BlazePoseExtractor(model_dir, fps)


@lru_cache(maxsize=4)
def load_blazeface(model_dir: str) -> BlazeFaceDetector:
    """One face detector per process and cache folder."""
    return BlazeFaceDetector(model_dir)

