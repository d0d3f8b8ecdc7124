"""The Serve app's one typed config: `ServeAppConfig`, given as ``args`` to `serving.app.build_app`.

`serve deploy serving/config.yaml` passes ``applications[0].args`` to `build_app`, which validates
it here, so a typo in the YAML fails the deploy with pydantic's message naming the dotted field.
Secrets never live in the YAML: ``api_key_env`` names the environment variable holding the key, and
the replica reads it when it starts (not at import).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from artifacts.card import ModelCard
from core.config import StrictConfig
from core.storage import Storage, StorageConfig
from model.face import FaceCropConfig
from model.precision import Precision
from model.presets import BUILTIN_PREFIX, VAE_GEOMETRY, ModelConfig
from model.sampling import SamplerSpec
from model.vae import VAEConfig

__all__ = ["LimitsConfig", "LongFormServing", "DeploymentKnobs", "ServeAppConfig", "ServedModel", "resolve_served"]


class LimitsConfig(StrictConfig):
    """Per-request limits; a request over any of them is answered 413/422 naming the field."""

    max_upload_bytes: int = Field(8 * 2**20, ge=1024, description="largest accepted upload (each file part)")
    max_duration_s: float = Field(60.0, gt=0, description="longest clip, frames / fps; a clip longer than the "
                                  "model's trained clip runs as chunks (`long_form`)")
    max_frames: int = Field(1024, ge=1, description="most frames per clip (60 s at 16 fps: 960)")
    max_steps: int = Field(50, ge=1, description="most sampler steps per request")
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, description="largest reference image (W*H), decompression-bomb guard")
    min_fps: float = Field(1.0, gt=0, description="lowest accepted fps")
    max_fps: float = Field(60.0, gt=0, description="highest accepted fps")


class LongFormServing(StrictConfig):
    """Requests longer than the clip the model was trained on (`model.generate.generate_long`)."""

    chunk_frames: int | None = Field(None, ge=1, description="frames per chunk; None = the card's clip_frames "
                                     "(the length the model was trained on). A request of at most this many "
                                     "frames runs as one clip")
    motion_frames: int | None = Field(None, ge=0, description="latent frames each chunk continues from; None = the "
                                      "model's own motion_frames (0 for a model without the path: independent chunks)")
    colour_correction: float = Field(0.0, ge=0, le=1, description="Lab mean/std match of each chunk toward the "
                                     "reference (0 = off)")


class DeploymentKnobs(StrictConfig):
    """Ray Serve deployment options for the `Animator` (see `ray.serve.config.AutoscalingConfig`)."""

    min_replicas: int = Field(1, ge=0, description="autoscaling floor")
    max_replicas: int = Field(2, ge=1, description="autoscaling ceiling")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at deploy time (None = min_replicas)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="per-replica load the autoscaler aims at")
    upscale_delay_s: float = Field(5.0, ge=0, description="load must stay high this long before scaling up")
    downscale_delay_s: float = Field(30.0, ge=0, description="load must stay low this long before scaling down")
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(5.0, gt=0, description="window the autoscaler averages load over")
    max_ongoing_requests: int = Field(4, ge=1, description="requests a replica works on or batches at once")
    max_queued_requests: int = Field(8, ge=-1, description="requests waiting for a replica; beyond -> 503 (-1 = unbounded)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float | Literal["auto"] = Field("auto", description="GPUs per replica; auto = 1 when the cluster has GPUs")
    health_check_period_s: float = Field(10.0, gt=0, description="how often check_health runs")
    health_check_timeout_s: float = Field(30.0, gt=0, description="check_health deadline")
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0, description="time to finish requests on scale-down")
    sequence_parallel: int = Field(1, ge=1, description="workers (devices) that run one request together, "
                                   "splitting its tokens (Ulysses); 1 = the replica runs requests itself")
    worker_num_cpus: float = Field(1.0, ge=0, description="sequence_parallel > 1: CPUs per worker actor")
    worker_num_gpus: float = Field(0.0, ge=0, description="sequence_parallel > 1: GPUs per worker actor "
                                   "(1 on GPU clusters; the replica itself then needs none)")
    max_batch_size: int = Field(4, ge=1, description="@serve.batch: requests that share a shape run as one batch")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="@serve.batch: wait this long to fill a batch while other requests are in flight (an idle replica never waits)")

    @model_validator(mode="after")
    def _ordered(self) -> "DeploymentKnobs":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie in [min_replicas, max_replicas]")
        return self

    def autoscaling_config(self) -> dict:
        """The dict `@serve.deployment(autoscaling_config=...)` takes."""
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.initial_replicas, "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                "metrics_interval_s": self.metrics_interval_s, "look_back_period_s": self.look_back_period_s}


class ServeAppConfig(StrictConfig):
    """Everything the Serve app needs: which checkpoint, how to sample, where outputs go, limits, scaling."""

    export: str | None = Field(None, description="the model export folder (student, TPO or teacher; local, s3:// or "
                               "builtin:NAME): model, VAE, sampler and frame size come from its model_card.json")
    model: ModelConfig = Field(default_factory=ModelConfig,
                               description="only without `export`: a random-init preset (noise-like output, smoke tests)")
    default_steps: int | None = Field(None, ge=1, description="steps when a request gives none (None: the card's)")
    guidance: float | None = Field(None, ge=1.0, description="CFG scale of a teacher export (None: the card's)")
    face: FaceCropConfig = Field(default_factory=FaceCropConfig,
                                 description="reference face crop geometry: must equal the preprocessing `face:` "
                                             "section the model was trained on (the defaults are the same)")
    height: int | None = Field(None, ge=16, description="output height (None: the card's training frames); "
                               "the reference is resized/cropped to it")
    width: int | None = Field(None, ge=16, description="output width (None: the card's)")
    default_fps: float = Field(16.0, gt=0, description="fps when a request gives none")
    default_frames: int = Field(8, ge=1, description="frames when a request gives neither frames, duration nor audio")
    output: str = Field("/tmp/animations", description="job records and videos: local folder or s3://bucket/prefix")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="S3 endpoint/region for output and s3:// inputs")
    api_key_env: str | None = Field(None, description="name of the env var holding the X-API-Key value; None = no key")
    allowed_s3_buckets: list[str] = Field(default_factory=list, description="buckets s3:// inputs may come from")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    long_form: LongFormServing = Field(default_factory=LongFormServing)
    events_poll_s: float = Field(0.25, gt=0, description="how often GET .../events reads the job record")
    max_attempts: int = Field(3, ge=1, description="an async job whose replica dies is dispatched again, resuming "
                              "from its last finished chunk, up to this many runs in all")
    animator: DeploymentKnobs = Field(default_factory=DeploymentKnobs)
    ingress_replicas: int = Field(1, ge=1, description="HTTP ingress replicas")
    ingress_max_ongoing_requests: int = Field(64, ge=1, description="requests one ingress replica holds")
    retry_after_s: int = Field(2, ge=1, description="Retry-After seconds sent with 503 on overload")
    job_stale_s: float = Field(600.0, gt=0, description="a queued/running job not updated this long is reported failed (replica lost)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when the replica has a GPU")
    pose_model_dir: str | None = Field(None, description="local BlazePose model cache for `pose_video` (None: the "
                                       "default cache `python -m ray_jobs.fetch_models` fills); empty: pose_video 422s")
    detection_long_side: int = Field(512, ge=64, description="`pose_video` is decoded at its own aspect with this "
                                     "long side for BlazePose (never upscaled), as preprocessing's "
                                     "`detection_long_side`, and the keypoints mapped into the output frame")
    precision: Precision = Field("auto", description="denoiser weights: auto = bf16 on a GPU, fp32 on CPU; Wan's "
                                 "fp32 modules (norms, time embedder) stay fp32 (model.precision)")
    vae: VAEConfig = Field(default_factory=VAEConfig, description="how the VAE runs (dtype, tiling, chunks); its "
                           "folder is the card's, so vae.path stays unset")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (None = torch default)")
    warmup: bool = Field(True, description="run one tiny generation when a replica starts")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not value.replace("_", "").isalnum():
            raise ValueError(f"api_key_env must be an environment variable NAME, got {value!r}")
        return value

    @field_validator("allowed_s3_buckets")
    @classmethod
    def _bare_buckets(cls, value: list[str]) -> list[str]:
        bad = [b for b in value if "/" in b or ":" in b or not b]
        if bad:
            raise ValueError(f"allowed_s3_buckets takes bare bucket names, got {bad}")
        return value

    @field_validator("export")
    @classmethod
    def _builtin_export(cls, value: str | None) -> str | None:
        """``builtin:NAME`` -> the checked-in folder (as `ModelConfig.pretrained_path` resolves it)."""
        if value is None or not value.startswith(BUILTIN_PREFIX):
            return value
        return ModelConfig(pretrained_path=value).pretrained_path

    @model_validator(mode="after")
    def _consistent(self) -> "ServeAppConfig":
        if self.vae.path is not None:
            raise ValueError("vae.path is the model card's (model.vae_path); set only how the VAE runs here")
        if self.model.pretrained_path is not None:
            raise ValueError("give the model folder as `export` (its card says how to load and sample it), "
                             "not model.pretrained_path")
        if (self.height or 2) % 2 or (self.width or 2) % 2:
            raise ValueError("height and width must be even (H.264 yuv420p)")
        if self.default_steps is not None and self.default_steps > self.limits.max_steps:
            raise ValueError(f"default_steps {self.default_steps} > limits.max_steps {self.limits.max_steps}")
        return self


class ServedModel(StrictConfig):
    """What the app serves, resolved once from the export's card and the config's few overrides."""

    card: ModelCard
    spec: SamplerSpec = Field(description="the card's sampler with the config's guidance")
    height: int
    width: int
    default_steps: int

    @property
    def temporal_factor(self) -> int:
        return VAE_GEOMETRY[self.card.model.preset][1]


def resolve_served(cfg: ServeAppConfig, storage: Storage) -> ServedModel:
    """Read the export's card (inferred for an old folder) and apply ``guidance``/``height``/``width``/``default_steps``.

    Without an export: the random-init ``cfg.model`` as a 4-segment consistency model (cheapest sampler).
    """
    from artifacts.exports import read_export_card

    if cfg.export is not None:
        card = read_export_card(cfg.export, storage)
    else:
        card = ModelCard(kind="student", model=cfg.model, sampler=SamplerSpec(kind="consistency", steps=4))
    spec = card.sampler
    if cfg.guidance is not None:
        if spec.kind != "euler_cfg":
            raise ValueError(f"guidance is a teacher (euler_cfg) setting; this {card.kind} samples with {spec.kind!r}")
        spec = spec.model_copy(update={"guidance": cfg.guidance})
    steps = cfg.default_steps if cfg.default_steps is not None else spec.steps_in_effect
    spec.with_steps(steps)  # a student's edges / a TPO plan fix the count: fail at deploy, not per request
    return ServedModel(card=card, spec=spec, height=cfg.height or card.frames.height,
                       width=cfg.width or card.frames.width, default_steps=steps)
