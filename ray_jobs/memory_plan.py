"""Per-GPU memory plan of a training job (teacher, TPO, distillation) or of serving, and the settings that fit.

    python -m ray_jobs.memory_plan CONFIG.yaml [--set k=v ...] [--gpus 8] [--gpu-gb 80] [--clip 81x720x1280]
    python -m ray_jobs.memory_plan --paper      # the docs/scale.md table (both Wan presets, every job, 80/141 GB)

Why: whether a 14B job fits a node, and with which ZeRO stage / sequence-parallel degree / offload, is
arithmetic on facts we have exactly; computing it beats finding out with an OOM on a rented node.

Parameters are counted exactly on the meta device (`AnimationDenoiser(**preset_kwargs(cfg))`, LoRA
adapters added with peft the way the jobs add them). Per GPU, bf16 mixed precision with AdamW (the
ZeRO paper's accounting; ZeRO partitions over all ``gpus`` ranks, DeepSpeed's sequence-data-parallel
group, SP ranks included):

* weights 2 B/param (ZeRO-3: /gpus, plus one block gathered), grads 2 B per trainable param
  (ZeRO-2/3: /gpus), fp32 master + Adam m, v 12 B per trainable param (ZeRO >= 1: /gpus; offloaded to
  CPU with ``offload_optimizer``);
* per job: the teacher's fp32 EMA (`ray_jobs.training.ema`, full under ZeRO 0-2, sharded under 3);
  distillation ``full``: a bf16 EMA target copy of the student and a frozen bf16 teacher (3 copies),
  ``lora``: one shared base (the teacher = the base with adapters off) + adapters + a bf16 EMA of the
  trainable weights; TPO: the frozen base + two adapters, the reference pass is the base with adapters
  off (no copy); serving: bf16 weights only;
* activations with gradient checkpointing, per clip of the micro-batch (TPO: winner + loser = 2 clips a
  pair): the per-block checkpoint and one block's recompute + backward working set of
  `checkpoint_bytes` / `block_bytes` (the assumptions of docs/scale.md's sequence-parallel section,
  which `benchmarks/sequence_parallel.py` also computes with them), plus what gradient checkpointing
  does not cover: the token embedding before the SP split (`embed_bytes`) and the pose encoder on
  full-resolution skeleton frames (`pose_bytes`). Checked against measured tiny runs
  (`measure_activation_peak`; ratios in docs/scale.md).

A setting fits when the total is at most ``headroom`` x the card (default 0.9: allocator
fragmentation, CUDA context, DeepSpeed's communication buckets). The recommendation is the first fit in
the order: no offload, then optimizer offload, then optimizer + parameter offload; within that ZeRO-2
before ZeRO-3 (fewer collectives); then the smallest SP degree.
"""

from __future__ import annotations

import argparse
import functools
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import yaml

__all__ = ["Clip", "Setting", "JobShape", "checkpoint_bytes", "block_bytes", "serve_block_bytes", "embed_bytes",
           "pose_bytes", "parameter_counts", "job_shape", "state_bytes", "activation_parts", "plan_row", "recommend",
           "paper_rows", "format_table", "measure_activation_peak", "main"]

GB = 1e9
BF16 = 2
OFFLOADS = ("none", "optimizer", "optimizer+params")
EMBED_COPIES = 6  # token-sized tensors of `AnimationDenoiser._embed` autograd keeps (patch, pose, sums, layout)
PAPER_CLIP = "81x720x1280"
PAPER_INIT = "outputs/runs/teacher/export"  # never read: the plan counts the preset's parameters


# ------------------------------------------------------------------ activation assumptions (one place)
def checkpoint_bytes(blocks: int, local_tokens: float, dim: int, dtype_bytes: int = BF16) -> float:
    """Gradient checkpointing keeps one hidden state per block for the tokens held on this rank."""
    return blocks * local_tokens * dim * dtype_bytes


def block_bytes(local_tokens: float, dim: int, ffn: int, dtype_bytes: int = BF16) -> float:
    """One block recomputed + its backward: ~(30 d + 4 ffn) values per local token (flash attention: no S^2)."""
    return local_tokens * (30 * dim + 4 * ffn) * dtype_bytes


def serve_block_bytes(local_tokens: float, dim: int, ffn: int, dtype_bytes: int = BF16) -> float:
    """Inference keeps one block's activations: ~(4 d + ffn) values per local token."""
    return local_tokens * (4 * dim + ffn) * dtype_bytes


def embed_bytes(tokens: float, dim: int, dtype_bytes: int = BF16) -> float:
    """Token embedding (patch + ref + pose, before the SP split, not checkpointed): EMBED_COPIES x (S, d)."""
    return EMBED_COPIES * tokens * dim * dtype_bytes


def pose_bytes(frames: int, height: int, width: int, channels: Sequence[int], temporal_factor: int,
               dtype_bytes: int = BF16) -> float:
    """Pose encoder on the full-resolution skeleton video (every rank, not checkpointed): its input plus,
    per stride-2 stage, the conv output and SiLU output autograd keeps; the temporal concat's copy on top."""
    pixels = frames * height * width
    values = 3 * pixels + sum(2 * ch * pixels / 4 ** (i + 1) for i, ch in enumerate(channels))
    if temporal_factor > 1:
        values += channels[-1] * pixels / 4 ** len(channels)
    return values * dtype_bytes


# ------------------------------------------------------------------ what is planned
@dataclass(frozen=True)
class Clip:
    """Pixel geometry of one training clip / one request: frames x height x width."""

    frames: int
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> "Clip":
        try:
            frames, height, width = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"clip {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 81x720x1280") from None
        return cls(frames, height, width)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Setting:
    """What the plan chooses: ZeRO stage, Ulysses degree, what is offloaded to CPU."""

    zero: int = 2
    sp: int = 1
    offload: str = "none"

    def __str__(self) -> str:
        zero = f"ZeRO-{self.zero}" if self.zero else "no ZeRO"
        return f"{zero}, sp {self.sp}" + ("" if self.offload == "none" else f", offload {self.offload}")


@dataclass(frozen=True)
class JobShape:
    """A job's memory-relevant facts: parameter counts, extra copies, clips with grad per micro-batch."""

    job: str
    preset: str
    kwargs: dict[str, Any] = field(repr=False)
    engine_params: int  # everything in the DeepSpeed module (base + adapters + heads)
    trainable: int
    frozen_copy_params: int = 0  # bf16 weights outside the engine: distillation's target and teacher
    ema_fp32_params: int = 0  # the training loop's fp32 EMA of the trainable weights
    clips: int = 1  # clips through the trained network with grad per micro-batch
    max_zero: int = 3
    training: bool = True
    block_params: int = 0  # what ZeRO-3 gathers at a time


def parameter_counts(model_cfg, lora: tuple[int, str] | None = None, adapters: int = 1) -> dict[str, int]:
    """Parameter counts of the denoiser ``model_cfg`` builds, on the meta device (no memory, exact):
    ``total``, ``lora`` (``adapters`` peft adapters of ``lora`` = (rank, targets), added as the jobs add
    them), ``aux`` (the aux head, which distillation trains in full) and ``block`` (the largest block)."""
    return dict(_counts(model_cfg.model_dump_json(), lora, adapters))


@functools.lru_cache(maxsize=32)
def _counts(model_json: str, lora: tuple[int, str] | None, adapters: int) -> tuple[tuple[str, int], ...]:
    import torch

    from model.denoiser import AnimationDenoiser, lora_config
    from model.presets import ModelConfig, preset_kwargs

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # two TPO experts: intended
        model = AnimationDenoiser(**preset_kwargs(ModelConfig.model_validate_json(model_json)))
        for i in range(adapters if lora else 0):
            model.add_adapter(lora_config(lora[0], None, lora[1]), f"adapter{i}")
    counts = {n: p.numel() for n, p in model.named_parameters()}
    return (("total", sum(counts.values())), ("lora", sum(v for n, v in counts.items() if "lora_" in n)),
            ("aux", sum(v for n, v in counts.items() if n.startswith("aux_"))),
            ("block", max(sum(p.numel() for p in b.parameters()) for b in model.blocks)))


# ------------------------------------------------------------------ per-GPU bytes
def state_bytes(shape: JobShape, setting: Setting, gpus: int) -> dict[str, float]:
    """Weights, grads, optimizer state, fp32 EMA and frozen copies per GPU for ``setting`` over ``gpus`` ranks."""
    z, params_off = setting.zero, setting.offload == "optimizer+params"
    weights = BF16 * shape.engine_params / (gpus if z == 3 else 1)
    if z == 3:  # the gathered block (DeepSpeed's live parameters); nothing stays resident when offloaded
        weights = BF16 * shape.block_params + (0 if params_off else weights)
    if not shape.training:
        return {"weights": weights, "grads": 0.0, "optimizer": 0.0, "ema": 0.0, "frozen": 0.0}
    grads = BF16 * shape.trainable / (gpus if z >= 2 else 1)
    optimizer = 0.0 if setting.offload != "none" else 12 * shape.trainable / (gpus if z >= 1 else 1)
    ema = 4 * shape.ema_fp32_params / (gpus if z == 3 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "ema": ema,
            "frozen": BF16 * shape.frozen_copy_params}


def _tokens(kw: dict[str, Any], clip: Clip, sp: int) -> tuple[int, int]:
    """(all tokens of the clip, tokens on one SP rank): Wan VAE + patch geometry, whole latent frames per rank."""
    spatial = kw["vae_spatial_factor"] * kw["patch_size"][1]
    latent_frames = 1 + (clip.frames - 1) // kw["vae_temporal_factor"] + int(kw.get("ref_as_frame", False))
    per_frame = (clip.height // spatial) * (clip.width // spatial)
    return latent_frames * per_frame, math.ceil(latent_frames / sp) * per_frame


def activation_parts(kw: dict[str, Any], clip: Clip, sp: int, clips: int = 1, training: bool = True,
                     dtype_bytes: int = BF16) -> dict[str, float]:
    """Activation bytes per GPU by part, for ``clips`` clips of the micro-batch (see the module docstring)."""
    dim, ffn = kw["num_attention_heads"] * kw["attention_head_dim"], kw["ffn_dim"]
    tokens, local = _tokens(kw, clip, sp)
    pose = pose_bytes(clip.frames, clip.height, clip.width, kw["pose_channels"], kw["vae_temporal_factor"], dtype_bytes)
    if not training:  # one block beside the clip's hidden state and residual, or the pose encoder's first stage
        peak = max(serve_block_bytes(local, dim, ffn, dtype_bytes) + 2 * tokens * dim * dtype_bytes,
                   (3 + 2 * kw["pose_channels"][0] / 4) * clip.frames * clip.height * clip.width * dtype_bytes)
        return {"inference": clips * peak}
    return {"checkpoints": clips * checkpoint_bytes(kw["num_layers"], local, dim, dtype_bytes),
            "block": clips * block_bytes(local, dim, ffn, dtype_bytes),
            "embed": clips * embed_bytes(tokens, dim, dtype_bytes), "pose": clips * pose}


def plan_row(shape: JobShape, clip: Clip, setting: Setting, gpus: int, gpu_gb: float,
             headroom: float = 0.9) -> dict[str, Any]:
    """One table row: GB per GPU by part, total, and whether it fits ``headroom`` x ``gpu_gb``."""
    states = state_bytes(shape, setting, gpus)
    acts = sum(activation_parts(shape.kwargs, clip, setting.sp, shape.clips, shape.training).values())
    total = sum(states.values()) + acts
    return {"job": shape.job, "preset": shape.preset, "gpus": f"{gpus} x {gpu_gb:g} GB", "clip": str(clip),
            "setting": str(setting), **{k: _gb(v) for k, v in states.items()},
            "activations": _gb(acts), "total": _gb(total),
            "fits": total <= headroom * gpu_gb * GB}


def _gb(value: float) -> float:
    """GB with one decimal; two significant digits below 0.1 GB (tiny configs)."""
    return round(value / GB, 1) if value >= 0.1 * GB else float(f"{value / GB:.2g}")


def candidates(shape: JobShape, gpus: int) -> list[Setting]:
    """Settings in order of preference (module docstring); SP degrees divide the heads and the GPUs."""
    heads = shape.kwargs["num_attention_heads"]
    sps = [sp for sp in (1, 2, 4, 8, 16) if sp <= gpus and gpus % sp == 0 and heads % sp == 0]
    if not shape.training:
        return [Setting(zero=0, sp=sp) for sp in sps]
    out = []
    for offload in OFFLOADS:
        for zero in (2, 3):
            if zero > shape.max_zero or (offload == "optimizer+params" and zero != 3):
                continue
            out += [Setting(zero, sp, offload) for sp in sps]
    return out


def recommend(shape: JobShape, clip: Clip, gpus: int, gpu_gb: float, headroom: float = 0.9) -> dict[str, Any]:
    """The first candidate that fits, or the least memory one (marked not fitting) when none does."""
    rows = [plan_row(shape, clip, s, gpus, gpu_gb, headroom) for s in candidates(shape, gpus)]
    return next((r for r in rows if r["fits"]), min(rows, key=lambda r: r["total"]))


# ------------------------------------------------------------------ job configs -> shapes
def job_shape(job: str, cfg: Any) -> JobShape:
    """The `JobShape` of a teacher / tpo / distill config (`TrainJobConfig` subclasses), or ``serve`` of its model."""
    from model.presets import preset_kwargs

    model_cfg = cfg.student_model_config() if job == "distill" else cfg.model
    base = dict(job=job, preset=model_cfg.preset, kwargs=preset_kwargs(model_cfg))
    if job == "serve":
        counts = parameter_counts(model_cfg)
        return JobShape(**base, engine_params=counts["total"], trainable=0, training=False)
    if job == "teacher":
        counts = parameter_counts(model_cfg)
        ema = counts["total"] if cfg.objective.ema_decay is not None else 0
        return JobShape(**base, engine_params=counts["total"], trainable=counts["total"], ema_fp32_params=ema,
                        clips=cfg.batch_size, block_params=counts["block"])
    if job == "tpo":
        counts = parameter_counts(model_cfg, (cfg.tpo.lora_rank, cfg.tpo.lora_targets), adapters=2)
        return JobShape(**base, engine_params=counts["total"], trainable=counts["lora"], clips=2 * cfg.batch_size,
                        block_params=counts["block"])
    if job == "distill":
        return _distill_shape(cfg, base)
    raise ValueError(f"unknown job {job!r}; known: teacher, tpo, distill, serve")


def _distill_shape(cfg: Any, base: dict[str, Any]) -> JobShape:
    """full: student + bf16 EMA target + frozen teacher (3 copies, ZeRO <= 2: the job rejects ZeRO-3); lora: one
    base shared with the teacher, adapters + the aux head trained, a bf16 EMA target of those (ZeRO-3 allowed)."""
    model_cfg = cfg.student_model_config()
    lora = (cfg.student.lora_rank, cfg.student.lora_targets) if cfg.student.mode == "lora" else None
    counts = parameter_counts(model_cfg, lora)
    trainable = counts["lora"] + counts["aux"] if lora else counts["total"]
    teacher = 0 if lora else parameter_counts(model_cfg.model_copy(update={"aux_head": False}))["total"]
    ema = trainable if cfg.objective.export_ema_decay is not None else 0
    return JobShape(**{**base, "job": f"distill {cfg.student.mode}"}, engine_params=counts["total"],
                    trainable=trainable, frozen_copy_params=trainable + teacher, ema_fp32_params=ema,
                    clips=cfg.batch_size, max_zero=3 if lora else 2, block_params=counts["block"])


def config_setting(cfg: Any) -> Setting:
    """The ZeRO stage, SP degree and offload a job config asks for (offload via ``deepspeed.raw_override``)."""
    zero = cfg.deepspeed.raw_override.get("zero_optimization", {})
    offload = "none"
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        offload = "optimizer+params" if zero.get("offload_param", {}).get("device", "none") != "none" else "optimizer"
    return Setting(zero=cfg.deepspeed.zero_stage, sp=cfg.scaling.sequence_parallel, offload=offload)


JOB_KEYS = {"tpo": "tpo", "student": "distill", "teacher": "distill"}  # a top-level section only that job has


def load_job_config(path: str, overrides: Sequence[str] = (), job: str | None = None) -> tuple[str, Any]:
    """(job name, typed config) of a job YAML; the job is named by ``job`` or by its own top-level sections."""
    from core.config import load_config

    data = yaml.safe_load(Path(path).read_text()) or {}
    job = job or next((name for key, name in JOB_KEYS.items() if key in data), "teacher")
    cls = _job_config_class(job)
    return job, load_config(cls, path, overrides)


# ------------------------------------------------------------------ tables
PAPER_JOBS = (("teacher", {}), ("tpo", {}), ("distill", {"student.mode": "full"}), ("distill", {"student.mode": "lora"}),
              ("serve", {}))  # (job, dotted overrides)
COLUMNS = ("job", "preset", "gpus", "clip", "setting", "weights", "grads", "optimizer", "ema", "frozen",
           "activations", "total", "fits")


def paper_rows(presets: Sequence[str] = ("wan-1.3b", "wan-animate-14b"), cards: Sequence[float] = (80, 141),
               gpus: int = 8, clip: Clip = Clip.parse(PAPER_CLIP), headroom: float = 0.9) -> list[dict[str, Any]]:
    """The recommended row of every job at both Wan presets on ``gpus`` x each card, micro-batch 1 (TPO: 1 pair)."""
    from core.config import load_config

    rows = []
    for preset in presets:
        for job, extra in PAPER_JOBS:
            overrides = {"model.preset": preset, "batch_size": 1, "model.pretrained_path": PAPER_INIT, **extra}
            shape = job_shape(job, load_config(_job_config_class(job), None, overrides))
            rows += [recommend(shape, clip, gpus, card, headroom) for card in cards]
    return rows


def _job_config_class(job: str) -> type:
    """The config class of ``job`` (serving is planned from a teacher config's model section)."""
    if job in ("teacher", "serve"):
        from ray_jobs.train_teacher import TeacherConfig as cls
    elif job == "tpo":
        from ray_jobs.train_tpo import TPOConfig as cls
    elif job == "distill":
        from ray_jobs.distill_lcm import DistillConfig as cls
    else:
        raise ValueError(f"unknown job {job!r}; known: teacher, tpo, distill, serve")
    return cls


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """A markdown table (GB per GPU), as docs/scale.md shows it."""
    head = "| " + " | ".join(columns) + " |\n| " + " | ".join("---" for _ in columns) + " |\n"
    cell = lambda v: ("yes" if v else "**no**") if isinstance(v, bool) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(cell(r[c]) for c in columns) + " |\n" for r in rows)


# ------------------------------------------------------------------ calibration on this CPU
def measure_activation_peak(model_cfg, clip: Clip, clips: int = 1, seed: int = 0) -> int:
    """Peak bytes above weights and gradients of one fp32 forward + backward with gradient checkpointing, measured
    by torch's `MemTracker` (every tensor the step allocates): what `activation_parts` predicts.

    The gradients are allocated before the step, so the tracked peak is weights + gradients + the activation
    peak (otherwise a large model peaks at the end of backward, when the gradients exist and activations don't)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from model.conditions import Conditions
    from model.presets import build_denoiser, preset_kwargs

    torch.manual_seed(seed)
    model = build_denoiser(model_cfg.model_copy(update={"gradient_checkpointing": True})).train()
    kw, gen = preset_kwargs(model_cfg), torch.Generator().manual_seed(seed)
    s, tf = kw["vae_spatial_factor"], kw["vae_temporal_factor"]
    lat = (clips, kw["in_channels"], 1 + (clip.frames - 1) // tf, clip.height // s, clip.width // s)
    cond = Conditions(ref_latent=torch.randn(*lat[:2], 1, *lat[3:], generator=gen),
                      pose=torch.rand(clips, 3, clip.frames, clip.height, clip.width, generator=gen) * 2 - 1,
                      audio=torch.randn(clips, clip.frames, kw["audio_window"], kw["audio_mels"], generator=gen),
                      face=torch.randn(clips, kw["in_channels"], 1, 8, 8, generator=gen))
    x = torch.randn(*lat, generator=gen)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(x, torch.full((clips,), 0.5), cond).square().mean().backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    held = sum(t.untyped_storage().nbytes() for p in model.parameters() for t in (p, p.grad))
    return int(max(v for k, v in peak.items() if str(k).endswith("Total")) - held
               - sum(b.untyped_storage().nbytes() for b in model.buffers()))


CALIBRATION = (("tiny", {}, "8x64x64"), ("tiny", {}, "16x128x128"), ("tiny", {}, "16x128x256"),
               ("wan-1.3b", {"num_layers": 2}, "9x256x256"))  # Wan-1.3B dims, 2 blocks: fits this CPU


def calibration_rows(cases: Sequence[tuple[str, dict, str]] = CALIBRATION) -> list[dict[str, Any]]:
    """Measured vs predicted activation bytes (fp32, sp 1) of (preset, overrides, clip) cases."""
    from model.presets import ModelConfig, preset_kwargs

    rows = []
    for preset, overrides, text in cases:
        cfg, clip = ModelConfig(preset=preset, overrides=overrides), Clip.parse(text)
        parts = activation_parts(preset_kwargs(cfg), clip, sp=1, dtype_bytes=4)
        measured = measure_activation_peak(cfg, clip)
        rows.append({"model": preset + "".join(f", {k} {v}" for k, v in overrides.items()), "clip": text,
                     "tokens": _tokens(preset_kwargs(cfg), clip, 1)[0],
                     **{k: round(v / 2**20, 1) for k, v in parts.items()},
                     "predicted_mb": round(sum(parts.values()) / 2**20, 1), "measured_mb": round(measured / 2**20, 1),
                     "measured/predicted": round(measured / sum(parts.values()), 2)})
    return rows


# ------------------------------------------------------------------ command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("config", nargs="?", help="a teacher / TPO / distillation job YAML")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--job", choices=("teacher", "tpo", "distill", "serve"),
                        help="default: from the config's own sections (tpo:, student:/teacher:, else teacher)")
    parser.add_argument("--gpus", type=int, help="GPUs (ranks) of the job; default scaling.num_workers")
    parser.add_argument("--gpu-gb", type=float, nargs="+", default=[80.0], help="memory of one card, GB")
    parser.add_argument("--clip", help="FRAMESxHEIGHTxWIDTH; default the data card of the config's `data`")
    parser.add_argument("--headroom", type=float, default=0.9, help="usable fraction of a card")
    parser.add_argument("--paper", action="store_true", help="print docs/scale.md's table")
    parser.add_argument("--calibrate", action="store_true", help="measure the tiny preset on this CPU")
    return parser


def _clip_of(cfg: Any, text: str | None) -> tuple[Clip, str]:
    """The clip geometry to plan for, and where it came from."""
    if text:
        return Clip.parse(text), "--clip"
    from artifacts.shards import data_card
    from core.storage import Storage, StorageError

    try:
        frames = data_card(cfg.data, Storage(cfg.storage)).frames
        source = f"data card of {cfg.data}"
    except (StorageError, OSError, ValueError) as exc:
        from artifacts.card import FrameGeometry

        frames, source = FrameGeometry(), f"FrameGeometry defaults ({cfg.data}: {type(exc).__name__}); pass --clip"
    return Clip(frames.clip_frames, frames.height, frames.width), source


def config_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """The config's own setting and the recommended one, on each card; and a note on the clip's source."""
    job, cfg = load_job_config(args.config, args.overrides, args.job)
    shape = job_shape(job, cfg)
    clip, source = _clip_of(cfg, args.clip)
    gpus = args.gpus or cfg.scaling.num_workers
    own = Setting(zero=0, sp=1) if job == "serve" else config_setting(cfg)
    rows = []
    for card in args.gpu_gb:
        rows += [{**plan_row(shape, clip, own, gpus, card, args.headroom), "row": "config"},
                 {**recommend(shape, clip, gpus, card, args.headroom), "row": "recommended"}]
    return rows, f"clip {clip} from {source}; micro-batch {shape.clips} clip(s) with grad; headroom {args.headroom:g}"


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.calibrate:
        rows = calibration_rows()
        print(format_table(rows, list(rows[0])))
        return
    if args.paper:
        print(format_table(paper_rows(headroom=args.headroom)))
        return
    if not args.config:
        _parser().error("give a job config, --paper or --calibrate")
    rows, note = config_rows(args)
    print(format_table(rows, ("row", *COLUMNS)))
    print(note)


if __name__ == "__main__":
    main()
