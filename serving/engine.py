"""The in-process animation engine: model + VAE, request -> conditions -> sampled frames -> MP4.

The `Animator` replica wraps exactly this class, and the benchmark calls it directly to measure
what Serve's HTTP path adds. Nothing here imports Ray.

Why not `model.generate.generate`: it samples batch 1. `generate_batch` runs the same steps
(seeded CPU noise per request, the same sampler, VAE decode) for B requests that share a shape, so
`@serve.batch` can put them through one model call per step; with B = 1 it reproduces `generate`
(tested).

Conditions from a request (shapes as in `model.conditions`):
* ref: VAE latent of the reference image (1, C, 1, h, w).
* audio: the card's `model.audio.AudioEncoder` (log-mel or wav2vec2, the one preprocessing ran) of the
  16 kHz wave (1, T, W, M); no audio -> a silent wave's features with keep False.
* pose: `model.pose.render_pose` maps from keypoints (1, 3, T, H, W); none -> zeros with keep False.
* face: the VAE latent of the reference's face crop (1, C, 1, hf, wf), cut by
  `model.face.reference_face` with the config's `face` geometry, exactly as preprocessing cut the
  training reference's: around the client's `face_box` when given, else the face the configured
  detector (`face.detector`) finds in the reference. No face found -> zeros with keep False (the learned null face);
  the denoiser broadcasts it over latent frames. Each `Animation` says which (`FaceReport`).
Absent conditions are present-but-dropped (keep False) rather than None so that any requests can
be concatenated into one batch; the denoiser then uses the learned null, as for None.

What is served is an export folder (``export``): `artifacts.exports.load_export` rebuilds the model
from it and its model card, whose `SamplerSpec` (kind, steps or edges, shift, guidance, the
conditions CFG drops, a TPO plan with its adapter switch) `model.sampling.sample` runs; the VAE and
the audio feature geometry come from the card too, so nothing the training decided is restated
here. No export builds ``model``'s preset with random init (seeded, so every replica, and one restarted
after a crash, serves the same weights): the app runs end to end, but the video is noise-like.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from artifacts.audio import load_audio_encoder
from artifacts.exports import load_export
from artifacts.models import load_vae
from model.precision import cast_model, precision_dtype
from core.media import mux_mp4
from core.storage import Storage
from model.conditions import Conditions
from model.face import ReferenceFace, reference_face
from model.generate import ChunkDone, LongFormConfig, generate_long
from model.pose import render_pose
from model.presets import build_denoiser
from model.samplers import SamplerProgress
from model.sampling import sample
from model.vae import uint8_to_signed, video_to_uint8
from serving.config import ServeAppConfig, ServedModel, resolve_served
from serving.inputs import AnimationRequest

__all__ = ["AnimationEngine", "Animation", "FaceReport"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[..., None]  # (done steps, total steps); `serving.jobs.JobProgress` also takes chunks=(done, total)


@dataclass(frozen=True)
class FaceReport:
    """Where a request's face condition came from.

    source: ``given`` (the client's face_box), ``detected`` (the detector, `face.detector`, on the reference), ``none`` (no face
    found: the learned null face) or ``off`` (the model has no face path). box: (x0, y0, x1, y1) in
    reference pixels for given/detected, else None.
    """

    source: Literal["given", "detected", "none", "off"]
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def of(cls, face: ReferenceFace | None, given: bool) -> "FaceReport":
        if face is None:
            return cls("off")
        if not face.found:
            return cls("none")
        return cls("given" if given else "detected", tuple(round(float(v), 2) for v in face.box))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"source", "box"}`` (the async job record's ``face``)."""
        return {"source": self.source, "box": None if self.box is None else list(self.box)}


@dataclass(frozen=True)
class Animation:
    """One finished request: frames uint8 (T, H, W, 3), model evaluations, sampling + decode seconds, face used."""

    frames: np.ndarray
    nfe: int
    seconds: float
    face: FaceReport = FaceReport("off")


def render_mp4(request: AnimationRequest, animation: Animation, audio_cfg: Any) -> bytes:
    """H.264 MP4 of the frames with the request's audio (trimmed/padded to frames / fps) muxed in;
    ``audio_cfg`` is the model card's audio geometry (its sample rate)."""
    audio = None
    if request.audio is not None:
        samples = round(request.num_frames / request.fps * audio_cfg.sample_rate)
        audio = np.zeros(samples, np.float32)
        clip = request.audio[:samples]
        audio[: clip.size] = clip
    return mux_mp4(animation.frames, audio, request.fps, sample_rate=audio_cfg.sample_rate)


class AnimationEngine:
    """Holds the denoiser and VAE on one device; turns `AnimationRequest`s into frames and MP4 bytes."""

    def __init__(self, cfg: ServeAppConfig, served: ServedModel | None = None, storage: Storage | None = None) -> None:
        self.cfg = cfg
        self.storage = storage or Storage(cfg.storage)
        self.served = served or resolve_served(cfg, self.storage)
        self.device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
        self.adapter_switch = None
        if cfg.export is not None:
            loaded = load_export(cfg.export, self.storage, self.device)
            self.model, self.adapter_switch = loaded.model, loaded.adapter_switch
        else:
            self.model = _seeded_random_init(cfg.model).to(self.device).eval()
        cast_model(self.model, precision_dtype(cfg.precision, self.device)).requires_grad_(False)
        self.audio = self.served.card.model.audio
        # on the CPU like preprocessing, so served features are bit-identical to the shards' (a GPU's TF32
        # convolutions differ by ~1e-3); a wrong wav2vec2 folder (hidden size, rate, pinned hash) fails here
        self.audio_encoder = load_audio_encoder(self.audio, self.storage, "cpu")
        self.height, self.width = self.served.height, self.served.width
        self.vae = load_vae(self.served.card.model.vae_path, self.storage, self.device, config=cfg.vae)
        if self.vae.temporal_factor != self.served.temporal_factor:  # the ingress counts frames with the card's
            raise ValueError(f"the VAE's temporal factor {self.vae.temporal_factor} != preset "
                             f"{self.served.card.model.preset!r}'s {self.served.temporal_factor}")
        spatial = self.vae.spatial_factor
        if spatial * 2 > min(self.height, self.width) or self.height % spatial or self.width % spatial:
            raise ValueError(f"height/width {self.height}x{self.width} do not fit the VAE's spatial factor {spatial}")
        if self.model.config.face_injection and cfg.face.size % (self.vae.spatial_factor * self.model.config.face_patch):
            raise ValueError(f"face.size {cfg.face.size} is not a multiple of the VAE's spatial factor "
                             f"{self.vae.spatial_factor} x the face patch {self.model.config.face_patch}")
        self.long_form = self._long_form(cfg)

    def _long_form(self, cfg: ServeAppConfig) -> LongFormConfig:
        """How requests longer than one trained clip run: chunks of the card's clip length by default, each
        continuing from the previous chunk's last latent frames when the model has the motion-frame path."""
        own = int(self.model.config.motion_frames)
        motion = own if cfg.long_form.motion_frames is None else cfg.long_form.motion_frames
        if motion > own:
            raise ValueError(f"long_form.motion_frames={motion} but the model takes at most {own} (model.motion_frames)")
        chunk = cfg.long_form.chunk_frames or self.served.card.frames.clip_frames
        if (chunk - 1) % self.vae.temporal_factor:
            raise ValueError(f"long_form chunk of {chunk} frames is not 1 + k * {self.vae.temporal_factor}")
        return LongFormConfig(chunk_frames=chunk, motion_frames=motion, colour_correction=cfg.long_form.colour_correction)

    @property
    def precision(self) -> str:
        """The denoiser's and the VAE's compute dtypes, e.g. "bf16/fp32" (reported with every answer)."""
        names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        return f"{names[self.model.patch_embedding.weight.dtype]}/{names[self.vae.dtype]}"

    # ------------------------------------------------------------------ conditions
    def reference_face(self, request: AnimationRequest) -> ReferenceFace | None:
        """The reference's face (the client's `face_box`, else detected); None when the model has no face path."""
        if not self.model.config.face_injection:
            return None
        return reference_face(request.ref_image, self.cfg.face, box=request.face_box)

    def _audio_features(self, request: AnimationRequest, frames: int) -> torch.Tensor:
        """(1, frames, W, M) audio windows of the request's first ``frames`` frames (silence without audio)."""
        wave = request.audio if request.audio is not None else np.zeros(1, np.float32)
        return torch.from_numpy(self.audio_encoder(wave, request.fps, frames))[None]

    def _pose_maps(self, request: AnimationRequest, index: np.ndarray) -> torch.Tensor:
        """(1, 3, len(index), H, W) pose maps in [-1, 1] of the given frames (zeros without keypoints)."""
        if request.keypoints is None:
            maps = np.zeros((len(index), self.height, self.width, 3), np.uint8)
        else:
            maps = render_pose(request.keypoints[np.minimum(index, len(request.keypoints) - 1)], self.height, self.width)
        return uint8_to_signed(torch.from_numpy(maps).permute(3, 0, 1, 2)[None])

    def face_condition(self, face: ReferenceFace) -> tuple[torch.Tensor, bool]:
        """(latent (1, C, 1, hf, wf), keep): the crop's VAE latent, or zeros with keep False when no face was found."""
        if face.found:
            return self.vae.encode(face.crop[None, None]), True
        side = self.cfg.face.size // self.vae.spatial_factor
        return torch.zeros(1, self.vae.latent_channels, 1, side, side), False

    def conditions(self, request: AnimationRequest, face: ReferenceFace | None = None,
                   frames: tuple[int, int] | None = None) -> Conditions:
        """Batch-1 `Conditions` for a request, every condition present (absent ones with keep False).

        `face`: the request's `reference_face` when the caller already has it (it is computed otherwise).
        `frames`: (first, stop) to build the per-frame conditions of those frames only (default: all).
        """
        first, stop = frames or (0, request.num_frames)
        ref, face_latent, keep = self._static_conditions(request, face)
        audio = self._audio_features(request, stop)[:, first:stop]
        pose = self._pose_maps(request, np.arange(first, stop))
        cond = Conditions(ref_latent=ref, pose=pose, audio=audio, face=face_latent, keep=keep)
        return cond.to(self.device, torch.float32)

    def _static_conditions(self, request: AnimationRequest, face: ReferenceFace | None
                           ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """The conditions every frame shares: reference latent (1, C, 1, h, w), face latent or None, keep masks."""
        ref = self.vae.encode(request.ref_image[None, None])
        keep = {"audio": torch.tensor([request.audio is not None]), "pose": torch.tensor([request.keypoints is not None])}
        face = self.reference_face(request) if face is None else face
        face_latent = None
        if face is not None:
            face_latent, face_keep = self.face_condition(face)
            keep["face"] = torch.tensor([face_keep])
        return ref, face_latent, keep

    # ------------------------------------------------------------------ sampling
    def _sample(self, x: torch.Tensor, cond: Conditions, steps: int, progress: Callable[[SamplerProgress], None]):
        """The export's sampler (its card's spec at ``steps``) on x (B, C, t, h, w) from sigma 1."""
        return sample(self.model, x, cond, self.served.spec.with_steps(steps), self.adapter_switch, progress)

    def is_long(self, request: AnimationRequest) -> bool:
        """Longer than one trained clip: runs as chunks (`generate_long`)."""
        return request.num_frames > self.long_form.chunk_frames

    @torch.no_grad()
    def generate_long(self, request: AnimationRequest, progress: ProgressFn | None = None) -> Animation:
        """One long request as overlapping chunks (`model.generate.generate_long`), conditions built chunk by
        chunk (pose maps of a 60 s request would not fit at once). A ``progress`` object with ``save_chunk`` /
        ``saved_chunks`` (`serving.jobs.JobProgress`) stores each finished chunk and resumes from them."""
        start = time.perf_counter()
        face = self.reference_face(request)
        ref, face_latent, keep = self._static_conditions(request, face)
        audio = self._audio_features(request, request.num_frames)

        def chunk_conditions(first: int, stop: int) -> Conditions:
            index = torch.arange(first, stop).clamp(max=request.num_frames - 1)
            pose = self._pose_maps(request, index.numpy())
            return Conditions(ref_latent=ref, pose=pose, audio=audio[:, index], face=face_latent,
                              keep=keep).to(self.device, torch.float32)

        saved = progress.saved_chunks() if hasattr(progress, "saved_chunks") else []
        last = {"steps": (0, 0)}

        def on_step(p: SamplerProgress) -> None:
            last["steps"] = (p.step, p.total_steps)
            progress(p.step, p.total_steps)

        def on_chunk(chunk: ChunkDone) -> None:
            if hasattr(progress, "save_chunk"):
                progress.save_chunk(chunk)
                progress(*last["steps"], chunks=(chunk.index + 1, chunk.total))

        result = generate_long(self.model, self.vae, chunk_conditions, request.num_frames, self.long_form,
                               self.height, self.width, self.served.spec.with_steps(request.steps), request.seed,
                               reference=request.ref_image, adapter_switch=self.adapter_switch,
                               callback=None if progress is None else on_step,
                               on_chunk=None if progress is None else on_chunk, resume=saved, device=self.device)
        return Animation(frames=result.frames.numpy(), nfe=result.nfe, seconds=time.perf_counter() - start,
                         face=FaceReport.of(face, request.face_box is not None))

    @torch.no_grad()
    def generate_batch(self, requests: Sequence[AnimationRequest],
                       progress: Sequence[ProgressFn | None] | None = None) -> list[Animation]:
        """Sample B requests sharing `shape_key` as one batch; per-request seeded noise (1, C, t, h, w) as `generate`.
        Long requests (`is_long`) run one by one as chunks."""
        start = time.perf_counter()
        keys = {r.shape_key for r in requests}
        if len(keys) != 1:
            raise ValueError(f"generate_batch needs requests of one shape (frames, steps), got {sorted(keys)}")
        if self.is_long(requests[0]):
            fns = list(progress or [None] * len(requests))
            return [self.generate_long(r, fn) for r, fn in zip(requests, fns)]
        frames, steps = keys.pop()
        shape = (1, self.vae.latent_channels, self.vae.num_latent_frames(frames),
                 self.height // self.vae.spatial_factor, self.width // self.vae.spatial_factor)
        noise = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(r.seed)) for r in requests])
        faces = [self.reference_face(r) for r in requests]
        cond = Conditions.cat([self.conditions(r, f) for r, f in zip(requests, faces)])
        reports = [FaceReport.of(f, r.face_box is not None) for r, f in zip(requests, faces)]
        callbacks = [fn for fn in (progress or []) if fn is not None]

        def report(p: SamplerProgress) -> None:
            for fn in callbacks:
                fn(p.step, p.total_steps)

        result = self._sample(noise.to(self.device), cond, steps, report)
        video = video_to_uint8(self.vae.decode(result.x)).numpy()  # (B, T, H, W, 3)
        seconds = time.perf_counter() - start
        return [Animation(frames=video[i], nfe=result.nfe, seconds=seconds, face=reports[i]) for i in range(len(requests))]

    def render_mp4(self, request: AnimationRequest, animation: Animation) -> bytes:
        return render_mp4(request, animation, self.audio)

    def animate(self, request: AnimationRequest, progress: ProgressFn | None = None) -> tuple[bytes, Animation]:
        """One request end to end (the in-process reference path the benchmark compares Serve with)."""
        animation = self.generate_batch([request], [progress])[0]
        return self.render_mp4(request, animation), animation

    def warmup(self) -> float:
        """One 1-step generation of a grey reference (allocations, kernels); returns seconds."""
        start = time.perf_counter()
        grey = np.full((self.height, self.width, 3), 128, np.uint8)
        frames = 1 + self.vae.temporal_factor
        steps = self.served.default_steps
        self.generate_batch([AnimationRequest(grey, None, None, frames, self.cfg.default_fps, steps, 0)])
        return time.perf_counter() - start


def _seeded_random_init(model_cfg: Any) -> torch.nn.Module:
    """``model_cfg``'s denoiser with weights drawn from a fixed seed (0) without touching the global RNG:
    the same request seed then gives the same video on any replica (weights named by the config are loaded
    over the draw as usual)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_denoiser(model_cfg)
