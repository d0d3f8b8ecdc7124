"""Request inputs: decode and validate uploads into an `AnimationRequest`, or raise `InputError` naming the field.

Pure functions, no Ray and no model: the ingress runs them before anything reaches a GPU replica,
so bad input costs no model time and never reaches the `Animator`.

* reference image: PNG or JPEG only (Pillow identifies the format from the bytes, never from the
  name), resized to cover the model's H x W and centre-cropped (Pillow's `ImageOps.fit`).
* audio: any container ffmpeg reads, decoded to mono 16 kHz by `core.media.decode_audio`.
* pose: COCO-17 keypoints JSON ``[T][17][3]`` (x, y, confidence) in pixels of the model's H x W, or a
  driving pose *video*, fitted like the reference and run through the preprocessing job's extractor
  (`model.blazepose.BlazePoseExtractor`, `pose_from_video`).
* face box (optional): JSON ``[x0, y0, x1, y1]`` in pixels of the model's H x W (the fitted
  reference); finite, inside the image, positive size. Without it the engine detects the face.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["InputError", "AnimationRequest", "decode_image", "decode_audio_bytes", "parse_keypoints", "pose_from_video",
           "parse_face_box", "resolve_frames", "check_s3_uri", "check_size"]


class InputError(ValueError):
    """A request input is invalid; answered as ``status`` with ``{"error": {"field", "message"}}``."""

    def __init__(self, field: str, message: str, status: int = 422):
        self.field, self.message, self.status = field, message, status
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class AnimationRequest:
    """A validated request: ref image uint8 (H, W, 3), audio float32 (N,) 16 kHz or None, keypoints (T, 17, 3) or None.

    `face_box`: float32 (4,) [x0, y0, x1, y1] in ref-image pixels from the client, or None (detect it).
    """

    ref_image: np.ndarray
    audio: np.ndarray | None
    keypoints: np.ndarray | None
    num_frames: int
    fps: float
    steps: int
    seed: int
    face_box: np.ndarray | None = None

    @property
    def shape_key(self) -> tuple[int, int]:
        """Requests with equal keys can share one batched sampler call (same latent shape and step table)."""
        return (self.num_frames, self.steps)


def check_size(data: bytes, field: str, limit: int) -> bytes:
    """413 when an upload exceeds `limit` bytes, 422 when it is empty."""
    if len(data) > limit:
        raise InputError(field, f"upload of {len(data)} bytes exceeds the limit of {limit} bytes", status=413)
    if not data:
        raise InputError(field, "empty upload")
    return data


def decode_image(data: bytes, field: str, height: int, width: int, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 (height, width, 3) RGB, scaled to cover and centre-cropped."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(field, f"not a PNG or JPEG image ({exc})") from None
    if image.format not in ("PNG", "JPEG"):
        raise InputError(field, f"image format {image.format} is not accepted (PNG or JPEG)")
    if image.width * image.height > max_pixels:
        raise InputError(field, f"image of {image.width}x{image.height} exceeds {max_pixels} pixels", status=413)
    try:
        image = ImageOps.exif_transpose(image).convert("RGB")
        fitted = ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)
    except (OSError, ValueError) as exc:  # truncated or corrupt pixel data
        raise InputError(field, f"image cannot be decoded ({exc})") from None
    return np.asarray(fitted, dtype=np.uint8).copy()


def decode_audio_bytes(data: bytes, field: str, sample_rate: int, max_duration_s: float) -> np.ndarray:
    """Audio file bytes -> float32 mono (N,) at `sample_rate`; 422 for non-audio, 413 when too long."""
    from core.media import MediaError, decode_audio

    with tempfile.TemporaryDirectory(prefix="serve-audio-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            wave = decode_audio(path, sample_rate)
        except MediaError as exc:
            raise InputError(field, f"not a readable audio file ({exc.reason})") from None
    if wave.size == 0:
        raise InputError(field, "audio stream has no samples")
    if not np.isfinite(wave).all():
        raise InputError(field, "audio has non-finite samples")
    duration = wave.size / sample_rate
    if duration > max_duration_s:
        raise InputError(field, f"audio of {duration:.2f} s exceeds the limit of {max_duration_s} s", status=413)
    return wave


def pose_from_video(data: bytes, field: str, height: int, width: int, fps: float, max_frames: int,
                    extractor: Callable[[np.ndarray], np.ndarray], detection_long_side: int = 512) -> np.ndarray:
    """A driving video -> COCO-17 keypoints (T, 17, 3) in pixels of the output H x W.

    As preprocessing does (`ray_jobs.preprocess.udfs._Detections`): decoded at the request's fps at the
    video's own aspect with long side `detection_long_side` (never upscaled), run through ``extractor``
    (`model.blazepose.BlazePoseExtractor`), then mapped into the output frame fitted as the reference image
    is (cover, centre crop), so the keypoints are where the served frames have them. Joints not found
    stay (0, 0, 0). More than ``max_frames`` frames is an error."""
    from core.media import MediaError, decode_video, detection_size, fit_transform, probe
    from model.pose import transform_points

    with tempfile.NamedTemporaryFile(suffix=".video") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            info = probe(tmp.name)
            size = detection_size((info.width, info.height), detection_long_side)
            frames = decode_video(tmp.name, fps, size, fit="crop", info=info)
        except MediaError as exc:
            raise InputError(field, f"not a readable video: {exc}") from None
    if not 1 <= len(frames) <= max_frames:
        raise InputError(field, f"gives {len(frames)} frames at {fps:g} fps; must lie in [1, {max_frames}]")
    keypoints = extractor(frames)
    mapped = transform_points(keypoints, fit_transform(size, (width, height), "crop"))
    return np.where(keypoints[..., 2:] > 0, mapped, 0).astype(np.float32)


def parse_keypoints(data: bytes, field: str, height: int, width: int) -> np.ndarray:
    """Keypoints JSON [T][17][3] (x, y, conf in pixels of the output size) -> float32 (T, 17, 3)."""
    try:
        keypoints = np.asarray(json.loads(data), dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise InputError(field, f"not a JSON array of numbers [T][17][3] ({exc})") from None
    if keypoints.ndim != 3 or keypoints.shape[1:] != (17, 3) or len(keypoints) == 0:
        raise InputError(field, f"must have shape [T][17][3] (COCO-17 x, y, conf), got {list(keypoints.shape)}")
    if not np.isfinite(keypoints).all():
        raise InputError(field, "keypoints must be finite (conf 0 marks a missing joint)")
    if keypoints[..., 0].max() > 4 * width or keypoints[..., 1].max() > 4 * height:
        raise InputError(field, f"keypoints look out of range for {width}x{height} pixels")
    return keypoints


def parse_face_box(text: str, field: str, height: int, width: int) -> np.ndarray:
    """JSON ``[x0, y0, x1, y1]`` (pixels of the height x width reference) -> float32 (4,); 422 naming why not."""
    try:
        box = np.asarray(json.loads(text), dtype=np.float64)
    except (ValueError, TypeError) as exc:
        raise InputError(field, f"not a JSON array of 4 numbers [x0, y0, x1, y1] ({exc})") from None
    if box.shape != (4,):
        raise InputError(field, f"must be 4 numbers [x0, y0, x1, y1], got shape {list(box.shape)}")
    if not np.isfinite(box).all():
        raise InputError(field, "must be finite numbers")
    x0, y0, x1, y1 = box.tolist()
    if x1 <= x0 or y1 <= y0:
        raise InputError(field, f"must have positive size (x0 < x1 and y0 < y1), got {box.tolist()}")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise InputError(field, f"{box.tolist()} is not inside the {width}x{height} image (pixels of the output size)")
    return box.astype(np.float32)


def resolve_frames(frames: int | None, duration: float | None, fps: float, audio: np.ndarray | None,
                   keypoints: np.ndarray | None, sample_rate: int, default_frames: int) -> tuple[int, str]:
    """Number of frames from frames, else duration, else the keypoints or audio length, else the default; with the field it came from."""
    if frames is not None and duration is not None:
        raise InputError("duration", "give frames or duration, not both")
    if frames is not None:
        return frames, "frames"
    if duration is not None:
        if duration <= 0:
            raise InputError("duration", "must be > 0")
        return max(1, round(duration * fps)), "duration"
    if keypoints is not None:
        return len(keypoints), "keypoints"
    if audio is not None:
        return max(1, math.floor(audio.size / sample_rate * fps)), "audio"
    return default_frames, "frames"


def check_s3_uri(uri: str, field: str, allowed_buckets: list[str]) -> str:
    """Only ``s3://<allowed bucket>/<key>`` is accepted: the server never fetches arbitrary URLs."""
    if not uri.startswith("s3://"):
        raise InputError(field, "only s3:// URIs are accepted (upload the file instead)")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if bucket not in allowed_buckets:
        raise InputError(field, f"bucket {bucket!r} is not in the allowed buckets", status=403)
    if not key or key.endswith("/") or ".." in key.split("/"):
        raise InputError(field, "must name one object: s3://bucket/key")
    return uri
