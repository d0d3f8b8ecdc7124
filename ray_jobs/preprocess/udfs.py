"""The Ray Data UDFs of the preprocessing pipeline, one per stage, and the stream's row layout.

Every row in the stream has the same columns, whether it is a clip or an error: an error row carries
zero-filled tensors and a non-empty ``error_stage`` / ``error_reason``. Uniform rows keep every block
on one fixed-shape Arrow schema (Ray Data's table builder cannot mix them), and let every stage
pass errors through untouched; the writer splits clips from errors at the end. Each stage catches
exceptions per clip and turns them into error rows, so one bad input never fails a task.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np

from model.face import face_detector, reference_face, resolve_detector
from core.media import (MediaError, decode_audio, decode_video, decode_video_and_audio, detection_size,
                         expected_frames, iter_video_chunks, probe)
from model.pose import render_pose
from core.storage import Storage, StorageError, sha256_file
from artifacts.audio import shared_audio_encoder
from artifacts.shards import shard_bytes
from ray_jobs.preprocess import stages
from ray_jobs.preprocess.config import PreprocessConfig

__all__ = ["StageError", "SHARD_COLUMNS", "LATENT_COLUMNS", "SUMMARY_COLUMNS", "TIMING_PREFIX", "decode_clips",
           "decode_clip_batch", "iter_clip_rows", "iter_clip_batches", "error_row", "add_audio_features", "add_pose",
           "add_face_track", "add_motion_mask", "pixels_kept", "CPU_STAGES", "process_videos", "clips_from_frames", "VaeEncoder",
           "write_shard"]

log = logging.getLogger("ray_jobs.preprocess")

# The shard schema of docs/design.md, in column order; the VAE adds LATENT_COLUMNS.
SHARD_COLUMNS: tuple[str, ...] = (
    "video_id", "clip_index", "source", "identity_id", "split", "start_frame", "fps",
    "frames", "ref_frame", "keypoints", "pose", "audio", "audio_feats", "has_audio",
    "face_boxes", "face_crops", "has_face", "ref_face_box", "ref_face_crop", "has_ref_face", "motion_mask",
    "mouth_openness")
# The face condition is the reference's face latent only: per-frame face crops are never encoded, so the
# clip's own (ground-truth) mouth cannot reach the model (model/face.py).
LATENT_COLUMNS: tuple[str, ...] = ("latents", "ref_latent", "ref_face_latent")
# One summary row per stream row comes back to the driver (no tensors), plus the timing columns.
SUMMARY_COLUMNS: tuple[str, ...] = ("source", "video_id", "clip_index", "source_sha256", "error_stage",
                                    "error_reason", "shard")
# Seconds each task spent in a step ("decode", "pose", ... "write_shard"), in a float column
# f"{TIMING_PREFIX}{step}" spread evenly over the task's rows: the driver's sum over all rows is then
# the job's time in that step, however Ray Data re-batches rows in between (the VAE path does).
TIMING_PREFIX = "seconds_"
# Steps timed inside decoding, per video window: the pose and face models on the detection stream
# (`_Detections`); their rows carry them from the start, so `process_videos` takes them out of "decode".
MODEL_STEPS: tuple[str, ...] = ("pose_model", "face_model")


class StageError(Exception):
    """A per-input failure that becomes an error row: `stage` names the step, `reason` the cause."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


# ----------------------------------------------------------------------------------- decode / clip
def _row_template(cfg: PreprocessConfig) -> dict[str, Any]:
    """Zero-filled tensors of the decode stage's columns (fixed shapes from the config)."""
    t, h, w = cfg.clip_frames, cfg.height, cfg.width
    samples = stages.audio_samples_per_clip(t, cfg.fps, cfg.audio.features.sample_rate)
    return {"frames": np.zeros((t, h, w, 3), np.uint8), "ref_frame": np.zeros((h, w, 3), np.uint8),
            "keypoints": np.zeros((t, 17, 3), np.float32), "face_boxes": np.zeros((t, 4), np.float32),
            "ref_face_box": np.full(4, np.nan, np.float32), "mouth_openness": np.full(t, np.nan, np.float32), "audio": np.zeros(samples, np.float32),
            "has_audio": False, "has_keypoints": False, "has_face_boxes": False,
            **{TIMING_PREFIX + step: 0.0 for step in MODEL_STEPS}}


def error_row(cfg: PreprocessConfig, item: dict, stage: str, reason: str, sha256: str = "") -> dict[str, Any]:
    """The stream row of an input that failed before clipping (clip_index -1)."""
    return {"source": item["source"], "video_id": Path(item["source"]).stem, "clip_index": -1,
            "identity_id": "unknown", "split": "unknown", "start_frame": -1, "fps": float(cfg.fps),
            "source_sha256": sha256, "error_stage": stage, "error_reason": reason, **_row_template(cfg)}


def decode_clips(item: dict, cfg: PreprocessConfig) -> list[dict[str, Any]]:
    """One input file -> one row per clip, or error rows (never raises): every window of `iter_clip_rows`."""
    return [row for rows, _ in iter_clip_rows(item, cfg) for row in rows]


def iter_clip_rows(item: dict, cfg: PreprocessConfig) -> Iterator[tuple[list[dict[str, Any]], bool]]:
    """One input file -> (clip rows, streamed) lists, then an error row if it failed (never raises).

    A video whose decoded frames fit in `cfg.decode_window_mb` comes as one list (or one error row),
    `streamed` False; a larger one as one list per window of frames, `streamed` True, so a failure
    late in it (a truncated tail) follows the clips already decoded: the video is then 'partial',
    with those clips kept.
    """
    storage = Storage(cfg.storage)
    clips = 0
    try:
        for rows, streamed in _decode_clip_windows(item, cfg, storage):
            clips += len(rows)
            yield rows, streamed
        log.info("%s: %d clips", item["source"], clips)
    except StageError as exc:
        log.warning("%s: %s failed after %d clips: %s", item["source"], exc.stage, clips, exc.reason)
        yield [error_row(cfg, item, exc.stage, exc.reason, getattr(exc, "sha256", ""))], False
    except Exception as exc:  # an unforeseen bad input must still never stop the job
        log.exception("%s: unexpected decode failure", item["source"])
        yield [error_row(cfg, item, "decode", f"{type(exc).__name__}: {exc}")], False


def decode_clip_batch(batch: dict[str, np.ndarray], cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Input items -> the clip (or error) rows of all of them, as one columnar batch (every window)."""
    items = [dict(zip(batch, values)) for values in zip(*batch.values())]
    return _rows_to_columns([row for item in items for row in decode_clips(item, cfg)])


def iter_clip_batches(batch: dict[str, np.ndarray], cfg: PreprocessConfig) -> Iterator[dict[str, np.ndarray]]:
    """Input items -> columnar clip (or error) batches: each window of a streamed video as it comes,
    then every video decoded whole (and every error row) together in one batch.

    Columnar rather than a flat_map of row dicts: Ray Data then fuses decoding with the CPU stages
    into one task, instead of materialising every clip as an Arrow row block in between.
    """
    held: list[dict[str, Any]] = []
    for item in (dict(zip(batch, values)) for values in zip(*batch.values())):
        for rows, streamed in iter_clip_rows(item, cfg):
            if streamed:
                yield _rows_to_columns(rows)
            else:
                held.extend(rows)
    if held:
        yield _rows_to_columns(held)


def clips_from_frames(source: str, sidecar: dict, frames: np.ndarray, wave: np.ndarray | None,
                      cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """Frames already at the target fps and size (rendered, not decoded) -> the columnar clip batch
    after every CPU stage: what `process_videos` yields for a video file, minus the codec.

    frames uint8 (N, cfg.height, cfg.width, 3) at cfg.fps; wave float32 (S,) at the feature sample rate
    or None (silent). For in-process data without Ray Data or ffmpeg, e.g. `ray_jobs.pretrain_teacher`.
    """
    if frames.ndim != 4 or frames.shape[1:] != (cfg.height, cfg.width, 3):
        raise ValueError(f"frames must be (N, {cfg.height}, {cfg.width}, 3), got {frames.shape}")
    info = SimpleNamespace(fps=cfg.fps, width=cfg.width, height=cfg.height)
    clip = _VideoClips({"source": source}, cfg, sidecar, info, "", wave)
    if clip.detections.needed:  # no source beyond these frames: the models see them
        clip.detections.add(frames)
    batch = _rows_to_columns(clip.rows(frames, 0, len(frames)))
    for stage in CPU_STAGES:
        batch = stage(batch, cfg)
    return batch


def _rows_to_columns(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    columns = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if isinstance(values[0], np.ndarray):
            columns[key] = np.stack(values)
        else:
            columns[key] = np.array(values, dtype=object if isinstance(values[0], str) else None)
    return columns


def _read_sidecar(storage: Storage, uri: str) -> dict:
    """The sidecar JSON object ({} when the video has none); unreadable -> StageError('sidecar')."""
    if not uri:
        return {}
    try:
        data = storage.read_json(uri)
    except StorageError as exc:
        raise StageError("sidecar", f"unreadable sidecar {uri}: {exc}") from exc
    if not isinstance(data, dict):
        raise StageError("sidecar", f"sidecar {uri} is not a JSON object")
    return data


def _decode_clip_windows(item: dict, cfg: PreprocessConfig, storage: Storage) -> Iterator[tuple[list[dict], bool]]:
    """(clip rows, streamed) of one input, whole or window by window; StageError (with .sha256) on failure."""
    sidecar = _read_sidecar(storage, item["sidecar"])
    with storage.local_copy(item["source"]) as path:
        sha256 = sha256_file(path)
        try:
            info = _probe(path)
            frame_bytes, window_bytes = cfg.width * cfg.height * 3, cfg.decode_window_mb * (1 << 20)
            if 0 < expected_frames(info, cfg.fps) * frame_bytes <= window_bytes:
                frames, wave = _decode_media(path, info, cfg)
                clip = _VideoClips(item, cfg, sidecar, info, sha256, wave)
                if clip.detections.needed:
                    clip.detections.add(frames if clip.detections.reuses_clip_frames else
                                        _decode_detection_frames(path, info, cfg, clip.detections.size))
                rows = clip.rows(frames, 0, len(frames))
                clip.check_any()
                yield rows, False
                return
            clip = _VideoClips(item, cfg, sidecar, info, sha256, _decode_wave(path, info, cfg))
            chunk = max(cfg.clip_frames, int(window_bytes // frame_bytes))
            try:
                for held, held_from in _held_windows(path, info, cfg, chunk, clip):
                    if rows := clip.rows(held, held_from, held_from + len(held)):
                        yield rows, True
            except MediaError as exc:
                raise StageError("decode", exc.reason) from exc
            clip.check_any()
        except StageError as exc:
            exc.sha256 = sha256
            raise


def _held_windows(path: Path, info, cfg: PreprocessConfig, chunk: int,
                  clip: "_VideoClips") -> Iterator[tuple[np.ndarray, int]]:
    """(frames, index of frames[0]) as ffmpeg streams them: each time the frames not yet in a whole clip
    plus the next `chunk`. Frames before the next clip's start are let go (memory: ~2 chunks).

    When `clip.detections` needs the models, a second ffmpeg run streams the detection frames chunk by
    chunk beside this one, and each chunk's keypoints and boxes are found before its clips are made."""
    held, held_from, detections = None, 0, clip.detections
    beside = (iter_video_chunks(path, cfg.fps, detections.size, chunk, "crop", info, cfg.ffmpeg_threads)
              if detections.needed and not detections.reuses_clip_frames else None)
    for frames in iter_video_chunks(path, cfg.fps, (cfg.width, cfg.height), chunk, cfg.fit, info, cfg.ffmpeg_threads):
        if detections.needed:  # the detection stream in step: same fps filter, so the same frame count
            detections.add(frames if beside is None else next(beside, frames[:0]))
        held = frames if held is None else np.concatenate([held, frames])
        yield held, held_from
        keep_from = min(clip.next_start, held_from + len(held))
        held, held_from = held[keep_from - held_from:], keep_from


class _VideoClips:
    """Builds one video's clip rows, window by window, with global clip indices and frame numbers."""

    def __init__(self, item: dict, cfg: PreprocessConfig, sidecar: dict, info, sha256: str, wave):
        self.item, self.cfg, self.sidecar, self.info, self.sha256, self.wave = item, cfg, sidecar, info, sha256, wave
        self.done, self.seen, self.base = 0, 0, None
        self.detections = _Detections(cfg, info, sidecar)

    @property
    def next_start(self) -> int:
        return self.done * self.cfg.stride

    def rows(self, frames: np.ndarray, first: int, end: int) -> list[dict[str, Any]]:
        """Rows of the clips not yet made that end by frame `end`; frames[0] is frame `first` of the video."""
        cfg, self.seen = self.cfg, max(self.seen, end)
        starts = stages.clip_starts(end, cfg.clip_frames, cfg.stride)[self.done:]
        if not len(starts):
            return []
        tracks = self.detections.merge(_sidecar_tracks(self.sidecar, self.info, cfg, end))
        if self.base is None:  # the first window holds the video's first frame: the reference of every clip
            sidecar, source = self.sidecar, self.item["source"]
            video_id, identity = str(sidecar.get("video_id") or Path(source).stem), str(sidecar.get("identity_id", "unknown"))
            self.base = {"source": source, "video_id": video_id, "identity_id": identity,
                         "split": stages.assign_split(sidecar.get("split"), identity, video_id, cfg.split),
                         "fps": float(cfg.fps),
                         "source_sha256": self.sha256, "error_stage": "", "error_reason": "",
                         "ref_frame": frames[0].copy(), "ref_face_box": _first_box(tracks),
                         "has_audio": self.wave is not None, **tracks["flags"]}
        wave = self.wave if self.wave is not None else np.zeros(0, np.float32)
        rate, rows = cfg.audio.features.sample_rate, []
        for index, start in enumerate(starts.tolist(), start=self.done):
            window, local = slice(start, start + cfg.clip_frames), slice(start - first, start - first + cfg.clip_frames)
            audio = stages.slice_audio(wave, start, cfg.clip_frames, cfg.fps, rate)
            rows.append({**self.base, "clip_index": index, "start_frame": start, "frames": frames[local],
                         "audio": audio, **{k: v[window] for k, v in tracks["per_frame"].items()}})
        self.done += len(rows)
        for step, seconds in self.detections.take_seconds().items():  # spread over this window's rows
            for row in rows:
                row[TIMING_PREFIX + step] = seconds / len(rows)
        return rows

    def check_any(self) -> None:
        """A video that yielded no clip is shorter than one."""
        if not self.done:
            raise StageError("clip", f"shorter than one clip: {self.seen} frames at {self.cfg.fps:g} fps "
                                     f"< clip_frames={self.cfg.clip_frames}")


def _decode_detection_frames(path: Path, info, cfg: PreprocessConfig, size: tuple[int, int]) -> np.ndarray:
    try:
        return decode_video(path, cfg.fps, size, "crop", info, cfg.ffmpeg_threads)
    except MediaError as exc:
        raise StageError("decode", f"detection stream: {exc.reason}") from exc


class _Detections:
    """One video's keypoints and face boxes from the models, for the tracks its sidecar does not give.

    The models see frames decoded at `size` (the source's aspect, `detection_long_side`), not the clip
    geometry; what they find is mapped to clip pixels with the same crop/pad transform as sidecar
    tracks (`stages.fit_transform`). When the clip frames are at least that large in both axes, they
    are what the models see (`reuses_clip_frames`). Frames come in order, a whole video or one window at a time
    (each window's track is smoothed on its own); missed faces are NaN, for `add_face_track` to fill.
    """

    def __init__(self, cfg: PreprocessConfig, info, sidecar: dict):
        self.cfg = cfg
        self.pose = "keypoints" not in sidecar and cfg.pose.extractor != "none"
        self.face = "face_boxes" not in sidecar and cfg.face.detector != "none"
        size = detection_size((info.width, info.height), cfg.detection_long_side)
        # Clip frames at least as large as the detection frames (832x480 clips of 720p) already give the
        # models their resolution: no second decode, at the price of the edges a crop cut off.
        self.reuses_clip_frames = cfg.width >= size[0] and cfg.height >= size[1]
        self.size = (cfg.width, cfg.height) if self.reuses_clip_frames else size
        self.transform = (1.0, 0.0, 0.0) if self.reuses_clip_frames else stages.fit_transform(
            size, (cfg.width, cfg.height), cfg.fit)
        self.keypoints, self.boxes = np.zeros((0, 17, 3), np.float32), np.zeros((0, 4), np.float32)
        self.seconds = dict.fromkeys(MODEL_STEPS, 0.0)

    @property
    def needed(self) -> bool:
        return self.pose or self.face

    def add(self, frames: np.ndarray) -> None:
        """Run the models on the next frames uint8 (n, H, W, 3) of the detection stream."""
        count = len(frames)
        keypoints, boxes = np.zeros((count, 17, 3), np.float32), np.full((count, 4), np.nan, np.float32)
        if self.pose and count:
            start = time.perf_counter()
            keypoints = _extract_keypoints(frames, self.cfg)
            found = keypoints[..., 2:] > 0
            keypoints = np.where(found, stages.transform_points(keypoints, self.transform), 0).astype(np.float32)
            self.seconds["pose_model"] += time.perf_counter() - start
        if self.face and count:
            start = time.perf_counter()
            boxes = stages.transform_boxes(_face_model_track(frames, _local_face_config(self.cfg)), self.transform)
            self.seconds["face_model"] += time.perf_counter() - start
        self.keypoints = np.concatenate([self.keypoints, keypoints])
        self.boxes = np.concatenate([self.boxes, boxes])

    def merge(self, tracks: dict) -> dict:
        """`_sidecar_tracks` output with the found tracks in place of the missing ones (frames not yet
        seen by the models, e.g. a detection stream a frame short, get conf 0 / NaN)."""
        per_frame, count = tracks["per_frame"], len(tracks["per_frame"]["keypoints"])
        have = min(count, len(self.keypoints))
        if self.pose:
            per_frame["keypoints"] = np.zeros((count, 17, 3), np.float32)
            per_frame["keypoints"][:have] = self.keypoints[:have]
            tracks["flags"]["has_keypoints"] = True
        if self.face:
            per_frame["face_boxes"] = np.full((count, 4), np.nan, np.float32)
            per_frame["face_boxes"][:have] = self.boxes[:have]
            tracks["flags"]["has_face_boxes"] = True
        return tracks

    def take_seconds(self) -> dict[str, float]:
        """Model seconds since the last call (for the rows of the window just made)."""
        seconds, self.seconds = self.seconds, dict.fromkeys(MODEL_STEPS, 0.0)
        return seconds


def _face_model_track(frames: np.ndarray, face) -> np.ndarray:
    """Face boxes float32 (n, 4) of frames uint8 (n, H, W, 3) by the configured detector; NaN where none.

    Haar searches every `detect_every`-th frame (tracking near the last face); a frame between two
    searched frames gets their boxes' linear interpolation when both found a face, else NaN, so a
    clip's found fraction is about that of its searched frames."""
    detector = resolve_detector(face.detector, face.model_dir)
    if detector == "blazeface":
        detect = face_detector(face)
        return np.array([_nan_if_none(detect(frame)) for frame in frames], np.float32).reshape(-1, 4)
    boxes, searched = stages.detect_faces_haar(frames, face.min_side, every=face.detect_every,
                                               track_search=face.track_search)
    known = np.flatnonzero(searched)  # frame 0 and the last frame are always searched
    for t in np.flatnonzero(~searched):
        after = known[np.searchsorted(known, t)]
        before = known[np.searchsorted(known, t) - 1]
        share = (t - before) / (after - before)
        boxes[t] = (1 - share) * boxes[before] + share * boxes[after]  # NaN unless both were found
    return boxes


def _first_box(tracks: dict) -> np.ndarray:
    """The sidecar's face box on the video's first frame (the reference), NaN when it has none."""
    if not tracks["flags"]["has_face_boxes"]:
        return np.full(4, np.nan, np.float32)
    return tracks["per_frame"]["face_boxes"][0].astype(np.float32).copy()


def _probe(path: Path):
    try:
        info = probe(path)
    except MediaError as exc:
        raise StageError("probe", exc.reason) from exc
    if not info.has_video:
        raise StageError("probe", "no video stream")
    return info


def _decode_media(path: Path, info, cfg: PreprocessConfig):
    """(frames uint8 (N, H, W, 3), wave (S,) or None) at the target fps/size/rate.

    One ffmpeg run for both streams; only when that run fails are the streams decoded apart, so
    the error names the stage (decode or audio) that is really at fault.
    """
    if info.has_audio:
        try:
            return decode_video_and_audio(path, cfg.fps, (cfg.width, cfg.height), cfg.fit,
                                          cfg.audio.features.sample_rate, info, cfg.ffmpeg_threads)
        except MediaError:
            pass  # attribute it below
    try:
        frames = decode_video(path, cfg.fps, (cfg.width, cfg.height), cfg.fit, info, cfg.ffmpeg_threads)
    except MediaError as exc:
        raise StageError("decode", exc.reason) from exc
    return frames, _decode_wave(path, info, cfg)


def _decode_wave(path: Path, info, cfg: PreprocessConfig) -> np.ndarray | None:
    """The video's mono wave at the feature sample rate; None for a silent video when allowed."""
    if not info.has_audio:
        if cfg.audio.allow_silent:
            return None
        raise StageError("audio", "no audio stream (set audio.allow_silent=true to keep silent videos)")
    try:
        return decode_audio(path, cfg.audio.features.sample_rate, info, cfg.ffmpeg_threads)
    except MediaError as exc:
        raise StageError("audio", exc.reason) from exc


def _sidecar_tracks(sidecar: dict, info, cfg: PreprocessConfig, num_frames: int) -> dict:
    """Sidecar keypoints / face boxes / mouth track resampled to the decoded frames and geometry."""
    src_fps = float(sidecar.get("fps") or info.fps)
    src_size = (int(sidecar.get("width") or info.width), int(sidecar.get("height") or info.height))
    transform = stages.fit_transform(src_size, (cfg.width, cfg.height), cfg.fit)
    per_frame = {"keypoints": np.zeros((num_frames, 17, 3), np.float32),
                 "face_boxes": np.zeros((num_frames, 4), np.float32),
                 "mouth_openness": np.full(num_frames, np.nan, np.float32)}
    flags = {"has_keypoints": False, "has_face_boxes": False}
    try:
        if "keypoints" in sidecar:
            points = _track(sidecar["keypoints"], (17, 3), src_fps, cfg.fps, num_frames)
            per_frame["keypoints"], flags["has_keypoints"] = stages.transform_points(points, transform), True
        if "face_boxes" in sidecar:
            boxes = _track(sidecar["face_boxes"], (4,), src_fps, cfg.fps, num_frames)
            per_frame["face_boxes"], flags["has_face_boxes"] = stages.transform_boxes(boxes, transform), True
        if "mouth_openness" in sidecar:
            per_frame["mouth_openness"] = _track(sidecar["mouth_openness"], (), src_fps, cfg.fps, num_frames)
    except (TypeError, ValueError) as exc:
        raise StageError("sidecar", f"malformed sidecar track: {exc}") from exc
    return {"per_frame": per_frame, "flags": flags}


def _track(values: Any, frame_shape: tuple[int, ...], src_fps: float, dst_fps: float, num_frames: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 + len(frame_shape) or array.shape[1:] != frame_shape or not len(array):
        raise ValueError(f"expected (N, {', '.join(map(str, frame_shape))}) per-frame values, got {array.shape}")
    return stages.resample_track(array, src_fps, dst_fps, num_frames)


# ------------------------------------------------------------------------------ per-clip stages
def _for_each_clip(batch: dict, stage: str, column: str, shape: tuple, dtype, fn: Callable[..., Any],
                   in_place: bool = False) -> None:
    """Fill batch[column] (B, *shape) per good row; a raising row becomes an error row (zeros).

    `fn(i)` returns row i, or with `in_place` `fn(i, row)` fills the zero-filled row itself, which
    saves a second array of the column's size and the copy (pose maps: ~100 MB per clip at 832x480).
    """
    errors = batch["error_stage"].astype(object)
    reasons = batch["error_reason"].astype(object)
    out = np.zeros((len(errors), *shape), dtype)
    for i in range(len(errors)):
        if errors[i]:
            continue
        try:
            if in_place:
                fn(i, out[i])
            else:
                out[i] = fn(i)
        except Exception as exc:  # per-clip failure: keep the job going, record why
            out[i] = 0  # an in-place fill may have stopped halfway; error rows carry zeros
            errors[i], reasons[i] = stage, f"{type(exc).__name__}: {exc}"
            log.warning("%s clip %s: %s failed: %s", batch["source"][i], batch["clip_index"][i], stage, exc)
    batch["error_stage"], batch["error_reason"], batch[column] = errors, reasons, out


def add_audio_features(batch: dict, cfg: PreprocessConfig) -> dict:
    """map_batches UDF: `audio_feats` (B, T, W, n_mels); zeros for silent clips (has_audio False).

    The configured encoder (log-mel or wav2vec2) is built once per worker process, and is the same
    `model.audio.AudioEncoder` serving runs, so shards and served requests get the same features.
    """
    feat_cfg = cfg.audio.features
    shape = (cfg.clip_frames, feat_cfg.window, feat_cfg.n_mels)
    encoder = shared_audio_encoder(feat_cfg, cfg.storage)

    def features(i: int) -> np.ndarray:
        if not batch["has_audio"][i]:
            return np.zeros(shape, np.float32)
        return encoder(batch["audio"][i], cfg.fps, cfg.clip_frames)

    _for_each_clip(batch, "audio_features", "audio_feats", shape, np.float32, features)
    return batch


def add_pose(batch: dict, cfg: PreprocessConfig) -> dict:
    """map_batches UDF: `pose` (B, T, H, W, 3) from the keypoints: the sidecar's or those found on the detection
    stream while decoding (`_Detections`); a clip with neither (this stage called on clip frames alone, as
    without Ray) has the extractor run on its clip frames here."""
    keypoints = np.array(batch["keypoints"], np.float32)

    kept = pixels_kept(batch, cfg)

    def pose(i: int, maps: np.ndarray) -> None:
        if not batch["has_keypoints"][i]:
            keypoints[i] = _extract_keypoints(batch["frames"][i], cfg)
        if kept[i]:  # else never written (store_pixels): the zero pages stay untouched, ~97 MB at 832x480
            render_pose(keypoints[i], cfg.height, cfg.width, cfg.pose.render_conf_threshold, out=maps)

    _for_each_clip(batch, "pose", "pose", (cfg.clip_frames, cfg.height, cfg.width, 3), np.uint8, pose, in_place=True)
    batch["keypoints"] = keypoints
    return batch


def pixels_kept(batch: dict, cfg: PreprocessConfig) -> np.ndarray:
    """(B,) bool: rows whose pixel columns (`artifacts.shards.PIXEL_COLUMNS`) are written: every row with
    `store_pixels` (resolved, `PreprocessConfig.stores_pixels`), else every row but the train clips."""
    splits = np.asarray(batch["split"]).astype(object)
    return np.ones(len(splits), bool) if cfg.stores_pixels else splits != "train"


def _extract_keypoints(frames: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """COCO-17 keypoints (n, 17, 3) in the pixels of `frames` from the configured extractor
    (`_Detections` gives it the detection stream and maps the result to clip pixels)."""
    if cfg.pose.extractor == "none":
        raise StageError("pose", "no sidecar keypoints and pose.extractor='none'")
    from ray_jobs.preprocess.pose import load_blazepose_extractor, load_extractor

    if cfg.pose.extractor == "blazepose":
        extractor = load_blazepose_extractor(cfg.pose.model_dir, cfg.fps, cfg.pose.smooth,
                                             cfg.storage.model_dump_json())
    else:
        extractor = load_extractor(cfg.pose.model_path, tuple(cfg.pose.input_size), cfg.storage.model_dump_json())
    return extractor(frames)


def add_face_track(batch: dict, cfg: PreprocessConfig) -> dict:
    """map_batches UDF: smoothed `face_boxes` (B, T, 4), `face_crops` (B, T, Hf, Wf, 3), `has_face` (B,).

    The raw boxes are the sidecar's or the detector's (found on the detection stream while decoding,
    `_Detections`; NaN where it missed): gaps are interpolated, the track smoothed; a clip with faces
    on fewer than `face.min_detect_fraction` of its frames gets has_face False and zero crops.
    """
    face = cfg.face
    boxes_out = np.zeros((len(batch["source"]), cfg.clip_frames, 4), np.float32)
    has_face = np.zeros(len(batch["source"]), bool)

    def crop(i: int) -> np.ndarray:
        if not batch["has_face_boxes"][i]:  # face.detector 'none' and no sidecar boxes
            return np.zeros((cfg.clip_frames, face.size, face.size, 3), np.uint8)
        raw = np.asarray(batch["face_boxes"][i], np.float32)
        filled, found = stages.fill_missing_boxes(raw)
        if found < face.min_detect_fraction:
            return np.zeros((cfg.clip_frames, face.size, face.size, 3), np.uint8)  # no face: flag, zeros
        boxes_out[i] = stages.smooth_boxes(filled, face.smooth_frames)
        has_face[i] = True
        return stages.crop_faces(batch["frames"][i], boxes_out[i], face.size, face.margin)

    _for_each_clip(batch, "face", "face_crops", (cfg.clip_frames, face.size, face.size, 3), np.uint8, crop)
    batch["face_boxes"], batch["has_face"] = boxes_out, has_face
    return _add_reference_faces(batch, cfg)


def _local_face_config(cfg: PreprocessConfig):
    """`cfg.face` with an ``s3://`` BlazeFace model cache replaced by the node's local copy (model/ reads
    local paths only); unchanged otherwise."""
    if not cfg.face.model_dir or "://" not in cfg.face.model_dir or cfg.face.detector in ("haar", "none"):
        return cfg.face
    from ray_jobs.preprocess.pose import local_model_dir

    local = local_model_dir(cfg.face.model_dir, cfg.storage.model_dump_json())
    return cfg.face.model_copy(update={"model_dir": local})


def _nan_if_none(box: np.ndarray | None) -> np.ndarray:
    return np.full(4, np.nan, np.float32) if box is None else box


def _add_reference_faces(batch: dict, cfg: PreprocessConfig) -> dict:
    """`ref_face_crop` (B, Hf, Wf, 3), `ref_face_box` (B, 4), `has_ref_face` (B,): the reference frame's face.

    The sidecar's first-frame box when the video has one, else the configured detector on the reference
    frame (`model.face.reference_face`, as serving does); once per video of the batch.
    """
    size, face = cfg.face.size, _local_face_config(cfg)
    per_video: dict[str, Any] = {}
    boxes = np.asarray(batch["ref_face_box"], np.float32).copy()
    found = np.zeros(len(boxes), bool)

    def crop(i: int) -> np.ndarray:
        key = str(batch["video_id"][i])
        if key not in per_video:
            per_video[key] = reference_face(batch["ref_frame"][i], face, boxes[i], detect=face.detector != "none")
        boxes[i], found[i] = per_video[key].box, per_video[key].found
        return per_video[key].crop

    _for_each_clip(batch, "face", "ref_face_crop", (size, size, 3), np.uint8, crop)
    batch["ref_face_box"], batch["has_ref_face"] = boxes, found
    return batch


def add_motion_mask(batch: dict, cfg: PreprocessConfig) -> dict:
    """map_batches UDF: DanceLCM `motion_mask` (B, T, h, w), vectorised over the batch."""
    batch["motion_mask"] = stages.motion_mask(np.asarray(batch["frames"]), cfg.motion_delta, cfg.latent_spatial_factor)
    return batch


# ------------------------------------------------------------------------------------------ VAE
class VaeEncoder:
    """Actor-pool UDF: loads the VAE once in __init__, encodes frames, ref frame and its face crop per batch."""

    def __init__(self, cfg: PreprocessConfig):
        import torch

        from artifacts.models import load_vae
        from model.vae import VAEConfig

        self.cfg = cfg
        device = "cuda" if torch.cuda.is_available() else "cpu"
        runtime = VAEConfig.model_validate(cfg.vae.model_dump(include=set(VAEConfig.model_fields)))
        self.vae = load_vae(cfg.vae.path, Storage(cfg.storage), device=device, config=runtime)
        if self.vae.spatial_factor != cfg.latent_spatial_factor:
            raise ValueError(f"VAE spatial factor {self.vae.spatial_factor} != latent_spatial_factor "
                             f"{cfg.latent_spatial_factor}: motion masks would not match the latents")

    def _encode(self, pixels: np.ndarray, good: np.ndarray) -> np.ndarray:
        """uint8 (B, T, H, W, 3) -> float32 (B, C, t, h, w); rows not `good` stay zero.

        The latent shape is taken from a real encode (a zero clip when no row is good): diffusers'
        Wan encoder walks frames in 1 + 4k chunks whatever the temporal factor, so t is not derivable
        from the config alone.
        """
        rows = pixels[good] if good.any() else np.zeros_like(pixels[:1])
        encoded = self.vae.encode(np.ascontiguousarray(rows)).cpu().numpy().astype(np.float32)
        out = np.zeros((len(pixels), *encoded.shape[1:]), np.float32)
        if good.any():
            out[good] = encoded
        return out

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        good = batch["error_stage"].astype(object) == ""
        batch["latents"] = self._encode(np.asarray(batch["frames"]), good)
        batch["ref_latent"] = self._encode(np.asarray(batch["ref_frame"])[:, None], good)
        batch["ref_face_latent"] = self._encode(np.asarray(batch["ref_face_crop"])[:, None], good)
        _add_seconds(batch, "vae", time.perf_counter() - start)
        return batch


# ---------------------------------------------------------------------------------------- writer
def write_shard(batch: dict[str, np.ndarray], cfg: PreprocessConfig, shard_dir: str) -> dict[str, np.ndarray]:
    """map_batches UDF: good rows -> Parquet shards of at most `shard_clips`; returns the summary rows.

    A shard's name hashes its (source, clip_index) list, so a retried task overwrites the same file
    instead of adding a duplicate. We write the Parquet ourselves instead of `Dataset.write_parquet`
    because the same pass must also split off the error rows and report which clips landed where,
    and because tensor columns go to Parquet as raw bytes (`artifacts.tables`: 15x faster to encode).
    """
    began = time.perf_counter()
    good = np.flatnonzero(batch["error_stage"].astype(object) == "")
    columns = SHARD_COLUMNS + (LATENT_COLUMNS if cfg.vae.enabled else ())
    shard = np.full(len(batch["error_stage"]), "", dtype=object)
    for start in range(0, len(good), cfg.shard_clips):
        rows = good[start:start + cfg.shard_clips]
        if rows[-1] - rows[0] + 1 == len(rows):  # a run of good rows: a view, not a copy of the pixels
            rows = slice(rows[0], rows[-1] + 1)
        kept = None if cfg.stores_pixels else pixels_kept(batch, cfg)[rows]
        shard[rows] = _write_one_shard({c: np.asarray(batch[c])[rows] for c in columns}, cfg, shard_dir, kept)
    summary = {**{c: batch[c] for c in SUMMARY_COLUMNS if c != "shard"}, "shard": shard,
               **{c: batch[c] for c in batch if c.startswith(TIMING_PREFIX)}}
    _add_seconds(summary, "write_shard", time.perf_counter() - began)
    return summary


def _write_one_shard(clips: dict[str, np.ndarray], cfg: PreprocessConfig, shard_dir: str,
                     pixels: np.ndarray | None = None) -> str:
    """Write one Parquet shard named by the hash of its (source, clip_index) list; return its file name.

    `pixels`: None, or which rows keep their pixel columns (the others are nulls, `store_pixels`)."""
    keys = "\n".join(f"{s}#{c}" for s, c in zip(clips["source"].tolist(), clips["clip_index"].tolist()))
    name = f"part-{hashlib.sha1(keys.encode()).hexdigest()[:16]}.parquet"
    storage = Storage(cfg.storage)
    storage.write_bytes(storage.join(shard_dir, name), shard_bytes(clips, cfg.shard_compression, pixels))
    return name


# ----------------------------------------------------------------------------------- the chain
CPU_STAGES: tuple[Callable[[dict, PreprocessConfig], dict], ...] = (
    add_audio_features, add_pose, add_face_track, add_motion_mask)


def process_videos(batch: dict[str, np.ndarray], cfg: PreprocessConfig,
                   shard_dir: str | None = None) -> Iterator[dict[str, np.ndarray]]:
    """map_batches UDF (a generator): input items -> their clips through decode and every CPU stage [-> shards].

    Yields one batch per window of a video too large to decode whole (`decode_window_mb`) and one for
    the rest, so a task's memory is bounded by the window, not by the length of its videos. With
    `shard_dir` the clips are written here too and only the summary rows leave the task. One UDF for
    the chain rather than one map_batches per stage: Ray Data fuses consecutive map_batches into one
    task but still turns each op's output batch into an Arrow block and back (~2 ms per op per 8 s
    video at 64x64, a tenth of the job's CPU time).
    """
    windows = iter_clip_batches(batch, cfg)
    while True:
        start = time.perf_counter()
        clips = next(windows, None)
        if clips is None:
            return
        models = sum(float(np.sum(clips[TIMING_PREFIX + step])) for step in MODEL_STEPS)
        _add_seconds(clips, "decode", time.perf_counter() - start - models)
        for stage in CPU_STAGES:
            start = time.perf_counter()
            clips = stage(clips, cfg)
            _add_seconds(clips, stage.__name__.removeprefix("add_"), time.perf_counter() - start)
        yield clips if shard_dir is None else write_shard(clips, cfg, shard_dir)


def _add_seconds(batch: dict, step: str, seconds: float) -> None:
    """Record a task's `seconds` in `step` as batch[TIMING_PREFIX + step], spread evenly over its rows."""
    rows = len(batch["error_stage"])  # >= 1: every input yields a clip or an error row
    batch[TIMING_PREFIX + step] = np.full(rows, seconds / rows)
