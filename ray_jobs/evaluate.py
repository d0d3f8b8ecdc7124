"""Evaluation against the synthetic world's exact ground truth: a library for the pipeline and benchmarks, and a job.

`python -m ray_jobs.evaluate --config ray_jobs/configs/tiny/evaluate.yaml [--set model=FOLDER ...]`

For every variant (a model + a sampler setting) and every held-out clip: generate from the clip's
conditions (`Conditions.from_batch`), compare with the exact ground truth (frames re-rendered from
the clip's sidecar when it is reachable, with its keypoints and mouth track; else the shard's
`frames`, `keypoints` and `mouth_openness` columns) and report per clip:

* `psnr`, `ssim`: appearance; `motion_error`: frame-difference error (mixes pose-following and flicker);
* `pose_error` (mean px) and `pck` (share of keypoints within 5 % of the frame height): keypoints
  detected on the generated frames by the puppet perception model (`model.perception`, default the
  checked-in `model/assets/puppet_perception/`) against the true keypoints;
* `mouth_sync`: Pearson r of the detected mouth openness against the true openness track
  (`model.metrics.lip_sync`; 0 for a still mouth, NaN when the truth is constant);
* `flicker`: frame-to-frame change inside pixels static in the truth;
* `nfe` and `seconds` end to end (VAE decode included; detection not).

Reference rows: `ground_truth` (the detector run on the exact frames: its own error, so a row close
to it is as good as this detector can tell; added by `evaluate` unless told not to), the
copy-the-reference baseline (every frame = the reference frame: a model that does not clearly beat
it on PSNR and pose error has not learned to animate) and the VAE round trip (the clip's own
latents decoded, `Variant.round_trip()`: the ceiling of a model in this latent space).

The job (`EvaluateConfig`) evaluates one export folder (teacher, TPO or student, local or s3://,
rebuilt and sampled as its model card says: `artifacts.exports.load_export`) and writes `{output}/metrics.json` (`{"rows": [one per variant, means over clips],
"clips": [per clip], ...}`, NaN/inf as null) and `{output}/grid.mp4` (truth | copy | model, one row per clip).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator

from model.conditions import Conditions
from core.config import StrictConfig
from core.storage import Storage, StorageConfig
from model.metrics import EXTRA_METRICS, flicker, lip_sync, motion_error, pck, pose_error, psnr, ssim
from model.precision import Precision
from model.sampling import SamplerSpec

__all__ = ["VAE_ROUND_TRIP", "GROUND_TRUTH", "COPY_REFERENCE", "Variant", "ClipTruth", "heldout_clips",
           "clip_truth", "ground_truth", "evaluate", "summarize", "write_grid", "EvaluateConfig", "run", "main"]

log = logging.getLogger(__name__)

VAE_ROUND_TRIP = "vae_round_trip"  # a model-less Variant's sampler: decode the clip's own latents
GROUND_TRUTH = "ground_truth"  # the row of the detector run on the exact frames
COPY_REFERENCE = "copy_reference"


@dataclass
class Variant:
    """One row of the evaluation table: a model and how it samples (normally its card's `SamplerSpec`).

    ``model`` None: the copy-the-reference baseline, or the VAE round trip when ``vae_round_trip``.
    ``adapter_switch``: the TPO sampler's LoRA switch (`artifacts.exports.LoadedExport.adapter_switch`).
    """

    name: str
    model: torch.nn.Module | None
    spec: SamplerSpec = field(default_factory=SamplerSpec)
    adapter_switch: Callable[[str | None], None] | None = None
    vae_round_trip: bool = False

    @classmethod
    def copy_reference(cls, name: str = COPY_REFERENCE) -> "Variant":
        return cls(name, None)

    @classmethod
    def round_trip(cls, name: str = VAE_ROUND_TRIP) -> "Variant":
        return cls(name, None, vae_round_trip=True)


@dataclass(frozen=True)
class ClipTruth:
    """Exact ground truth of a clip: frames uint8 (T, H, W, 3), keypoints (T, 17, 3) pixels, mouth (T,) (NaN = unknown)."""

    frames: np.ndarray
    keypoints: np.ndarray
    mouth: np.ndarray


def heldout_clips(data_uri: str, storage: Storage, limit: int, split: str = "heldout") -> list[dict[str, Any]]:
    """Up to ``limit`` clips of ``split`` (train clips if the data has none of it), as numpy dicts."""
    from artifacts.shards import take_clips

    return take_clips(data_uri, storage, split, limit)


def _read_sidecar(clip: dict[str, Any], storage: Storage) -> dict[str, Any] | None:
    sidecar_uri = str(clip.get("source", "")).rsplit(".", 1)[0] + ".json"
    try:
        sidecar = storage.read_json(sidecar_uri)
    except (OSError, ValueError):
        return None
    return sidecar if isinstance(sidecar, dict) and "keypoints" in sidecar else None


def _shard_truth(clip: dict[str, Any]) -> ClipTruth:
    """The shard's own columns: decoded frames, keypoints and mouth track at shard geometry (NaN when absent)."""
    frames = np.asarray(clip["frames"])
    count = frames.shape[0]
    keypoints = np.asarray(clip.get("keypoints", np.full((count, 17, 3), np.nan)), dtype=np.float64)
    mouth = np.asarray(clip.get("mouth_openness", np.full(count, np.nan)), dtype=np.float64).reshape(-1)
    return ClipTruth(frames, keypoints, mouth)


def clip_truth(clip: dict[str, Any], storage: Storage) -> ClipTruth:
    """Exact frames, keypoints and mouth of a clip, re-rendered from its sidecar when readable, else its shard columns."""
    from ray_jobs.synthetic.world import ground_truth_frames

    sidecar = _read_sidecar(clip, storage)
    if sidecar is None:
        return _shard_truth(clip)
    count, height, width = np.asarray(clip["frames"]).shape[:3]
    start = int(clip["start_frame"])
    frames = ground_truth_frames(sidecar, start, count, height, width)
    keypoints = np.asarray(sidecar["keypoints"][start:start + count], dtype=np.float64)
    keypoints[..., 0] *= width / sidecar["width"]
    keypoints[..., 1] *= height / sidecar["height"]
    mouth = np.asarray(sidecar["mouth_openness"][start:start + count], dtype=np.float64)
    return ClipTruth(frames, keypoints, mouth)


def ground_truth(clip: dict[str, Any], storage: Storage) -> np.ndarray:
    """Exact frames uint8 (T, H, W, 3) from the puppet renderer when the sidecar is readable, else decoded frames."""
    return clip_truth(clip, storage).frames


def _generate(variant: Variant, clip: dict[str, Any], vae: Any, seed: int) -> tuple[np.ndarray, int, float]:
    from model.generate import generate

    truth = np.asarray(clip["frames"])
    if variant.model is None and variant.vae_round_trip:
        from model.vae import video_to_uint8

        start = time.perf_counter()
        video = vae.decode(torch.as_tensor(np.asarray(clip["latents"]), dtype=torch.float32)[None].to(vae.device))
        return video_to_uint8(video)[0].numpy(), 0, time.perf_counter() - start
    if variant.model is None:
        start = time.perf_counter()
        return np.repeat(np.asarray(clip["ref_frame"])[None], truth.shape[0], axis=0), 0, time.perf_counter() - start
    device = next(variant.model.parameters()).device
    batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in clip.items()
             if isinstance(v, np.ndarray) and v.dtype != object}
    cond = Conditions.from_batch(batch, device, torch.float32)
    result = generate(variant.model, vae, cond, num_frames=truth.shape[0], height=truth.shape[1],
                      width=truth.shape[2], spec=variant.spec, seed=seed, adapter_switch=variant.adapter_switch)
    return result.frames.numpy(), result.nfe, result.seconds


def evaluate(variants: list[Variant], clips: list[dict[str, Any]], vae: Any, storage: Storage,
             seed: int = 0, keep_frames: bool = True, perception: Any = None,
             include_ground_truth: bool = True, metrics: dict[str, Callable] | None = None) -> dict[str, Any]:
    """Metrics per variant and clip (module doc); returns {"rows", "frames": {variant: [clip frames]}, "truth", "labels"}.

    ``perception``: a `model.perception.PuppetPerception` (None = the checked-in one). With
    ``include_ground_truth`` the rows start with `GROUND_TRUTH` (the detector on the exact frames).
    ``metrics``: extra ``fn(pred, truth) -> float`` columns (None = `model.metrics.EXTRA_METRICS`).
    """
    from model.perception import load_perception

    perception = perception if perception is not None else load_perception()
    truths = [clip_truth(c, storage) for c in clips]
    rows, frames = [], {v.name: [] for v in variants}
    if include_ground_truth:
        rows += [_clip_row(GROUND_TRUTH, i, t.frames, t, perception, 0, 0.0, metrics) for i, t in enumerate(truths)]
    for variant in variants:
        if variant.model is not None:
            variant.model.eval()
        for index, (clip, truth) in enumerate(zip(clips, truths)):
            with torch.no_grad():
                pred, nfe, seconds = _generate(variant, clip, vae, seed + index)
            rows.append(_clip_row(variant.name, index, pred, truth, perception, nfe, seconds, metrics))
            if keep_frames:
                frames[variant.name].append(pred)
        log.info("evaluated %s on %d clips", variant.name, len(clips))
    return {"rows": rows, "frames": frames, "truth": [t.frames for t in truths], "labels": truths}


def _clip_row(name: str, index: int, pred: np.ndarray, truth: ClipTruth, perception: Any, nfe: int,
              seconds: float, metrics: dict[str, Callable] | None = None) -> dict[str, Any]:
    """One clip's metrics: pred uint8 (T, H, W, 3) against the exact truth, keypoints/mouth detected on pred."""
    found = perception.detect(pred)
    row = {"variant": name, "clip": index, "nfe": nfe, "seconds": seconds,
           "psnr": psnr(pred, truth.frames), "ssim": ssim(pred, truth.frames),
           "pose_error": pose_error(found.keypoints, truth.keypoints),
           "pck": pck(found.keypoints, truth.keypoints, truth.frames.shape[1]),
           "mouth_sync": lip_sync(found.mouth, truth.mouth),
           "flicker": flicker(pred, truth.frames), "motion_error": motion_error(pred, truth.frames)}
    extra = EXTRA_METRICS if metrics is None else metrics
    row.update({name_: fn(pred, truth.frames) for name_, fn in extra.items()})
    return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each metric per variant over its clips (NaN-aware: NaN only when every clip is NaN), first-seen order."""
    table = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        summary = {"variant": name, "clips": len(mine)}
        for key in [k for k in mine[0] if k not in ("variant", "clip")]:
            values = np.asarray([r[key] for r in mine], dtype=np.float64)
            summary[key] = float(np.nanmean(values)) if (~np.isnan(values)).any() else float("nan")
        table.append(summary)
    return table


def write_grid(frames: dict[str, list[np.ndarray]], truths: list[np.ndarray], out_path: Path, fps: float,
               columns: list[str] | None = None) -> Path:
    """MP4 grid: one row per clip, columns ground truth then each variant (labels in report)."""
    from core.media import mux_mp4

    names = columns or list(frames)
    rows = [np.concatenate([truth] + [frames[n][i] for n in names], axis=2) for i, truth in enumerate(truths)]
    mux_mp4(np.concatenate(rows, axis=1), None, fps, out_path)
    return out_path


def save_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=float))


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN / inf float replaced by None (strict JSON: null)."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


Loader = Callable[[], torch.nn.Module]


# ------------------------------------------------------------------------------------------ job
class EvaluateConfig(StrictConfig):
    """Options of `python -m ray_jobs.evaluate` (example: ray_jobs/configs/tiny/evaluate.yaml)."""

    model: str | None = Field(None, description="export folder (teacher, TPO or student, sampled as its model card "
                                                "says), local, s3:// or builtin:NAME; None = reference rows only")
    data: str = Field("outputs/shards", description="preprocessed shards folder (its manifest.json), local or s3://")
    split: Literal["heldout", "train"] = Field("heldout", description="clips of this split (train if it has none)")
    limit: int = Field(4, ge=1, description="clips evaluated")
    steps: int | None = Field(None, ge=1, description="teacher: Euler steps; student: segments (None: the card's)")
    guidance: float | None = Field(None, ge=1.0, description="teacher CFG scale (None: the card's)")
    name: str | None = Field(None, description="the model's row name (default: the card's kind)")
    perception: str | None = Field(None, description="perception model folder; None = model/assets/puppet_perception")
    vae: str | None = Field(None, description="AutoencoderKLWan folder; None = the one the shards were encoded with")
    output: str = Field("outputs/evaluate", description="folder for metrics.json and grid.mp4, local or s3://")
    seed: int = Field(0, ge=0, description="noise seed of clip i is seed + i")
    device: str = Field("cpu", description="torch device for the model, VAE and detector")
    precision: Precision = Field("auto", description="model weights: auto = bf16 on cuda, fp32 on CPU (model.precision)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None = torch default)")
    fps: float = Field(16.0, gt=0, description="grid video frame rate when the clips do not say")
    metrics: list[str] = Field(default_factory=list, description="extra columns: 'package.module:function' of "
                               "fn(pred, truth) -> float, imported when the config is checked")
    storage: StorageConfig = StorageConfig()

    @field_validator("metrics")
    @classmethod
    def _importable(cls, value: list[str]) -> list[str]:
        for path in value:
            extra_metric(path)
        return value


def extra_metric(path: str) -> Callable:
    """The metric function at import path ``path`` (a clear error when it is not one)."""
    from core.imports import import_object

    try:
        fn = import_object(path)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"metrics: {exc}") from None
    if not callable(fn):
        raise ValueError(f"metrics: {path!r} is not callable")
    return fn


def model_variant(cfg: EvaluateConfig, storage: Storage) -> Variant:
    """The row of ``cfg.model``: the export rebuilt from its card, sampled as the card says (steps/guidance overridable)."""
    from artifacts.exports import load_export
    from model.precision import cast_model, precision_dtype
    from model.presets import ModelConfig

    uri = ModelConfig(pretrained_path=cfg.model).pretrained_path  # builtin:NAME -> model/assets/NAME
    loaded = load_export(uri, storage, cfg.device)
    cast_model(loaded.model, precision_dtype(cfg.precision, cfg.device))
    spec = loaded.sampler
    if cfg.steps is not None:
        spec = spec.consistency_at(cfg.steps) if spec.kind == "consistency" else spec.with_steps(cfg.steps)
    if cfg.guidance is not None:
        spec = spec.model_copy(update={"guidance": cfg.guidance})
    return Variant(cfg.name or loaded.card.kind, loaded.model, spec, loaded.adapter_switch)


def warm_up(variant: Variant, clip: dict[str, Any], vae: Any) -> None:
    """One untimed generation, so no row pays a model's lazy initialisation."""
    if variant.model is not None:
        with torch.no_grad():
            _generate(variant, clip, vae, seed=0)


def _write_outputs(cfg: EvaluateConfig, storage: Storage, result: dict[str, Any], variants: list[Variant],
                   clips: list[dict[str, Any]]) -> dict[str, Any]:
    """{output}/metrics.json and {output}/grid.mp4 (truth | copy | model); returns the metrics document."""
    columns = [v.name for v in variants if not v.vae_round_trip]
    doc = finite_or_none({"rows": summarize(result["rows"]), "clips": result["rows"], "model": cfg.model,
                          "data": cfg.data, "split": cfg.split, "grid": "grid.mp4",
                          "grid_columns": ["ground truth", *columns], "config": cfg.model_dump(mode="json")})
    fps = float(clips[0].get("fps") or cfg.fps)
    with tempfile.TemporaryDirectory() as tmp:
        grid = write_grid(result["frames"], result["truth"], Path(tmp) / "grid.mp4", fps, columns)
        storage.upload_file(grid, storage.join(cfg.output, "grid.mp4"))
    storage.write_json(storage.join(cfg.output, "metrics.json"), doc)
    return doc


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate `cfg.model` beside the reference rows on `cfg.limit` clips; write and return metrics.json's document."""
    from artifacts.models import load_perception, load_vae
    from artifacts.shards import data_card

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    storage = Storage(cfg.storage)
    clips = heldout_clips(cfg.data, storage, cfg.limit, cfg.split)
    variants = [Variant.copy_reference(), Variant.round_trip()]
    if cfg.model is not None:
        variants.append(model_variant(cfg, storage))
    vae = load_vae(cfg.vae if cfg.vae is not None else data_card(cfg.data, storage).vae_path, storage, device=cfg.device)
    perception = load_perception(cfg.perception, storage, cfg.device)
    for variant in variants:
        warm_up(variant, clips[0], vae)
    torch.manual_seed(cfg.seed)
    metrics = {path.rpartition(":")[2]: extra_metric(path) for path in cfg.metrics}
    result = evaluate(variants, clips, vae, storage, cfg.seed, perception=perception, metrics=metrics or None)
    doc = _write_outputs(cfg, storage, result, variants, clips)
    log.info("wrote %s: %s", storage.join(cfg.output, "metrics.json"), json.dumps(doc["rows"]))
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    from ray_jobs.common import parse_job_config, setup_logging

    setup_logging()
    cfg = parse_job_config(EvaluateConfig, argv, description=__doc__,
                           default_config=str(Path(__file__).parent / "configs/tiny/evaluate.yaml"))
    doc = run(cfg)
    print(json.dumps({"output": cfg.output, "rows": doc["rows"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
