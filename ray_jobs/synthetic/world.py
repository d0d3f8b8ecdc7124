"""The synthetic puppet world: config, one video from (seed, index), ground truth, and the job.

Video `i` of the world with seed `s` is a pure function of (config, i): identity `i % num_identities`,
its own numpy Generator seeded with (s, i). So videos can be made in any order or in parallel
(Ray tasks for large N) and the same seed gives byte-identical sidecars. Keypoints and the mouth
track are rounded *before* rendering, so re-rendering a sidecar reproduces the encoded frames exactly.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from core.config import StrictConfig
from core.media import mux_mp4
from core.storage import Storage, StorageConfig
from ray_jobs.common import RayConfig
from ray_jobs.synthetic.audio import frame_rms, speech_audio
from ray_jobs.synthetic.motion import dance_keypoints
from ray_jobs.synthetic.puppet import face_boxes, identity_index, make_identity, render_frames

__all__ = ["SyntheticConfig", "GeneratedVideo", "identity_splits", "generate_video", "sidecar_json",
           "ground_truth_frames", "run"]

log = logging.getLogger(__name__)
KEYPOINT_DECIMALS = 2  # 0.01 px
MOUTH_DECIMALS = 4


class SyntheticConfig(StrictConfig):
    """Options of `python -m ray_jobs.synthetic`; each CLI flag maps to the field of the same name."""

    out: str = Field("outputs/synthetic", description="output folder or s3://bucket/prefix")
    num_videos: int = Field(16, ge=1)
    seed: int = Field(0, ge=0, description="world seed: identities, motion and audio all derive from it")
    width: int = Field(64, ge=16, multiple_of=2, description="frame width (even: H.264 yuv420p)")
    height: int = Field(64, ge=16, multiple_of=2, description="frame height (even: H.264 yuv420p)")
    fps: float = Field(16.0, gt=0, le=120)
    duration: float = Field(3.0, gt=0, le=600, description="seconds per video")
    sample_rate: int = Field(16000, ge=8000, le=48000, description="audio sample rate (mono AAC)")
    num_identities: int = Field(8, ge=1)
    heldout_identities: int = Field(2, ge=0, description="identities kept out of the train split")
    crf: int = Field(12, ge=0, le=51, description="x264 quality; low so decoded frames match ground truth")
    executor: Literal["auto", "local", "ray"] = Field(
        "auto", description="'local' loop, 'ray' tasks, or 'auto' = ray when num_videos >= ray_min_videos")
    ray_min_videos: int = Field(64, ge=1)
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _split_leaves_train_identities(self) -> "SyntheticConfig":
        if self.heldout_identities >= self.num_identities:
            raise ValueError(f"heldout_identities ({self.heldout_identities}) must be < num_identities "
                             f"({self.num_identities}) so the train split is not empty")
        return self

    @property
    def num_frames(self) -> int:
        return int(round(self.duration * self.fps))


@dataclass(frozen=True)
class GeneratedVideo:
    """One synthetic video: its sidecar dict, frames uint8 (T, H, W, 3) and audio float32 (N,)."""

    sidecar: dict[str, Any]
    frames: np.ndarray
    audio: np.ndarray


def identity_splits(cfg: SyntheticConfig) -> dict[str, list[str]]:
    """Identity ids per split; the held-out ones are a seeded random subset."""
    order = np.random.default_rng([cfg.seed, 0x5B11]).permutation(cfg.num_identities)
    heldout = sorted(int(i) for i in order[: cfg.heldout_identities])
    return {"train": [f"id{i:03d}" for i in range(cfg.num_identities) if i not in heldout],
            "heldout": [f"id{i:03d}" for i in heldout]}


def video_id(cfg: SyntheticConfig, index: int) -> str:
    return f"s{cfg.seed}-{index:05d}"


def generate_video(cfg: SyntheticConfig, index: int) -> GeneratedVideo:
    """Audio, audio-driven motion, sidecar and rendered frames of video `index` (pure function)."""
    rng = np.random.default_rng([cfg.seed, 0xF1D, index])
    audio_rng, motion_rng = rng.spawn(2)
    identity = make_identity(index % cfg.num_identities, cfg.seed)
    audio = speech_audio(audio_rng, cfg.num_frames / cfg.fps, cfg.sample_rate)
    loudness = frame_rms(audio, cfg.num_frames, cfg.fps, cfg.sample_rate)
    mouth = np.round(loudness / max(loudness.max(), 1e-9), MOUTH_DECIMALS)  # mouth follows the envelope
    keypoints = np.round(dance_keypoints(identity, motion_rng, mouth, cfg.fps, cfg.height, cfg.width),
                         KEYPOINT_DECIMALS)
    split = "heldout" if identity.identity_id in identity_splits(cfg)["heldout"] else "train"
    sidecar = {
        "video_id": video_id(cfg, index), "identity_id": identity.identity_id, "split": split,
        "fps": cfg.fps, "width": cfg.width, "height": cfg.height, "num_frames": cfg.num_frames,
        "duration_s": cfg.num_frames / cfg.fps, "seed": cfg.seed, "video_index": index,
        "keypoint_format": "coco17", "keypoints": keypoints.tolist(),
        "face_boxes": np.round(face_boxes(keypoints), KEYPOINT_DECIMALS).tolist(),
        "mouth_openness": mouth.tolist(), "audio_sample_rate": cfg.sample_rate,
    }
    frames = render_frames(identity, keypoints, mouth, cfg.height, cfg.width)
    return GeneratedVideo(sidecar=sidecar, frames=frames, audio=audio)


def sidecar_json(sidecar: dict[str, Any]) -> bytes:
    """Canonical sidecar bytes (fixed key order, compact) so equal sidecars are equal files."""
    return (json.dumps(sidecar, separators=(",", ":")) + "\n").encode("utf-8")


def ground_truth_frames(sidecar: dict[str, Any], start_frame: int, num_frames: int,
                        height: int | None = None, width: int | None = None) -> np.ndarray:
    """Exact frames uint8 (num_frames, H, W, 3) of a clip, re-rendered from its sidecar.

    At the sidecar's own size this equals the frames that were encoded; another (H, W) rescales
    the keypoints per axis (same aspect ratio recommended) and renders natively at that size.
    """
    height, width = height or sidecar["height"], width or sidecar["width"]
    stop = start_frame + num_frames
    if start_frame < 0 or num_frames < 1 or stop > sidecar["num_frames"]:
        raise ValueError(f"clip [{start_frame}, {stop}) is outside the video's {sidecar['num_frames']} frames")
    keypoints = np.asarray(sidecar["keypoints"][start_frame:stop], dtype=np.float64)
    keypoints[..., 0] *= width / sidecar["width"]
    keypoints[..., 1] *= height / sidecar["height"]
    mouth = np.asarray(sidecar["mouth_openness"][start_frame:stop], dtype=np.float64)
    identity = make_identity(identity_index(sidecar["identity_id"]), sidecar["seed"])
    return render_frames(identity, keypoints, mouth, height, width)


def write_video(cfg: SyntheticConfig, index: int) -> dict[str, str]:
    """Generate video `index` and write `{out}/videos/{id}.mp4` and `.json`; returns its id and split."""
    video = generate_video(cfg, index)
    storage = Storage(cfg.storage)
    name = video.sidecar["video_id"]
    data = mux_mp4(video.frames, video.audio, cfg.fps, sample_rate=cfg.sample_rate, crf=cfg.crf)
    storage.write_bytes(storage.join(cfg.out, "videos", f"{name}.mp4"), data)
    storage.write_bytes(storage.join(cfg.out, "videos", f"{name}.json"), sidecar_json(video.sidecar))
    return {"video_id": name, "split": video.sidecar["split"]}


def _write_all(cfg: SyntheticConfig) -> list[dict[str, str]]:
    use_ray = cfg.executor == "ray" or (cfg.executor == "auto" and cfg.num_videos >= cfg.ray_min_videos)
    if not use_ray:
        return [write_video(cfg, i) for i in range(cfg.num_videos)]
    import ray

    from ray_jobs.common import init_ray

    init_ray(cfg.ray)
    task = ray.remote(num_cpus=1)(write_video)
    return ray.get([task.remote(cfg, i) for i in range(cfg.num_videos)])


def run(cfg: SyntheticConfig) -> dict[str, Any]:
    """Write every video and sidecar, then `{out}/splits.json` last (its presence marks completion)."""
    log.info("synthetic world: %d videos, seed %d -> %s", cfg.num_videos, cfg.seed, cfg.out)
    written = _write_all(cfg)
    splits = {
        "seed": cfg.seed,
        "identities": identity_splits(cfg),
        "videos": {split: [w["video_id"] for w in written if w["split"] == split] for split in ("train", "heldout")},
        "config": cfg.model_dump(mode="json", exclude={"storage", "ray", "out", "executor", "ray_min_videos"}),
    }
    storage = Storage(cfg.storage)
    storage.write_json(storage.join(cfg.out, "splits.json"), splits)
    log.info("wrote %d train and %d heldout videos", len(splits["videos"]["train"]), len(splits["videos"]["heldout"]))
    return splits
