"""Drift over long videos: independent chunks vs motion-frame continuation (+ colour correction)
-> benchmarks/results/longform.json and longform.png.

The synthetic world's ground truth is exact at any length, so quality can be followed chunk by chunk.
Clips of ``--seconds`` (10 s = 160 frames at 16 fps) of the demo world's held-out identities (never
trained on) are generated through the serving engine (`serving.engine.AnimationEngine.generate_long`:
the same conditions, chunking and sampler a served request gets) three ways, same seeds:

* ``independent``: chunks of the trained clip length, no prefix (the baseline: what a model without
  the path can do);
* ``continuation``: each chunk continues from the previous chunk's last ``motion_frames`` latent frames;
* ``continuation_colour``: the same plus Lab mean/std correction of each chunk toward the reference.

The model: the checked-in tiny teacher fine-tuned to continue (``model.motion_frames=2``,
``objective.motion_prefix_prob``) by `ray_jobs.pretrain_teacher` for ``--fit-seconds`` (900) on its own
pretraining world (``--teacher`` skips the fit and uses a given export). Figures per variant: PSNR /
SSIM against the ground truth per chunk (the new frames each chunk adds) and their slope per chunk;
the seam jump (mean absolute frame difference at the first new frame of each chunk over the mean
inside chunks; the ground truth's own ratio beside it); colour drift (Lab distance of each chunk's mean
colour to the reference's). Goals: the continuation's last-chunk PSNR within 0.5 dB of its first
chunk's, and its seam jump <= 1.2x.

    python benchmarks/longform.py [--seconds 10 --clips 4 --steps 20 --fit-seconds 900 --teacher DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"independent": (0, 0.0), "continuation": (2, 0.0), "continuation_colour": (2, 1.0)}


def fit_teacher(out: Path, seconds: int) -> Path:
    """Fine-tune builtin:tiny_teacher to continue from a prefix (one process, `ray_jobs.pretrain_teacher`)."""
    sets = {"output": str(out), "model.pretrained_path": "builtin:tiny_teacher", "model.motion_frames": 2,
            "objective.motion_prefix_prob": 0.5, "objective.motion_prefix_noise": 0.02, "world.seed": 3,
            "world.num_videos": 256, "batch_size": 16, "optim.lr": 3e-4, "optim.warmup_steps": 50,
            "max_seconds": seconds, "eval.clips": 8, "eval.guidances": "[1.0]"}
    args = [sys.executable, "-m", "ray_jobs.pretrain_teacher", "--config", "ray_jobs/configs/assets/pretrain_teacher.yaml"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    subprocess.run(args, check=True, cwd=REPO)
    return out


def _requests(seconds: float, clips: int):
    """(request, ground-truth frames uint8 (N, 64, 64, 3)) of held-out identities of the demo world."""
    from serving.inputs import AnimationRequest
    from ray_jobs.synthetic import SyntheticConfig, generate_video
    from ray_jobs.synthetic.world import identity_splits

    world = SyntheticConfig(seed=0, num_videos=16, duration=seconds)
    heldout = set(identity_splits(world)["heldout"])
    picked = [i for i in range(64) if f"id{i % world.num_identities:03d}" in heldout][:clips]
    out = []
    for index in picked:
        video = generate_video(world, index)
        keypoints = np.asarray(video.sidecar["keypoints"], np.float32)
        box = np.asarray(video.sidecar["face_boxes"][0], np.float32)
        request = AnimationRequest(video.frames[0], video.audio, keypoints, len(video.frames), world.fps, 0,
                                   seed=100 + index, face_box=box)
        out.append((request, video.frames))
    return out


def _chunk_spans(engine, num_frames: int, motion: int) -> list[tuple[int, int]]:
    from model.motion_frames import plan_chunks, prefix_pixel_frames

    overlap = prefix_pixel_frames(motion, engine.vae.temporal_factor) if motion else 0
    plan = plan_chunks(num_frames, engine.long_form.chunk_frames, overlap)
    return [plan.new_frames(i) for i in range(len(plan.starts))]


def _scores(frames: np.ndarray, truth: np.ndarray, reference: np.ndarray, spans) -> dict:
    """Per-chunk PSNR/SSIM/colour distance, and the seam jump of one generated video."""
    import cv2

    from model.metrics import psnr, ssim

    lab = lambda x: cv2.cvtColor(x.reshape(-1, x.shape[-2], 3), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(float).mean(0)  # noqa: E731
    ref_colour = lab(reference)
    per_chunk = {"psnr": [], "ssim": [], "colour": []}
    for first, stop in spans:
        per_chunk["psnr"].append(psnr(frames[first:stop], truth[first:stop]))
        per_chunk["ssim"].append(ssim(frames[first:stop], truth[first:stop]))
        per_chunk["colour"].append(float(np.linalg.norm(lab(frames[first:stop]) - ref_colour)))
    seams = [first for first, _ in spans[1:]]
    return {**per_chunk, "seam_jump": _seam_jump(frames, seams), "truth_seam_jump": _seam_jump(truth, seams)}


def _seam_jump(video: np.ndarray, seams: list[int]) -> float:
    """Mean |f_t - f_t-1| at the seams over the mean at every other frame."""
    diffs = np.abs(np.diff(video.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # diffs[t-1] = |f_t - f_t-1|
    at = np.zeros(len(diffs), bool)
    at[[s - 1 for s in seams]] = True
    inside = diffs[~at].mean()
    return float(diffs[at].mean() / inside) if inside > 0 else float("nan")  # a still video has no seams


def _run_variants(teacher: Path, seconds: float, clips: int, steps: int) -> dict:
    import torch

    from core.storage import Storage
    from model.generate import LongFormConfig
    from serving.config import ServeAppConfig, resolve_served
    from serving.engine import AnimationEngine

    torch.set_num_threads(2)
    cfg = ServeAppConfig(export=str(teacher), face={"detector": "haar"})
    engine = AnimationEngine(cfg, resolve_served(cfg, Storage()))
    results, videos = {}, {}
    for name, (motion, colour) in VARIANTS.items():
        engine.long_form = LongFormConfig(chunk_frames=engine.long_form.chunk_frames, motion_frames=motion,
                                          colour_correction=colour)
        start, rows = time.perf_counter(), []
        for request, truth in _requests(seconds, clips):
            request = type(request)(**{**request.__dict__, "steps": steps})
            frames = engine.generate_long(request).frames
            assert frames.shape == truth.shape, (frames.shape, truth.shape)
            spans = _chunk_spans(engine, len(truth), motion)
            rows.append(_scores(frames, truth, truth[0], spans))
            videos.setdefault("truth", truth)
            videos.setdefault(name, frames)
        results[name] = _summary(rows, time.perf_counter() - start)
        results[name]["chunk_spans"] = spans
    results.update(_baselines(engine, seconds, clips, results["continuation"]["chunk_spans"]))
    return {"variants": results, "first_videos": videos, "chunk_frames": engine.long_form.chunk_frames,
            "fps": _requests(seconds, 1)[0][0].fps}


def _baselines(engine, seconds: float, clips: int, spans) -> dict:
    """Copy-the-reference (the first frame held) and the VAE round trip of the truth, scored on the same
    chunk spans as the continuation: the floor and the ceiling beside the variants."""
    from model.vae import video_to_uint8

    rows = {"copy_reference": [], "vae_round_trip": []}
    for _, truth in _requests(seconds, clips):
        copy = np.repeat(truth[:1], len(truth), axis=0)
        round_trip = video_to_uint8(engine.vae.decode(engine.vae.encode(truth[None]))).numpy()[0]
        rows["copy_reference"].append(_scores(copy, truth, truth[0], spans))
        rows["vae_round_trip"].append(_scores(round_trip, truth, truth[0], spans))
    out = {name: _summary(scored, 0.0) for name, scored in rows.items()}
    for result in out.values():
        result["chunk_spans"] = spans
    return out


def _summary(rows: list[dict], seconds: float) -> dict:
    mean = {k: np.mean([r[k] for r in rows], axis=0).tolist() for k in ("psnr", "ssim", "colour")}
    chunks = np.arange(len(mean["psnr"]))
    return {"per_chunk": mean, "psnr_slope_per_chunk": float(np.polyfit(chunks, mean["psnr"], 1)[0]),
            "ssim_slope_per_chunk": float(np.polyfit(chunks, mean["ssim"], 1)[0]),
            "first_chunk_psnr": mean["psnr"][0], "last_chunk_psnr": mean["psnr"][-1],
            "psnr_drop_first_to_last": mean["psnr"][0] - mean["psnr"][-1],
            "seam_jump": _finite(np.mean([r["seam_jump"] for r in rows])),
            "truth_seam_jump": float(np.mean([r["truth_seam_jump"] for r in rows])),
            "colour_drift_last_chunk": mean["colour"][-1], "seconds": round(seconds, 1)}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _plot(variants: dict, videos: dict, fps: float, path: Path) -> None:
    """PSNR and colour distance per chunk against time (chunk middle), and the first clip's frame-to-frame
    difference over its first 3 s with the continuation's seams marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.5))
    for name in VARIANTS:
        result = variants[name]
        middle = [(a + b) / 2 / fps for a, b in result["chunk_spans"]]
        axes[0].plot(middle, result["per_chunk"]["psnr"], label=name)
        axes[1].plot(middle, result["per_chunk"]["colour"], label=name)
    shown = int(3 * fps)
    for name, frames in videos.items():
        diffs = np.abs(np.diff(frames[:shown].astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
        axes[2].plot(np.arange(1, shown), diffs, label=name, color="k" if name == "truth" else None)
    for first, _ in variants["continuation"]["chunk_spans"][1:]:
        if first < shown:
            axes[2].axvline(first, color="grey", lw=0.5, ls=":")
    floor, ceiling = (np.mean(variants[k]["per_chunk"]["psnr"]) for k in ("copy_reference", "vae_round_trip"))
    axes[0].set(xlabel="time (s)", ylabel="PSNR vs truth (dB)",
                title=f"quality per chunk (copy {floor:.1f}, VAE {ceiling:.1f} dB)")
    axes[1].set(xlabel="time (s)", ylabel="Lab distance to reference", title="colour drift (per chunk)")
    axes[2].set(xlabel="frame", ylabel="mean |f_t - f_t-1|", title="frame difference, clip 1 (seams dotted)")
    axes[0].legend()
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fit-seconds", type=int, default=900)
    parser.add_argument("--teacher", type=Path, default=None, help="an export with motion_frames (skips the fit)")
    args = parser.parse_args(argv)
    fit_start = time.perf_counter()
    teacher = args.teacher or fit_teacher(REPO / "outputs" / "longform" / "teacher", args.fit_seconds)
    fit_seconds = None if args.teacher else round(time.perf_counter() - fit_start, 1)
    run = _run_variants(teacher, args.seconds, args.clips, args.steps)
    variants, cont = run["variants"], run["variants"]["continuation"]
    result = {
        "goals": [
            {"name": "continuation_last_vs_first_chunk_psnr_drop", "value": round(cont["psnr_drop_first_to_last"], 3),
             "target": 0.5, "unit": "dB", "met": cont["psnr_drop_first_to_last"] <= 0.5},
            {"name": "continuation_seam_jump", "value": round(cont["seam_jump"], 3), "target": 1.2, "unit": "x",
             "met": cont["seam_jump"] <= 1.2},
        ],
        "variants": variants,
        "setup": {"seconds": args.seconds, "clips": args.clips, "steps": args.steps, "teacher": str(teacher),
                  "chunk_frames": run["chunk_frames"], "fit_seconds": fit_seconds,
                  "teacher_fit": _fit_summary(teacher),
                  "world": "demo world (seed 0), held-out identities", "sampler": "the teacher card's, at --steps"},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "longform.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(variants, run["first_videos"], run["fps"], RESULTS / "longform.png")
    _save_strip(run["first_videos"], RESULTS / "longform_frames.png")
    print(json.dumps(result["goals"], indent=2))
    return result


def _fit_summary(teacher: Path) -> dict | None:
    """Steps, seconds and held-out figures of the teacher's fit (its FIT_REPORT.json), when it has one."""
    report = teacher / "FIT_REPORT.json"
    if not report.exists():
        return None
    data = json.loads(report.read_text())
    return {key: data.get(key) for key in ("steps", "train_seconds", "demo_heldout")}


def _save_strip(videos: dict, path: Path) -> None:
    """Rows truth, then one per variant: every 16th frame of the first clip (for looking at)."""
    from PIL import Image

    rows = [np.concatenate(list(frames[::16]), axis=1) for frames in videos.values()]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


if __name__ == "__main__":
    main()
