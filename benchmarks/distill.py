"""DanceLCM evaluation (issue 7) -> benchmarks/results/distill.json (+ distill_quality_vs_nfe.png, distill_grid.mp4).

Trains the students with `ray_jobs.distill_lcm.run` from the teacher export (DanceLCM K=4; plain
single-segment CD K=1; ablations without aux head / motion loss / face injection), each for the same
``--steps`` (the figure reported as `training`), then evaluates on held-out identities' clips against
the exact ground truth (`ray_jobs.evaluate`: PSNR, SSIM, pose error, PCK, lip sync, flicker, motion error, NFE and
end-to-end seconds with VAE decode):
copy-the-reference baseline, teacher at 100 NFE (50 Euler steps with CFG), TPO at 30 NFE when TPO
adapters exist (else reported as missing), the K=4 student at 4/2/1 steps (2 and 1 steps jump over
the edges {0, .5, 1} / {0, 1} with the same student), K=1 at 1 step, and each ablation at 4 steps.

Goals (issues 7 and 17): 4-step student within 1 dB PSNR and 0.02 SSIM of the teacher at 100 NFE, pose
error <= 1.2x the teacher's, and >= 15x faster end to end. Nothing here is tuned to pass; figures are
reported as measured.

    python benchmarks/distill.py --teacher outputs/runs/teacher/export --data outputs/shards [--steps 300 --clips 6]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"

# name -> --set overrides of the distillation config (ray_jobs/configs/tiny/distill_lcm.yaml).
STUDENTS: dict[str, dict[str, Any]] = {
    "dancelcm_k4": {},
    "plain_cd_k1": {"objective.segments": 1},
    "no_aux": {"objective.aux": False},
    "no_motion_loss": {"objective.motion_loss": False},
    "no_face": {"objective.face": False},
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="outputs/shards")
    parser.add_argument("--teacher", default="outputs/runs/teacher/export")
    parser.add_argument("--tpo", default="outputs/runs/tpo/export", help="folder holding motion/ and fidelity/ adapters")
    parser.add_argument("--runs", default="outputs/runs/bench_distill")
    parser.add_argument("--vae", default=None, help="VAE folder (default: the checked-in tiny VAE)")
    parser.add_argument("--steps", type=int, default=300, help="distillation optimizer steps per student")
    parser.add_argument("--clips", type=int, default=6, help="held-out clips evaluated")
    parser.add_argument("--students", nargs="*", default=list(STUDENTS))
    parser.add_argument("--teacher-guidance", type=float, default=1.5, help="the pretrained teacher's measured best")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args(argv)


def train_students(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Distil each student (resumes when the run exists); returns per student its export and training time."""
    from core.config import load_config
    from ray_jobs.distill_lcm import DistillConfig, run

    trained = {}
    for name in args.students:
        overrides = {"data": args.data, "teacher.path": args.teacher, "steps": args.steps,
                     "checkpoint.every_n_steps": args.steps, "run.storage_path": args.runs, "run.name": name,
                     "model.vae_path": args.vae, **STUDENTS[name]}
        cfg = load_config(DistillConfig, "ray_jobs/configs/tiny/distill_lcm.yaml", overrides)
        start = time.perf_counter()
        result = run(cfg)
        trained[name] = {"export": str(Path(args.runs) / name / "export"), "steps": cfg.steps,
                         "batch_per_step": cfg.batch_size * cfg.scaling.num_workers,
                         "train_seconds": time.perf_counter() - start, "final_metrics": _plain(result.metrics)}
    return trained


def _plain(metrics: dict) -> dict:
    return {k: float(v) if isinstance(v, (int, float, np.generic)) else str(v) for k, v in metrics.items()}


def _tpo_variant(args: argparse.Namespace):
    """TPO with the motion/fidelity experts as its export's card samples it (30 NFE), or None when it does not exist."""
    from artifacts.exports import load_export
    from core.storage import Storage
    from ray_jobs.evaluate import Variant

    if not all((Path(args.tpo) / name / "pytorch_lora_weights.safetensors").is_file() for name in ("motion", "fidelity")):
        return None
    tpo = load_export(args.tpo, Storage(), base_model=args.teacher)  # base given: exports before cards lack it
    return Variant(f"tpo_{tpo.sampler.nfe}nfe", tpo.model, tpo.sampler, tpo.adapter_switch)


def build_variants(args: argparse.Namespace, trained: dict[str, dict]) -> tuple[list, list[str]]:
    """Evaluation rows (baseline, teacher, TPO, students) and notes on anything missing."""
    from artifacts.exports import load_export
    from core.storage import Storage
    from ray_jobs.evaluate import Variant

    teacher = load_export(args.teacher, Storage())
    spec = teacher.sampler.model_copy(update={"steps": 50, "guidance": args.teacher_guidance})
    variants = [Variant.copy_reference(), Variant.round_trip(), Variant("teacher_100nfe", teacher.model, spec)]
    notes = []
    tpo = _tpo_variant(args)
    if tpo is None:
        notes.append(f"TPO adapters not found under {args.tpo}: TPO row omitted")
    else:
        variants.append(tpo)
    for name, info in trained.items():
        student = load_export(info["export"], Storage())
        if name == "dancelcm_k4":
            for steps in (4, 2, 1):
                variants.append(Variant(f"student_{steps}step", student.model, student.sampler.consistency_at(steps)))
        else:
            variants.append(Variant(f"{name}_{student.sampler.nfe}step", student.model, student.sampler))
    return variants, notes


def goals(table: list[dict]) -> list[dict]:
    """The issue's goals from the summary rows (missing rows -> goal not met, value NaN)."""
    rows = {r["variant"]: r for r in table}
    teacher, student = rows.get("teacher_100nfe"), rows.get("student_4step")
    nan = float("nan")
    psnr_gap = teacher["psnr"] - student["psnr"] if teacher and student else nan
    ssim_gap = teacher["ssim"] - student["ssim"] if teacher and student else nan
    speedup = teacher["seconds"] / student["seconds"] if teacher and student else nan
    pose_ratio = student["pose_error"] / teacher["pose_error"] if teacher and student else nan
    return [
        {"name": "4-step student pose error / teacher@100NFE's", "value": pose_ratio, "target": 1.2,
         "unit": "ratio (<=)", "met": bool(pose_ratio <= 1.2)},
        {"name": "4-step student PSNR gap to teacher@100NFE", "value": psnr_gap, "target": 1.0, "unit": "dB (<=)",
         "met": bool(psnr_gap <= 1.0)},
        {"name": "4-step student SSIM gap to teacher@100NFE", "value": ssim_gap, "target": 0.02, "unit": "SSIM (<=)",
         "met": bool(ssim_gap <= 0.02)},
        {"name": "end-to-end speed-up of 4-step student over teacher@100NFE", "value": speedup, "target": 15.0,
         "unit": "x (>=)", "met": bool(speedup >= 15.0)},
    ]


def plot_quality_vs_nfe(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in zip(("psnr", "ssim"), axes):
        for row in table:
            ax.scatter(max(row["nfe"], 0.5), row[metric])
            ax.annotate(row["variant"], (max(row["nfe"], 0.5), row[metric]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (log; 0-NFE references drawn at 0.5)")
        ax.set_ylabel(metric.upper())
    fig.suptitle("DanceLCM: quality vs NFE on held-out clips")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from core.storage import Storage
    from model.vae import load_vae
    from ray_jobs.common import RayConfig, init_ray
    from ray_jobs.evaluate import evaluate, heldout_clips, summarize, write_grid

    logging.basicConfig(level=logging.INFO)
    args = _parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    init_ray(RayConfig())
    trained = train_students(args)
    variants, notes = build_variants(args, trained)
    storage = Storage()
    clips = heldout_clips(args.data, storage, args.clips)
    # Timed generation runs with Ray gone: idle Train workers and controllers left from distillation
    # competed for the 2 cores (teacher per-clip times ranged 3.5-5.5 s in one run).
    import ray

    ray.shutdown()
    evaluation = evaluate(variants, clips, load_vae(args.vae), storage)
    table = summarize(evaluation["rows"])
    grid_columns = [n for n in evaluation["frames"] if n in ("teacher_100nfe", "student_4step") or n.startswith("tpo_")]
    write_grid(evaluation["frames"], evaluation["truth"], out / "distill_grid.mp4", fps=16.0, columns=grid_columns)
    plot_quality_vs_nfe(table, out / "distill_quality_vs_nfe.png")
    report = {"goals": goals(table), "summary": table, "rows": evaluation["rows"], "training": trained,
              "notes": notes + [f"grid columns: ground truth, {', '.join(grid_columns)}",
                                f"each student distilled for {args.steps} steps on 2 CPU workers (see training)"],
              "clips": len(clips), "args": vars(args)}
    (out / "distill.json").write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report["goals"], indent=2, default=float))
    return report


if __name__ == "__main__":
    main()
