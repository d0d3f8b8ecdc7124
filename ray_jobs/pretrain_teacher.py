"""Pretrain the tiny teacher on a large synthetic world, in one process on one device (CPU or one GPU).

    python -m ray_jobs.pretrain_teacher --config ray_jobs/configs/assets/pretrain_teacher.yaml [--set k=v ...]

What a user does with Wan weights, the tiny world does with this: a teacher pretrained on many
identities (``world``) that the demo then fine-tunes (`ray_jobs.train_teacher` with
``model.pretrained_path``). Its output, a diffusers folder plus ``FIT_REPORT.json`` (recipe, steps,
wall time, held-out figures beside copy-the-reference and the VAE round trip, on the pretraining
world's held-out identities and on the demo world, whose identities it never sees), is checked in
under ``model/assets/tiny_teacher``.

The same code as the Ray jobs, minus Ray: videos come from `ray_jobs.synthetic.world.generate_video`
and go through `ray_jobs.preprocess.udfs.clips_from_frames` (every CPU stage of preprocessing, minus
the codec: the frames are rendered, not decoded) in a process pool, then through the VAE on the
device; the loss is `ray_jobs.training.teacher_objective.teacher_loss`, the optimizer `build_optimizer`, the EMA
`ray_jobs.training.ema.EMA`, the export `artifacts.exports.export_denoiser` (with its model card). Deliberately no Ray Train/DeepSpeed: the
whole set fits on one device, and a one-GPU machine (where this asset was fitted) need not carry Ray.

A fit may continue an earlier one (``model.pretrained_path``, e.g. ``builtin:tiny_teacher``): the
earlier fits' reports are kept in ``history``, as the tiny VAE's FIT_REPORT.json does.

Step budget: ``steps``, capped by ``max_seconds`` when set: after the LR warm-up the measured rate
fixes the total once (the cosine schedule needs it), and the report records it, so
``--set steps=N --set max_seconds=null`` reproduces the schedule anywhere.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from model.conditions import Conditions
from core.config import StrictConfig, load_config
from artifacts.models import load_denoiser
from core.storage import Storage
from model.presets import ModelConfig
from ray_jobs.common import parse_job_config, setup_logging
from ray_jobs.preprocess.config import PreprocessConfig
from ray_jobs.synthetic.world import SyntheticConfig
from ray_jobs.training.teacher_objective import TRAIN_COLUMNS, TeacherObjective, teacher_loss
from ray_jobs.training.config import OptimSection

__all__ = ["PretrainConfig", "EvalSection", "render_world", "encode_latents", "train", "evaluate", "run", "main"]

log = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "configs"
# Columns kept in memory: what training reads, plus what evaluation compares with.
_PIXEL_COLUMNS = ("frames", "ref_frame", "ref_face_crop")
_KEEP_COLUMNS = ("pose", "audio_feats", "has_audio", "has_ref_face", "motion_mask", "split", "identity_id",
                 "video_id", "start_frame", "keypoints", "mouth_openness") + _PIXEL_COLUMNS


class EvalSection(StrictConfig):
    """Held-out evaluation at the end: the teacher sampler at each guidance, beside the baselines."""

    clips: int = Field(32, ge=1, description="held-out clips per world")
    steps: int = Field(50, ge=1, description="Euler steps (2 NFE each with CFG, 1 without)")
    guidances: list[float] = Field(default_factory=lambda: [1.0, 2.0], description="CFG scales measured")
    shift: float = Field(1.0, gt=0)
    seed: int = 0


class PretrainConfig(StrictConfig):
    """`python -m ray_jobs.pretrain_teacher` config."""

    output: str = Field("model/assets/tiny_teacher", description="local folder: diffusers export + FIT_REPORT.json")
    world: SyntheticConfig = Field(default_factory=lambda: SyntheticConfig(
        seed=1, num_identities=256, heldout_identities=16, num_videos=1024, duration=3.0))
    demo_world: SyntheticConfig | None = Field(
        default_factory=lambda: load_config(SyntheticConfig, _CONFIG_DIR / "tiny" / "synthetic.yaml"),
        description="also evaluated on (its held-out identities): the world the demo fine-tunes on; never trained on")
    preprocess_config: str = Field(str(_CONFIG_DIR / "tiny" / "preprocess.yaml"), description="clip geometry")
    preprocess: dict[str, Any] = Field(default_factory=dict, description="dotted overrides of preprocess_config")
    model: ModelConfig = Field(default_factory=ModelConfig)
    objective: TeacherObjective = Field(default_factory=TeacherObjective)
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1.5e-3, warmup_steps=300, schedule="cosine",
                                                                     min_lr_ratio=0.05, weight_decay=0.01))
    gradient_clipping: float = Field(1.0, gt=0)
    batch_size: int = Field(64, ge=1)
    steps: int = Field(20000, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="cap on training time; fixes steps after warm-up")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_workers: int = Field(0, ge=0, description="processes rendering/preprocessing videos; 0 = every CPU")
    seed: int = 0
    log_every: int = Field(100, ge=1)
    eval: EvalSection = Field(default_factory=EvalSection)

    def preprocess_cfg(self) -> PreprocessConfig:
        return load_config(PreprocessConfig, self.preprocess_config, self.preprocess)


# ------------------------------------------------------------------------------------------ data
def _video_batch(args: tuple[SyntheticConfig, PreprocessConfig, int]) -> dict[str, np.ndarray]:
    """Worker: video ``index`` of the world, rendered and through every CPU preprocessing stage."""
    from ray_jobs.preprocess.udfs import clips_from_frames
    from ray_jobs.synthetic.world import generate_video

    world, pre, index = args
    video = generate_video(world, index)
    batch = clips_from_frames(f"synthetic://{video.sidecar['video_id']}", video.sidecar, video.frames,
                              video.audio, pre)
    return {k: batch[k] for k in _KEEP_COLUMNS}


def render_world(world: SyntheticConfig, pre: PreprocessConfig, workers: int) -> dict[str, np.ndarray]:
    """Every video of ``world`` as one columnar clip batch (numpy), rendered in ``workers`` processes."""
    jobs = [(world, pre, i) for i in range(world.num_videos)]
    if workers <= 1:
        parts = [_video_batch(job) for job in jobs]
    else:  # fork before any CUDA use (the caller encodes afterwards)
        with multiprocessing.get_context("fork").Pool(workers, initializer=_one_thread) as pool:
            parts = pool.map(_video_batch, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _one_thread() -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


@torch.no_grad()
def encode_latents(clips: dict[str, np.ndarray], vae: Any, batch: int = 256) -> dict[str, np.ndarray]:
    """Add `latents`, `ref_latent`, `ref_face_latent` (as `VaeEncoder` does in preprocessing)."""
    out = {"latents": "frames", "ref_latent": "ref_frame", "ref_face_latent": "ref_face_crop"}
    for column, pixels in out.items():
        values = clips[pixels] if pixels == "frames" else clips[pixels][:, None]
        parts = [vae.encode(np.ascontiguousarray(values[i:i + batch])).float().cpu().numpy()
                 for i in range(0, len(values), batch)]
        clips[column] = np.concatenate(parts)
    return clips


def _select(clips: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in clips.items()}


# ------------------------------------------------------------------------------------- training
@dataclass
class _Plan:
    """The step budget; `total` is fixed after warm-up when a time cap is set."""

    total: int


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _train_tensors(clips: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """The training columns as tensors on ``device`` (the whole set stays there; batches are index draws)."""
    return {k: torch.from_numpy(np.ascontiguousarray(clips[k])).to(device) for k in TRAIN_COLUMNS if k in clips}


def train(cfg: PretrainConfig, clips: dict[str, np.ndarray], device: torch.device) -> tuple[Any, dict, dict]:
    """Train on ``clips``; returns (model, EMA weights, training record)."""
    from ray_jobs.training.ema import EMA
    from ray_jobs.training.engine import build_adamw, lr_factor

    torch.manual_seed(cfg.seed)
    model = load_denoiser(cfg.model, Storage()).to(device).train()
    data = _train_tensors(clips, device)
    num_rows = len(data["latents"])
    plan = _Plan(cfg.steps)
    optimizer = build_adamw(model.parameters(), cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg.optim, s, plan.total))
    ema = EMA(model, cfg.objective.ema_decay, zero_stage=0, warmup=cfg.objective.ema_warmup)
    generator = torch.Generator().manual_seed(cfg.seed)
    curve, started, step = [], time.perf_counter(), 0
    while step < plan.total:
        step += 1
        index = torch.randint(num_rows, (cfg.batch_size,), generator=generator).to(device)
        loss, _ = teacher_loss(model, {k: v[index] for k, v in data.items()}, cfg.objective, generator,
                               device, torch.float32)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clipping)
        optimizer.step()
        scheduler.step()
        ema.update(step)
        if step == max(cfg.optim.warmup_steps, 20) and cfg.max_seconds:
            plan.total = _capped_steps(cfg, step, time.perf_counter() - started)
        if step % cfg.log_every == 0 or step == plan.total:
            curve.append(_log_step(step, plan.total, float(loss.detach()), scheduler, started, cfg.batch_size))
    seconds = time.perf_counter() - started
    record = {"steps": step, "train_seconds": seconds, "samples_per_s": step * cfg.batch_size / seconds,
              "train_clips": num_rows, "curve": curve}
    return model, ema.full_state_dict(), record


def _capped_steps(cfg: PretrainConfig, done: int, seconds: float) -> int:
    rate = done / seconds
    total = min(cfg.steps, int(rate * cfg.max_seconds))
    log.info("%.1f steps/s: %d steps fit in max_seconds=%.0f (config steps %d)", rate, total, cfg.max_seconds, cfg.steps)
    return max(total, done)


def _log_step(step: int, total: int, loss: float, scheduler: Any, started: float, batch: int) -> dict:
    seconds = time.perf_counter() - started
    row = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "seconds": seconds,
           "samples_per_s": step * batch / seconds}
    log.info("step %d/%d loss %.4f lr %.2e %.0f samples/s", step, total, loss, row["lr"], row["samples_per_s"])
    return row


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: Any, vae: Any, clips: dict[str, np.ndarray], ev: EvalSection, cfg_drop: list[str],
             device: torch.device) -> list[dict[str, Any]]:
    """Held-out rows: the model at each guidance, copy-the-reference and the VAE round trip (means over clips).

    Truth is the rendered frames themselves (exact: no codec in this job).
    """
    from model.metrics import motion_error, psnr, ssim
    from model.sampling import SamplerSpec, sample
    from model.vae import video_to_uint8

    model.eval()
    batch = {k: torch.from_numpy(np.ascontiguousarray(clips[k])) for k in TRAIN_COLUMNS if k in clips}
    cond = Conditions.from_batch(batch, device)
    truth = clips["frames"]
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(ev.seed)).to(device)
    videos = {"copy_reference": np.repeat(clips["ref_frame"][:, None], truth.shape[1], axis=1),
              "vae_round_trip": video_to_uint8(vae.decode(batch["latents"].to(device))).numpy()}
    nfe = {"copy_reference": 0, "vae_round_trip": 0}
    for guidance in ev.guidances:
        name = f"teacher_g{guidance:g}"
        spec = SamplerSpec(kind="euler_cfg", steps=ev.steps, guidance=guidance, shift=ev.shift, cfg_drop=list(cfg_drop))
        result = sample(model, noise, cond, spec)
        videos[name], nfe[name] = video_to_uint8(vae.decode(result.x)).numpy(), result.nfe
    rows = []
    for name, video in videos.items():
        per_clip = [(psnr(v, t), ssim(v, t), motion_error(v, t)) for v, t in zip(video, truth)]
        psnrs, ssims, motions = (float(np.mean(col)) for col in zip(*per_clip))
        rows.append({"variant": name, "nfe": nfe[name], "psnr": psnrs, "ssim": ssims, "motion_error": motions,
                     "clips": len(truth)})
    model.train()
    return rows


def _heldout(clips: dict[str, np.ndarray], limit: int) -> dict[str, np.ndarray]:
    """Up to ``limit`` held-out clips, spread over videos (every video's clips in turn)."""
    rows = np.flatnonzero(clips["split"] == "heldout")
    order = np.argsort(clips["start_frame"][rows], kind="stable")  # first clip of every video first
    return _select(clips, rows[order][:limit])


# ------------------------------------------------------------------------------------------ main
def run(cfg: PretrainConfig) -> dict[str, Any]:
    """Render and encode the world(s), train, evaluate, export; returns the fit report."""
    from artifacts.models import load_vae

    started = time.perf_counter()
    pre = cfg.preprocess_cfg()
    workers = cfg.data_workers or os.cpu_count() or 1
    world = render_world(cfg.world, pre, workers)
    demo = render_world(cfg.demo_world, pre, workers) if cfg.demo_world is not None else None
    device = _device(cfg.device)  # after the fork of the render pool: CUDA must not be initialised in it
    vae = load_vae(cfg.model.vae_path, Storage(), device=device)
    world = encode_latents(world, vae)
    data_seconds = time.perf_counter() - started
    log.info("world seed %d: %d videos -> %d clips in %.1f s", cfg.world.seed, cfg.world.num_videos,
             len(world["split"]), data_seconds)
    train_rows = np.flatnonzero(world["split"] == "train")
    model, weights, record = train(cfg, _select(world, train_rows), device)
    model.load_state_dict(weights, strict=False)  # evaluate what is exported: the EMA
    report = {"config": cfg.model_dump(mode="json"), "device": _device_name(device), "data_seconds": data_seconds,
              **record,
              "world_clips": {"train": int(len(train_rows)), "heldout": int((world["split"] == "heldout").sum())},
              "heldout": evaluate(model, vae, _heldout(world, cfg.eval.clips), cfg.eval, cfg.objective.cfg_drop, device)}
    if demo is not None:
        demo_clips = _heldout(encode_latents(demo, vae), cfg.eval.clips)
        report["demo_heldout"] = evaluate(model, vae, demo_clips, cfg.eval, cfg.objective.cfg_drop, device)
    report["total_seconds"] = time.perf_counter() - started
    report["history"] = _history(cfg.model.pretrained_path)
    _export(model.cpu(), {k: v.cpu() for k, v in weights.items()}, report, Path(cfg.output),
            pretrained_card(cfg, pre, report["heldout"]))
    return report


def pretrained_card(cfg: PretrainConfig, pre: PreprocessConfig, heldout: list[dict[str, Any]]) -> Any:
    """The export's model card: clip geometry of `pre`, Euler/CFG at the guidance that scored best held out."""
    from artifacts.card import FrameGeometry, ModelCard
    from model.sampling import SamplerSpec

    rows = [r for r in heldout if r["variant"].startswith("teacher_g")]
    best = max(rows, key=lambda r: r["psnr"])["variant"].removeprefix("teacher_g") if rows else "1"
    sampler = SamplerSpec(kind="euler_cfg", guidance=float(best), shift=cfg.eval.shift,
                          cfg_drop=list(cfg.objective.cfg_drop))
    frames = FrameGeometry(height=pre.height, width=pre.width, fps=pre.fps, clip_frames=pre.clip_frames)
    return ModelCard(kind="teacher", model=cfg.model.model_copy(update={"pretrained_path": None}), frames=frames,
                     sampler=sampler)


def _history(init_from: str | None) -> list[dict[str, Any]]:
    """Earlier fits this one continues (``model.pretrained_path`` with its own FIT_REPORT.json), oldest first."""
    if init_from is None or not (Path(init_from) / "FIT_REPORT.json").is_file():
        return []
    earlier = json.loads((Path(init_from) / "FIT_REPORT.json").read_text())
    keys = ("device", "steps", "train_seconds", "samples_per_s", "config", "heldout", "demo_heldout")
    return earlier.get("history", []) + [{k: earlier[k] for k in keys if k in earlier}]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def _export(model: Any, weights: dict[str, torch.Tensor], report: dict, out: Path, card: Any) -> None:
    from artifacts.exports import export_denoiser

    out.mkdir(parents=True, exist_ok=True)
    export_denoiser(model, weights, out, card)
    (out / "FIT_REPORT.json").write_text(json.dumps(report, indent=1) + "\n")
    log.info("wrote %s", out)


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(PretrainConfig, argv, description=__doc__,
                           default_config=str(_CONFIG_DIR / "assets" / "pretrain_teacher.yaml"))
    report = run(cfg)
    print(json.dumps({k: report[k] for k in ("steps", "train_seconds", "heldout", "demo_heldout") if k in report}))


if __name__ == "__main__":
    main()
