"""Pure per-clip math of the preprocessing job: clip split, geometry, audio slices, motion mask, face track.

Stateless numpy/OpenCV functions, no Ray: the Ray Data UDFs in `ray_jobs.preprocess.udfs` call these,
and tests call them directly.
"""

from __future__ import annotations

import cv2
import numpy as np

from core.media import fit_transform  # noqa: F401  (re-exported: the preprocessing geometry)
from model.face import crop_faces, haar_cascade, largest_face
from model.pose import transform_points  # noqa: F401  (re-exported)

__all__ = ["assign_split", "SPLITS", "clip_starts", "fit_transform", "resample_track", "transform_points", "transform_boxes",
           "slice_audio", "audio_samples_per_clip", "motion_mask", "smooth_boxes", "fill_missing_boxes",
           "crop_faces", "detect_faces_haar"]


def clip_starts(num_frames: int, clip_frames: int, stride: int) -> np.ndarray:
    """Start frames of every full clip of `clip_frames` frames, every `stride` frames; (K,) int64."""
    if num_frames < clip_frames:
        return np.zeros(0, np.int64)
    return np.arange(0, num_frames - clip_frames + 1, stride, dtype=np.int64)


def resample_track(track: np.ndarray, src_fps: float, dst_fps: float, num_frames: int) -> np.ndarray:
    """Per-frame annotations (N, ...) at `src_fps` -> (num_frames, ...) at `dst_fps` by nearest source frame.

    Mirrors ffmpeg's fps filter (round to nearest); frames past the track's end repeat its last entry.
    """
    index = np.rint(np.arange(num_frames) * (src_fps / dst_fps)).astype(np.int64)
    return track[np.clip(index, 0, len(track) - 1)]


def transform_boxes(boxes: np.ndarray, transform: tuple[float, float, float]) -> np.ndarray:
    """Boxes (..., 4) [x0, y0, x1, y1] in source pixels -> decoded-frame pixels."""
    scale, tx, ty = transform
    offset = np.array([tx, ty, tx, ty], np.float32)
    return (boxes.astype(np.float32) * scale + offset).astype(np.float32)


def audio_samples_per_clip(clip_frames: int, fps: float, sample_rate: int) -> int:
    """N: audio samples aligned to one clip of `clip_frames` frames."""
    return int(round(clip_frames * sample_rate / fps))


def slice_audio(wave: np.ndarray, start_frame: int, clip_frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """The clip's audio (N,) float32 from the video's mono wave; zero-padded past the end of the audio."""
    num = audio_samples_per_clip(clip_frames, fps, sample_rate)
    start = int(round(start_frame * sample_rate / fps))
    out = np.zeros(num, np.float32)
    piece = wave[start:start + num]
    out[: len(piece)] = piece
    return out


# Frames per motion-mask chunk are sized to this many bytes, so every temporary (absolute
# differences, per-pixel maxima, masks) stays a few MB. Whole-clip temporaries at the wan-1.3b
# geometry (81 x 480 x 832) are ~100 MB each, fresh memory on every call: measured 310-410 ms per
# clip inside the job against 85-97 ms chunked.
_MASK_CHUNK_BYTES = 4 << 20


def motion_mask(frames: np.ndarray, delta: float, factor: int, chunk_bytes: int = _MASK_CHUNK_BYTES) -> np.ndarray:
    """DanceLCM motion mask: uint8 (B, T, H, W, 3) -> float32 (B, T, H/f, W/f) in [0, 1].

    A pixel moves at frame t when max_c |f_t - f_{t+1}| > delta or max_c |f_t - f_{t-1}| > delta
    (intensities in [0, 1], neighbours within the same clip); the binary mask is average-pooled by
    `factor` to latent resolution, so each cell holds the fraction of its pixels that move. Frames
    are processed in chunks of about `chunk_bytes` (the result does not depend on it).
    """
    batch, num_frames, height, width, _ = frames.shape
    flat = frames.reshape(batch * num_frames, height, width, 3)
    total = len(flat)
    threshold = np.uint8(min(255, int(np.floor(delta * 255.0))))
    crosses_clip = np.arange(total) % num_frames == num_frames - 1  # pair (i, i + 1) spans two clips
    counts = np.uint8 if factor * factor <= 255 else np.uint16  # moving pixels per cell fit
    out = np.empty((total, height // factor, width // factor), np.float32)
    chunk = max(1, chunk_bytes // (height * width * 3))
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        lo, hi = max(start - 1, 0), min(stop + 1, total)  # the frames of every pair touching [start, stop)
        steps = _moving_between(flat[lo:hi], threshold)  # steps[p]: frame lo + p vs lo + p + 1
        steps[crosses_clip[lo:hi - 1]] = False
        moving = np.zeros((stop - start, height, width), counts)
        forward = min(stop, hi - 1)  # frames [start, forward) have a next frame in this window
        moving[:forward - start] = steps[start - lo:forward - lo]
        backward = max(start, lo + 1)  # frames [backward, stop) have a previous frame in it
        moving[backward - start:] |= steps[backward - 1 - lo:stop - 1 - lo]
        out[start:stop] = _sum_pool(moving, factor)
    out /= np.float32(factor * factor)
    return out.reshape(batch, num_frames, height // factor, width // factor)


def _moving_between(frames: np.ndarray, threshold: np.uint8) -> np.ndarray:
    """uint8 (N, H, W, 3) -> bool (N-1, H, W): max-channel |f_{i+1} - f_i| > threshold."""
    later, earlier = frames[1:], frames[:-1]
    diff = np.maximum(later, earlier)
    diff -= np.minimum(later, earlier)  # |a - b| in uint8 without widening
    per_pixel = np.maximum(np.maximum(diff[..., 0], diff[..., 1]), diff[..., 2])
    return per_pixel > threshold


def _sum_pool(values: np.ndarray, factor: int) -> np.ndarray:
    """Sum over non-overlapping factor x factor cells of the last two axes (..., H, W) -> (..., H/f, W/f).

    Strided adds rather than `reshape(..., f, W/f, f).sum(axis=(-3, -1))`: numpy reduces short
    inner axes slowly, and this was most of the motion mask's time (2.4 of 4 ms per 8 s video).
    """
    columns = values[..., 0::factor].copy()
    for k in range(1, factor):
        columns += values[..., k::factor]
    cells = columns[..., 0::factor, :].copy()
    for k in range(1, factor):
        cells += columns[..., k::factor, :]
    return cells


def fill_missing_boxes(boxes: np.ndarray) -> tuple[np.ndarray, float]:
    """Boxes (T, 4) with NaN rows where nothing was found -> linearly interpolated (T, 4), found fraction.

    With no box at all the result is all-NaN and the fraction 0.
    """
    found = ~np.isnan(boxes).any(axis=1)
    fraction = float(found.mean()) if len(boxes) else 0.0
    if not found.any() or found.all():
        return boxes.astype(np.float32), fraction
    steps, known = np.arange(len(boxes)), np.flatnonzero(found)
    filled = np.stack([np.interp(steps, known, boxes[known, k]) for k in range(4)], axis=1)
    return filled.astype(np.float32), fraction


def smooth_boxes(boxes: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (edge-padded) of box centre and size over time: (T, 4) -> (T, 4)."""
    if window <= 1 or len(boxes) < 2:
        return boxes.astype(np.float32)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    size = boxes[:, 2:] - boxes[:, :2]
    track = np.concatenate([centre, size], axis=1)
    half = window // 2
    padded = np.pad(track, ((half, half), (0, 0)), mode="edge")
    kernel = np.ones(window) / window
    smoothed = np.stack([np.convolve(padded[:, k], kernel, mode="valid") for k in range(4)], axis=1)
    centre, size = smoothed[:, :2], smoothed[:, 2:]
    return np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)


# Face sizes searched near the last face, as multiples of its side: a face between two searched
# frames rarely grows or shrinks by a third, and a miss falls back to the whole frame anyway.
_TRACK_SIZES = (0.75, 4 / 3)


def detect_faces_haar(frames: np.ndarray, min_side: int = 192, every: int = 1, track_search: float = 2.0,
                      min_found: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Haar face track: uint8 (T, H, W, 3) -> (boxes float32 (T, 4), searched bool (T,)).

    Boxes are NaN on frames not searched or where no face was found; callers interpolate
    (`fill_missing_boxes`) and count detections over the searched frames only.
    1. Searched: every `every`-th frame and the last one.
    2. After a frame with a face, the next search looks only near it: a square `track_search` x
       the face's side around its centre, for faces 0.75-1.33x its size. On one core the cascade
       takes ~38 ms over a 480x832 frame and ~6 ms over such a window around a 113 px face, at the
       same resolution (the window sizes, not a smaller image, make the saving).
    3. On the first frame, after a miss, or with `track_search=0`, the whole frame; the largest face
       wins. So the track follows one face; a larger face elsewhere is taken only once it is lost.
    4. The search stops once fewer than `min_found` of the frames to search can still have a face
       (a caller that then drops the track loses nothing; a faceless clip costs half as much at 0.5).
    Frames are upscaled so the short side is at least `min_side`: the cascade's 24x24 window
    cannot see the few-pixel faces of small frames otherwise.
    """
    if every < 1 or track_search < 0:
        raise ValueError(f"need every >= 1 and track_search >= 0, got {every}, {track_search}")
    cascade = haar_cascade()
    upscale = max(1.0, min_side / min(frames.shape[1:3]))
    searched = np.zeros(len(frames), bool)
    searched[::every] = True
    searched[-1:] = True
    boxes = np.full((len(frames), 4), np.nan, np.float32)
    planned, last, misses = np.flatnonzero(searched), None, 0
    for t in planned:
        gray = cv2.cvtColor(frames[t], cv2.COLOR_RGB2GRAY)
        box = _haar_near(cascade, gray, last, track_search, upscale) if last is not None and track_search else None
        if box is None:
            box = largest_face(cascade, gray, upscale)
        if box is not None:
            boxes[t] = box
        last, misses = box, misses + (box is None)
        if (len(planned) - misses) / len(planned) < min_found:  # the caller's own test, so it agrees
            break
    return boxes, searched


def _haar_near(cascade, gray: np.ndarray, last: np.ndarray, track_search: float, upscale: float):
    """The largest face of about `last`'s size in a window around it (frame pixels), or None."""
    side = float(max(last[2] - last[0], last[3] - last[1]))
    centre, half = (last[:2] + last[2:]) / 2.0, track_search * side / 2.0
    x0, y0 = (max(0, int(np.floor(c - half))) for c in centre)
    x1, y1 = min(gray.shape[1], int(np.ceil(centre[0] + half))), min(gray.shape[0], int(np.ceil(centre[1] + half)))
    if x1 - x0 < side or y1 - y0 < side:
        return None  # the face left the frame
    sizes = (int(_TRACK_SIZES[0] * side * upscale), int(np.ceil(_TRACK_SIZES[1] * side * upscale)))
    return largest_face(cascade, gray[y0:y1, x0:x1], upscale, sizes, (x0, y0))


SPLITS = ("train", "heldout")


def assign_split(sidecar_split: str | None, identity_id: str, video_id: str, rule) -> str:
    """"train" or "heldout" for one video: the sidecar's when allowed and valid, else by ``rule`` (a
    `ray_jobs.preprocess.config.SplitConfig`) on the video's key (identity when known, else video id): an explicit list, or a salted hash under the fraction."""
    import hashlib

    if rule.use_sidecar and sidecar_split in SPLITS:
        return sidecar_split
    key = identity_id if identity_id not in ("", "unknown") else video_id
    if rule.heldout:
        return "heldout" if key in rule.heldout or video_id in rule.heldout else "train"
    draw = int(hashlib.sha256(f"{rule.salt}:{key}".encode()).hexdigest()[:12], 16) / 16**12
    return "heldout" if draw < rule.heldout_fraction else "train"
