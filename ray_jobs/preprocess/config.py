"""Typed config of the preprocessing job (`python -m ray_jobs.preprocess --config FILE`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from model.audio import AudioFeatureConfig
from core.config import StrictConfig
from model.face import FaceCropConfig
from core.storage import StorageConfig
from model.vae import VAEConfig
from ray_jobs.common import RayConfig

__all__ = ["PreprocessConfig", "VaeStageConfig", "SplitConfig", "PoseStageConfig", "FaceStageConfig", "AudioStageConfig",
           "VIDEO_EXTENSIONS", "AUTO_PIXEL_BYTES"]

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm")
# store_pixels=None keeps train clips' pixels up to this many bytes of frames a clip (tiny 8x64x64: 96 KiB,
# 8x256x256: 1.5 MiB) and drops them above (81x480x832: 93 MiB).
AUTO_PIXEL_BYTES = 8 << 20


class AudioStageConfig(StrictConfig):
    """Audio per clip: mono at `sample_rate`, feature windows per frame as `model.audio.AudioEncoder` computes them.

    ``features`` must equal the model config's ``audio`` (encoder, folder, geometry): training checks it
    against the manifest at start (`artifacts.card.check_data_matches_model`)."""

    features: AudioFeatureConfig = Field(AudioFeatureConfig(), description="encoder (logmel | wav2vec2) and "
                                         "window geometry; its sample_rate is also the rate of the stored clip "
                                         "audio (16 kHz)")
    allow_silent: bool = Field(False, description="a video without an audio stream gives clips with "
                               "has_audio=False and zero audio/features (True) or an error row (False)")


class PoseStageConfig(StrictConfig):
    """Where keypoints come from when a video has no sidecar JSON with `keypoints`.

    Default 'blazepose': MediaPipe's BlazePose through LiteRT (`model.blazepose.BlazePoseExtractor`), its
    models in a cache that ``python -m ray_jobs.fetch_models`` fills (``make test`` / ``make demo`` do).
    No silent fallback: with the cache empty, a clip that needs the extractor fails naming that command
    (`ray_jobs.preprocess.pose.check_pose_models` is the job-start check). 'onnx' stays for RTMPose/DWPose.
    """

    extractor: Literal["none", "onnx", "blazepose"] = Field(
        "blazepose", description="'none': a video without sidecar keypoints is an error row; 'onnx': run "
        "OnnxPoseExtractor (model_path); 'blazepose': MediaPipe BlazePose from model_dir")
    model_path: str | None = Field(None, description="ONNX top-down COCO-17 pose model (local or s3://) for 'onnx'")
    model_dir: str | None = Field(None, description="BlazePose/BlazeFace model cache (local folder or s3:// "
                                  "prefix) filled by `python -m ray_jobs.fetch_models --cache ...`; None = "
                                  "~/.cache/human-animation/mediapipe")
    input_size: tuple[int, int] = Field((192, 256), description="(W, H) input of the ONNX model (RTMPose-s: 192x256)")
    smooth: bool = Field(True, description="blazepose: One Euro filter over each clip's keypoint track")
    render_conf_threshold: float = Field(0.3, ge=0, le=1, description="joints below this confidence are not drawn")

    @model_validator(mode="after")
    def _onnx_needs_model(self) -> "PoseStageConfig":
        if self.extractor == "onnx" and not self.model_path:
            raise ValueError("pose.extractor='onnx' needs pose.model_path")
        return self


class SplitConfig(StrictConfig):
    """Which clips are held out, for videos whose sidecar does not say (every video, with ``use_sidecar: false``).

    Deterministic: a video's split is a function of its key alone (its identity when the sidecar names one,
    else its video id), so all clips of one identity land on one side and re-runs agree
    (`ray_jobs.preprocess.stages.assign_split`). The rule is recorded in the manifest."""

    use_sidecar: bool = Field(True, description="a sidecar's `split` wins when it has one")
    heldout: list[str] = Field(default_factory=list, description="explicit held-out keys (identity or video ids); "
                               "when given, every other video trains and heldout_fraction is unused")
    heldout_fraction: float = Field(0.2, ge=0, le=1, description="share of keys held out, by a salted hash of the key")
    salt: str = Field("split-v1", description="hash salt: change it to draw another split")


class FaceStageConfig(FaceCropConfig):
    """Face crop track: sidecar `face_boxes`, else the detector (`model.face.FaceCropConfig.detector`); smoothed.

    The crop geometry (size, margin) is `model.face.FaceCropConfig`'s, shared with serving: each video's
    reference face crop (the denoiser's face condition) is cut the same way in both.
    """

    detector: Literal["haar", "auto", "blazeface", "none"] = Field(
        "auto", description="for videos without sidecar face_boxes: 'auto' (MediaPipe BlazeFace when its model is "
        "in model_dir, else OpenCV's Haar cascade); 'blazeface' (fails at start without the model); 'haar'; "
        "or 'none' (has_face=False)")
    smooth_frames: int = Field(3, ge=1, description="centered moving-average window over box centre/size (odd)")
    min_detect_fraction: float = Field(0.5, gt=0, le=1, description="Haar: a clip needs a detection in at least "
                                       "this fraction of its searched frames, else has_face=False")
    detect_every: int = Field(1, ge=1, description="Haar: search every k-th frame (and the last); boxes between "
                              "are interpolated, then smoothed")
    track_search: float = Field(2.0, ge=0, description="Haar: after a found face, search only a window this many "
                                "face sides wide around it (0: the whole frame every time)")

    @model_validator(mode="after")
    def _odd_window(self) -> "FaceStageConfig":
        if self.smooth_frames % 2 == 0:
            raise ValueError(f"face.smooth_frames must be odd (centered window), got {self.smooth_frames}")
        return self


class VaeStageConfig(VAEConfig):
    """VAE latents on an actor pool (`ActorPoolStrategy`); one GPU per actor when the cluster has GPUs.

    Which VAE and how it runs (``path``, ``dtype``, ``tiling``, chunk sizes) are `model.vae.VAEConfig`'s
    fields, the same the server takes; the rest is the pool."""

    enabled: bool = Field(True, description="encode frames, ref frame and face crops to latents")
    min_actors: int = Field(1, ge=1, description="actor pool min_size")
    max_actors: int = Field(1, ge=1, description="actor pool max_size")
    batch_size: int = Field(8, ge=1, description="clips per VAE call")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor; None = 1 when the cluster has GPUs, else 0")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor")

    @model_validator(mode="after")
    def _pool_bounds(self) -> "VaeStageConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"vae.min_actors={self.min_actors} > vae.max_actors={self.max_actors}")
        return self


class PreprocessConfig(StrictConfig):
    """Raw videos (folder or s3:// prefix) -> Parquet training shards + error rows + manifest.

    Geometry: every video is resampled to `fps` and `width`x`height` with `fit`:
    'crop' scales to cover the frame and center-crops the excess (no bars, loses the edges);
    'pad' scales to fit inside and pads with centred black bars (keeps everything, wastes pixels).
    Clips are `clip_frames` frames starting every `stride` frames; a tail shorter than a clip is dropped.
    """

    input: str = Field(..., description="folder or s3:// prefix searched recursively for videos (+ sidecar .json)")
    output: str = Field(..., description="folder or s3:// prefix for run-NNNN/ shard folders and manifest.json")
    clip_frames: int = Field(8, ge=1, description="T: frames per clip")
    stride: int = Field(8, ge=1, description="frames between clip starts")
    fps: float = Field(16.0, gt=0, description="target frame rate")
    width: int = Field(64, ge=8, description="target width W")
    height: int = Field(64, ge=8, description="target height H")
    fit: Literal["crop", "pad"] = Field("crop", description="aspect handling, see the class docstring")
    detection_long_side: int = Field(512, ge=64, description="the pose and face models see the video decoded at "
                                     "the source's aspect with this long side (never upscaled), in a second ffmpeg "
                                     "stream beside the clip frames, not the clip geometry (64x64 in the tiny "
                                     "config); their keypoints and boxes are mapped into the clip's crop/pad "
                                     "geometry. When the clip frames are at least that size in both axes (832x480 "
                                     "clips of 720p: 512x288) the models see the clip frames, no second decode")
    latent_spatial_factor: int = Field(4, ge=1, description="pixels per latent cell; motion masks are pooled by it "
                                       "(must equal the VAE's spatial factor when the VAE stage is on)")
    motion_delta: float = Field(0.04, gt=0, lt=1, description="DanceLCM delta: a pixel moves when its max-channel "
                                "|f_t - f_t+-1| in [0, 1] intensity exceeds this")
    shard_clips: int = Field(64, ge=1, description="clips per Parquet shard (at most)")
    store_pixels: bool | None = Field(None, description="write the pixel columns (frames, ref_frame, pose maps, "
                                      "face crops, ref face crop, raw audio) of train clips too; held-out clips "
                                      "always keep them (evaluation, validation samples). None = auto: keep them "
                                      "when a clip's frames are at most AUTO_PIXEL_BYTES (the tiny and 256x256 "
                                      "geometries), drop them at real presets (81x480x832: ~200 MB of frames and "
                                      "pose maps a clip a training step never reads); see `stores_pixels`")
    shard_compression: Literal["lz4", "zstd", "snappy", "none"] = Field(
        "lz4", description="Parquet codec of the shards (tensor columns are raw bytes, never dictionary-encoded). "
        "16-clip shard write with fsync: at 64x64 lz4 ~ none ~ 11 ms (lz4 file 2.3x smaller), zstd 17 ms; "
        "at 256x256 lz4 100 ms, snappy 76, zstd 79 (smallest), none 146 (disk-bound)")
    ffmpeg_threads: int = Field(1, ge=0, description="threads per ffmpeg decode (0 = ffmpeg's default, one per "
                                "core): each Ray task holds one CPU, so one thread per decode keeps side-by-side "
                                "decodes from oversubscribing the cores")
    decode_window_mb: float = Field(64.0, gt=0, description="a video whose decoded frames exceed this many MiB is "
                                  "streamed out of ffmpeg and processed a window of about this size (at least one "
                                  "clip) at a time, audio first in its own ffmpeg run, so a task's memory does not "
                                  "grow with the video's length; smaller videos are decoded whole in one run with "
                                  "their audio. 60 s of 720p into 832x480 81-frame clips, one task: 890 MiB peak RSS "
                                  "and 6.7 s at 64 (one clip a window), 2.4 GiB / 10.8 s at 256, 6.5 GiB / 20 s whole "
                                  "(benchmarks/preprocess_memory.py)")
    videos_per_task: int = Field(1, ge=1, description="input videos per Ray Data task: each task decodes them "
                                 "and runs every CPU stage on their clips (1 = most parallelism)")
    reserve_operator_resources: bool = Field(False, description="Ray Data's per-operator resource reservation "
                                             "(op_resource_reservation_enabled); off by default: on a 2-CPU node it "
                                             "held the fused CPU stage to one task at a time (24 videos: 3.7 s vs 2.4 s)")
    retry_failed: bool = Field(False, description="re-run inputs that failed in an earlier run (else they are skipped)")
    audio: AudioStageConfig = AudioStageConfig()
    pose: PoseStageConfig = PoseStageConfig()
    face: FaceStageConfig = FaceStageConfig()
    split: SplitConfig = SplitConfig()
    vae: VaeStageConfig = VaeStageConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()

    @property
    def stores_pixels(self) -> bool:
        """`store_pixels` resolved: whether train clips keep their pixel columns (`udfs.PIXEL_COLUMNS`).

        Auto (None) keeps them only for small clips: the tiny default's evaluation, preference and
        pretraining paths read train frames, and they cost ~0.2 MB a clip there; at 81x480x832 the
        frames and pose maps are ~97 MB each, and training reads latents, keypoints (pose maps are
        re-rendered on the worker, `model.conditions.Conditions.from_batch`), audio features and masks.
        """
        if self.store_pixels is not None:
            return self.store_pixels
        return self.clip_frames * self.height * self.width * 3 <= AUTO_PIXEL_BYTES

    @model_validator(mode="after")
    def _geometry(self) -> "PreprocessConfig":
        factor = self.latent_spatial_factor
        for name, size in (("width", self.width), ("height", self.height), ("face.size", self.face.size)):
            if size % factor:
                raise ValueError(f"{name}={size} is not a multiple of latent_spatial_factor={factor}")
        return self
