"""The teacher on identities it never saw, beside its baselines -> results/teacher.json.

Data: the demo world (`ray_jobs/configs/tiny/synthetic.yaml`, seed 0) preprocessed under ``--work``
(or ``--data``); its held-out identities are in neither the pretraining world nor the fine-tuning split.
Rows, all from `ray_jobs.evaluate` on the same held-out clips (exact ground truth, the checked-in puppet
perception model for pose error and lip sync):

* ground_truth (the detector's own error), copy_reference, vae_round_trip;
* pretrained: ``builtin:tiny_teacher`` zero-shot at 100 NFE (50 steps, CFG 1.5) and 50 NFE (no CFG);
* finetuned: the demo's recipe (`ray_jobs.train_teacher`, tiny config: fine-tunes the pretrained teacher
  on the demo world's training identities with 2 Ray Train workers) at 100 NFE;
* scratch: the same job, steps and data from random init, at 100 NFE (what the demo trained before).

Goals (issue 17) on the fine-tuned teacher at 100 NFE: PSNR >= copy + 6 dB, SSIM >= copy + 0.15, pose
error <= 0.3x copy's, lip sync r >= 0.5, flicker <= 2x the VAE round trip's, frame-difference error
<= 0.8x copy's. The fine-tune's training samples/s on this machine is recorded too.

    python benchmarks/teacher.py [--data outputs/pipeline/shards] [--steps 120] [--clips 16]
    python benchmarks/teacher.py --data outputs/pipeline/shards --finetuned outputs/pipeline/runs/teacher/export
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _ensure_data(work: Path, data: str | None) -> str:
    """The given shards, or the demo world preprocessed under ``work``."""
    if data:
        if not Path(data, "manifest.json").exists():
            raise SystemExit(f"--data {data}: no manifest.json there (preprocessed shards expected)")
        return data
    from core.config import load_config
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.job import run as preprocess
    from ray_jobs.synthetic.world import SyntheticConfig, run as synthesize

    shards = work / "shards"
    if not (shards / "manifest.json").exists():
        synthesize(load_config(SyntheticConfig, "ray_jobs/configs/tiny/synthetic.yaml",
                               {"out": str(work / "synthetic"), "executor": "local"}))
        preprocess(load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                               {"input": str(work / "synthetic" / "videos"), "output": str(shards)}))
    return str(shards)


def _train(work: Path, data: str, name: str, steps: int, pretrained: str | None) -> dict:
    """The teacher job with the tiny config; returns its export path, wall time and samples/s."""
    from core.config import load_config
    from ray_jobs.train_teacher import TeacherConfig, run as train_teacher

    start = time.perf_counter()
    train_teacher(load_config(TeacherConfig, "ray_jobs/configs/tiny/train_teacher.yaml", {
        "data": data, "steps": steps, "run.storage_path": str(work / "runs"), "run.name": name,
        "checkpoint.every_n_steps": steps, "model.pretrained_path": pretrained}))
    lines = (work / "runs" / name / "metrics.jsonl").read_text().splitlines()
    rates = sorted(json.loads(line)["samples_per_s"] for line in lines if line.strip())
    return {"export": str(work / "runs" / name / "export"), "wall_s": round(time.perf_counter() - start, 1),
            "steps": steps, "median_samples_per_s": rates[len(rates) // 2], "pretrained": pretrained}


def _variants(trained: dict) -> list:
    from artifacts.exports import load_export
    from core.storage import Storage
    from model.presets import ModelConfig
    from model.sampling import SamplerSpec
    from ray_jobs.evaluate import Variant

    def load(path: str):
        return load_export(ModelConfig(pretrained_path=path).pretrained_path, Storage()).model

    full, plain = SamplerSpec(steps=50, guidance=1.5), SamplerSpec(steps=50, guidance=1.0)
    pretrained = load("builtin:tiny_teacher")
    variants = [Variant.copy_reference(), Variant.round_trip(),
                Variant("pretrained_100nfe", pretrained, full),
                Variant("pretrained_50nfe_nocfg", pretrained, plain),
                Variant("finetuned_100nfe", load(trained["finetuned"]["export"]), full)]
    if "scratch" in trained:
        variants.append(Variant("scratch_100nfe", load(trained["scratch"]["export"]), full))
    return variants


def goals(rows: dict[str, dict]) -> list[dict]:
    """Issue 17's teacher goals on ``finetuned_100nfe`` against the baselines of the same run."""
    teacher, copy, vae = rows["finetuned_100nfe"], rows["copy_reference"], rows["vae_round_trip"]
    checks = [("PSNR over copy-the-reference", teacher["psnr"] - copy["psnr"], 6.0, "dB (>=)", True),
              ("SSIM over copy-the-reference", teacher["ssim"] - copy["ssim"], 0.15, "SSIM (>=)", True),
              ("pose error / copy's", teacher["pose_error"] / copy["pose_error"], 0.3, "ratio (<=)", False),
              ("lip sync r", teacher["mouth_sync"], 0.5, "Pearson r (>=)", True),
              ("flicker / VAE round trip's", teacher["flicker"] / vae["flicker"], 2.0, "ratio (<=)", False),
              ("frame-difference error / copy's", teacher["motion_error"] / copy["motion_error"], 0.8, "ratio (<=)", False)]
    return [{"name": f"teacher@100NFE {name}", "value": round(float(value), 4), "target": target, "unit": unit,
             "met": bool(value >= target if higher else value <= target)}
            for name, value, target, unit, higher in checks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/bench_teacher")
    parser.add_argument("--data", default=None, help="preprocessed demo-world shards (default: made under --work)")
    parser.add_argument("--steps", type=int, default=120, help="fine-tune (and scratch) steps: the demo's")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--finetuned", default=None, help="evaluate this fine-tuned export (with --data) instead of "
                        "training the fine-tuned and scratch teachers")
    args = parser.parse_args()
    from core.storage import Storage
    from model.vae import load_vae
    from ray_jobs.common import RayConfig, init_ray
    from ray_jobs.evaluate import evaluate, heldout_clips, summarize, write_grid

    work = Path(args.work).resolve()
    if args.finetuned:  # an existing fine-tune (e.g. the demo's teacher export): no training, no Ray
        data, trained = args.data, {"finetuned": {"export": args.finetuned, "note": "given with --finetuned"}}
    else:
        init_ray(RayConfig())
        data = _ensure_data(work, args.data)
        trained = {"finetuned": _train(work, data, "finetuned", args.steps, "builtin:tiny_teacher"),
                   "scratch": _train(work, data, "scratch", args.steps, None)}
    storage = Storage()
    result = evaluate(_variants(trained), heldout_clips(data, storage, args.clips), load_vae(None), storage)
    table = summarize(result["rows"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_grid(result["frames"], result["truth"], RESULTS / "teacher_grid.mp4", 16.0)
    report = {"goals": goals({r["variant"]: r for r in table}), "heldout": table, "training": trained,
              "args": vars(args), "setup": "tiny preset; fine-tune: 2 Ray Train CPU workers (ZeRO-2, batch 2 each); "
                                           "2 shared cores, no GPU; demo world seed 0 held-out identities"}
    (RESULTS / "teacher.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(json.dumps({"goals": report["goals"], "heldout": table}, indent=2, default=float))


if __name__ == "__main__":
    main()
