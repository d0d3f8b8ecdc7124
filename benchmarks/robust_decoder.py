"""A decoder made robust to small latent errors vs the checked-in one -> results/robust_decoder.json.

Issue 17: the tiny VAE decoder turns a generator's small latent errors into frame-to-frame flicker.
`ray_jobs.fit_vae` with ``decoder_only`` + ``decoder_latent_noise`` (config
`ray_jobs/configs/assets/fit_vae_robust.yaml`) fine-tunes the decoder on noised latents with the encoder
frozen, so the shards' latents, the teacher and the student stay valid. Here the same latents (same
models, seeds and held-out clips) are decoded by both decoders and scored by `ray_jobs.evaluate`:
copy-the-reference, the VAE round trip (clean latents), the teacher at 30 NFE and the student at 4 steps.

Goals: the student's flicker with the robust decoder <= 0.8x the original's (it cuts flicker), while the
round trip loses <= 0.5 dB PSNR and the student's PSNR does not drop. Adopt only if all hold.

    python benchmarks/robust_decoder.py --robust outputs/robust_vae [--data outputs/pipeline/shards]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _variants(args: argparse.Namespace) -> list:
    from artifacts.exports import load_export
    from core.storage import Storage
    from ray_jobs.evaluate import Variant

    teacher = load_export(args.teacher, Storage())
    student = load_export(args.student, Storage())
    return [Variant.copy_reference(), Variant.round_trip(),
            Variant("teacher_30nfe", teacher.model, teacher.sampler.with_steps(15)),
            Variant("student_4step", student.model, student.sampler)]


def _table(args: argparse.Namespace, vae_path: str | None) -> list[dict]:
    from core.storage import Storage
    from model.vae import load_vae
    from ray_jobs.evaluate import evaluate, heldout_clips, summarize

    clips = heldout_clips(args.data, Storage(), args.clips)
    result = evaluate(_variants(args), clips, load_vae(vae_path), Storage(), keep_frames=False)
    return summarize(result["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--robust", default="outputs/robust_vae", help="the fine-tuned VAE folder")
    parser.add_argument("--data", default="outputs/pipeline/shards")
    parser.add_argument("--teacher", default="outputs/pipeline/runs/teacher/export")
    parser.add_argument("--student", default="outputs/pipeline/runs/student/export")
    parser.add_argument("--clips", type=int, default=6)
    args = parser.parse_args()
    tables = {"original": _table(args, None), "robust": _table(args, args.robust)}
    row = {name: {r["variant"]: r for r in rows} for name, rows in tables.items()}
    student_flicker = row["robust"]["student_4step"]["flicker"] / row["original"]["student_4step"]["flicker"]
    round_trip_drop = row["original"]["vae_round_trip"]["psnr"] - row["robust"]["vae_round_trip"]["psnr"]
    student_gain = row["robust"]["student_4step"]["psnr"] - row["original"]["student_4step"]["psnr"]
    goals = [{"name": "student 4-step flicker, robust / original decoder", "value": student_flicker, "target": 0.8,
              "unit": "x (<=)", "met": student_flicker <= 0.8},
             {"name": "VAE round-trip PSNR lost", "value": round_trip_drop, "target": 0.5, "unit": "dB (<=)",
              "met": round_trip_drop <= 0.5},
             {"name": "student 4-step PSNR change", "value": student_gain, "target": 0.0, "unit": "dB (>=)",
              "met": student_gain >= 0.0}]
    report = {"goals": goals, "adopt": all(g["met"] for g in goals), "tables": tables, "args": vars(args),
              "fit_report": json.loads(Path(args.robust, "FIT_REPORT.json").read_text()),
              "date": time.strftime("%Y-%m-%d")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "robust_decoder.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps(goals, indent=2, default=float))


if __name__ == "__main__":
    main()
