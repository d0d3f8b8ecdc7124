"""LoRA-TPO benchmark (issue 6) on held-out synthetic identities -> benchmarks/results/tpo.json (+ tpo.png).

Pipeline, end to end with the project's jobs: synthetic world -> preprocess (VAE on) -> teacher
(`--teacher-steps` of the tiny config: fine-tuning the pretrained `builtin:tiny_teacher`, which never
saw this world's seed) -> preference pairs (teacher candidates, gt rewards) -> TPO (`--tpo-steps`) ->
evaluation on every held-out clip of:
  (a) teacher, Euler + CFG, 50 steps = 100 NFE;   (b) teacher, 15 steps = 30 NFE;
  (c) TPO, `default_tpo_plan()` = 30 NFE;          (d) motion adapter alone / fidelity adapter alone (30 NFE).
Per variant: motion reward (gt_motion), fidelity reward (gt_fidelity), PSNR/SSIM vs truth, NFE,
wall time (sampling + VAE decode), and the copy-the-reference baseline. Goals (issue 17): (c) >= (a)
on both rewards, and (c)'s PSNR no more than 0.5 dB below (a)'s.
Premise table (AlignHuman: early steps set motion, late steps set fidelity), on the teacher with the
100-NFE budget's step density: coarse early segment (1 step above σ_b), coarse late segment (1 step
below σ_b), and adapters swapped between segments. Reported whatever it shows; nothing is tuned here.

    python benchmarks/tpo.py [--vae-path PATH] [--teacher-steps 120 --tpo-steps 200 --videos 12]

TPO sweep on the same shards, teacher and pairs (link synthetic/, shards/, runs/teacher and pairs/ into a
second work folder first): `--work outputs/bench_tpo_lr3e-5 --tpo-lr 3e-5 --results-name tpo_lr3e-5`.
Pair-guard ablation on the same shards and teacher (link them into a second work folder first):
    python benchmarks/tpo.py --work outputs/bench_tpo_noguard --other-dimension-tolerance none \
        --results-name tpo_pairs_unguarded --teacher-steps 1000 --tpo-steps 150
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _prepare(work: Path, args) -> dict:
    """Synthesize, preprocess, train the teacher, make pairs, train TPO; return paths and seconds."""
    from core.config import load_config
    from ray_jobs.preferences import PreferencesConfig, run as make_pairs
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.job import run as preprocess
    from ray_jobs.synthetic.world import SyntheticConfig, run as synthesize
    from ray_jobs.train_teacher import TeacherConfig, run as train_teacher
    from ray_jobs.train_tpo import TPOConfig, run as train_tpo

    seconds = {}
    vae = {"vae.path": args.vae_path} if args.vae_path else {}
    common = {"data": str(work / "shards"), "run.storage_path": str(work / "runs"), "model.vae_path": args.vae_path}
    teacher = str(work / "runs" / "teacher" / "export")
    _stage(seconds, "data", work / "shards" / "manifest.json", lambda: (
        synthesize(SyntheticConfig(out=str(work / "synthetic"), num_videos=args.videos, seed=5, duration=2.0,
                                   num_identities=6, heldout_identities=2, executor="local")),
        preprocess(load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                               {"input": str(work / "synthetic" / "videos"), "output": str(work / "shards"), **vae}))))
    _stage(seconds, "teacher_training", Path(teacher) / "config.json", lambda: train_teacher(
        load_config(TeacherConfig, "ray_jobs/configs/tiny/train_teacher.yaml",
                    {**common, "steps": args.teacher_steps, "checkpoint.every_n_steps": min(250, args.teacher_steps),
                     "checkpoint.validate_every_n_steps": min(250, args.teacher_steps)})))
    _stage(seconds, "pairs", work / "pairs" / "manifest.json", lambda: make_pairs(
        load_config(PreferencesConfig, "ray_jobs/configs/tiny/make_preferences.yaml",
                    {"data": str(work / "shards"), "output": str(work / "pairs"),
                     "model.pretrained_path": teacher, "model.vae_path": args.vae_path,
                     "sampling.steps": args.pair_steps, "sampling.num_candidates": args.candidates,
                     **_pair_guard(args.other_dimension_tolerance)})))
    _stage(seconds, "tpo_training", work / "runs" / "tpo" / "export" / "motion", lambda: train_tpo(
        load_config(TPOConfig, "ray_jobs/configs/tiny/train_tpo.yaml",
                    {**common, "data": str(work / "pairs"), "model.pretrained_path": teacher,
                     "steps": args.tpo_steps, "checkpoint.every_n_steps": min(50, args.tpo_steps),
                     **({"optim.lr": args.tpo_lr} if args.tpo_lr is not None else {}),
                     **({"tpo.beta": args.tpo_beta} if args.tpo_beta is not None else {})})))
    return {"teacher": teacher, "tpo": str(work / "runs" / "tpo" / "export"), "seconds": seconds}


def _pair_guard(value: str) -> dict:
    """make_preferences override for `--other-dimension-tolerance` ('config' keeps the tiny config's)."""
    if value == "config":
        return {}
    return {"other_dimension_tolerance": None if value == "none" else float(value)}


def _stage(seconds: dict, name: str, done: Path, fn) -> None:
    """Run one preparation stage unless its output exists (a cut-off run resumes; training resumes by run name)."""
    if done.exists():
        print(f"[bench tpo] {name}: output exists, skipped", flush=True)
        return
    t0 = time.perf_counter()
    fn()
    seconds[name] = time.perf_counter() - t0
    print(f"[bench tpo] {name}: {seconds[name]:.1f} s", flush=True)


def _teacher_curve(work: Path) -> list[dict]:
    """Validation metrics at each teacher checkpoint (one held-out clip), with copy-the-reference on the same clip."""
    run = work / "runs" / "teacher"
    times = {}
    if (run / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        times = {r["step"]: r["time"] - rows[0]["time"] + rows[0]["step_time_s"] for r in rows}
    curve = []
    for folder in sorted((run / "validation").glob("step_*")):
        step = int(folder.name.split("_")[1])
        values = json.loads((folder / "metrics.json").read_text())
        curve.append({"step": step, "train_seconds": times.get(step), **values})
    return curve


def _variants(boundary: float, guidance: float) -> dict:
    """name -> `SamplerSpec` (the teacher rows at ``guidance``; the TPO plans at `default_tpo_plan`'s guidance)."""
    from model.samplers import default_tpo_plan
    from model.sampling import SamplerSpec

    def plan(motion_steps, fidelity_steps, motion="motion", fidelity="fidelity"):
        return SamplerSpec(kind="tpo", tpo_plan=default_tpo_plan(boundary, motion_steps, fidelity_steps,
                                                                 motion_adapter=motion, fidelity_adapter=fidelity))

    dense_motion = max(1, round(50 * (1 - boundary)))
    return {
        "a_teacher_100nfe": SamplerSpec(steps=50, guidance=guidance),
        "b_teacher_30nfe": SamplerSpec(steps=15, guidance=guidance),
        "c_tpo_30nfe": plan(5, 10),
        "d_motion_adapter_only": plan(5, 10, fidelity=None),
        "d_fidelity_adapter_only": plan(5, 10, motion=None),
        "premise_teacher_dense": plan(dense_motion, 50 - dense_motion, None, None),
        "premise_coarse_early": plan(1, 50 - dense_motion, None, None),
        "premise_coarse_late": plan(dense_motion, 1, None, None),
        "premise_adapters_swapped": plan(5, 10, motion="fidelity", fidelity="motion"),
    }


def _evaluate(paths: dict, args) -> dict:
    from artifacts.exports import load_export
    from artifacts.models import load_vae
    from artifacts.shards import take_clips
    from core.storage import Storage
    from model.conditions import Conditions
    from model.denoiser import use_adapter
    from model.generate import generate
    from model.metrics import psnr, ssim
    from ray_jobs.preferences.rewards import gt_fidelity, gt_motion

    tpo = load_export(paths["tpo"], Storage())  # the teacher + both experts, from the TPO card
    model = tpo.model
    vae = load_vae(args.vae_path, Storage())
    clips = take_clips(str(Path(args.work) / "shards"), Storage(), split="heldout", limit=args.eval_clips)
    figures = {}
    for name, spec in _variants(args.boundary, args.guidance).items():
        rows = []
        for clip in clips:
            batch = {k: torch.as_tensor(np.asarray(v))[None] for k, v in clip.items() if isinstance(v, np.ndarray)}
            cond = Conditions.from_batch(batch)
            use_adapter(model, None)
            out = generate(model, vae, cond, num_frames=8, spec=spec, adapter_switch=tpo.adapter_switch, seed=0)
            frames = out.frames.numpy()
            rows.append([gt_motion(frames, clip), gt_fidelity(frames, clip), psnr(frames, clip["frames"]),
                         ssim(frames, clip["frames"]), out.nfe, out.seconds])
        figures[name] = dict(zip(["motion_reward", "fidelity_reward", "psnr", "ssim", "nfe", "seconds"],
                                 np.mean(rows, axis=0).tolist()))
    ref = [[gt_motion(np.repeat(c["ref_frame"][None], 8, 0), c), gt_fidelity(np.repeat(c["ref_frame"][None], 8, 0), c)]
           for c in clips]
    figures["copy_reference"] = dict(zip(["motion_reward", "fidelity_reward"], np.mean(ref, axis=0).tolist()))
    return figures


def _plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in figures if "nfe" in figures[n]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("motion_reward", "fidelity_reward")):
        ax.barh(names, [figures[n][key] for n in names])
        ax.set_title(key)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/bench_tpo")
    parser.add_argument("--vae-path", default=None, help="AutoencoderKLWan folder (None = the checked-in tiny VAE)")
    parser.add_argument("--videos", type=int, default=12)
    parser.add_argument("--teacher-steps", type=int, default=120, help="fine-tuning steps from the pretrained teacher")
    parser.add_argument("--tpo-steps", type=int, default=200)
    parser.add_argument("--tpo-lr", type=float, default=None, help="TPO learning rate (None: train_tpo.yaml's)")
    parser.add_argument("--tpo-beta", type=float, default=None, help="DPO beta (None: train_tpo.yaml's)")
    parser.add_argument("--pair-steps", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--eval-clips", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=1.5, help="teacher CFG (1.5: the pretrained teacher's best)")
    parser.add_argument("--boundary", type=float, default=0.875)
    parser.add_argument("--other-dimension-tolerance", default="config",
                        help="pairs' other-dimension guard: 'config' (tiny config's), 'none' (best vs worst), or a number")
    parser.add_argument("--results-name", default="tpo", help="writes results/NAME.json and NAME.png (ablations)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(2)
    work = Path(args.work).resolve()
    args.work = str(work)
    paths = _prepare(work, args)
    figures = _evaluate(paths, args)
    a, c = figures["a_teacher_100nfe"], figures["c_tpo_30nfe"]
    goals = [{"name": f"tpo_30nfe_vs_teacher_100nfe_{k}", "value": c[k] - a[k], "target": 0.0, "unit": "reward delta",
              "met": bool(c[k] >= a[k])} for k in ("motion_reward", "fidelity_reward")]
    goals.append({"name": "tpo_30nfe_psnr_minus_teacher_100nfe", "value": c["psnr"] - a["psnr"], "target": -0.5,
                  "unit": "dB (>=)", "met": bool(c["psnr"] - a["psnr"] >= -0.5)})
    premise = {k: {m: figures[k][m] for m in ("motion_reward", "fidelity_reward")} for k in figures if k.startswith("premise")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.results_name}.json").write_text(json.dumps({"goals": goals, "variants": figures, "premise_table": premise,
                                                  "seconds": paths["seconds"],
                                                  "teacher_curve": _teacher_curve(work), "args": vars(args)}, indent=2))
    _plot(figures, RESULTS / f"{args.results_name}.png")
    print(json.dumps(goals, indent=2))


if __name__ == "__main__":
    main()
