"""Benchmark of the Haar face track at the wan-1.3b preset geometry -> benchmarks/results/face_track.json.

Videos without sidecar face boxes get their face track from OpenCV's Haar cascade
(`stages.detect_faces_haar`). Measured on one core (cv2 single-threaded, as in a one-CPU Ray task)
over 81-frame 480x832 clips of a Haar-detectable synthetic face (`ray_jobs.synthetic.faces`) with
exact boxes, in two motions: a talking head (large face, slow drift) and a dancer (small face
crossing the frame); and, timed only, the same clutter with no face. Each setting is timed best of `--repeats` on every clip and scored by the IoU
of its interpolated boxes with the truth. The baseline, in the same run, is what the stage did
before tracking: the whole frame searched on every frame.

Goals: the default setting (tracked, every frame) >= 4x faster than the baseline, and its mean
IoU with the truth no more than 0.02 below the baseline's.

    python benchmarks/face_track.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np

from ray_jobs.preprocess import stages
from ray_jobs.synthetic.faces import face_track_clip

RESULTS = Path(__file__).resolve().parent / "results" / "face_track.json"
FRAMES, HEIGHT, WIDTH = 81, 480, 832
MOTIONS = {  # name -> face_track_clip kwargs: side fractions of the short side, centre path
    "talking_head": {"side": (0.4, 0.44), "path": ((0.48, 0.45), (0.53, 0.47))},
    "dancer": {"side": (0.1, 0.11), "path": ((0.2, 0.2), (0.8, 0.3))},
}
NO_FACE = {"face": False}  # the same clutter, no face: timed only (the track is dropped, has_face False)
SETTINGS = {  # name -> detect_faces_haar kwargs; min_found as the face stage passes its default 0.5
    "whole_frame_every_frame (baseline)": {"every": 1, "track_search": 0},
    "tracked_every_frame (default)": {"every": 1, "min_found": 0.5},
    "tracked_every_2": {"every": 2, "min_found": 0.5},
    "tracked_every_4": {"every": 4, "min_found": 0.5},
}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = np.prod(np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None), axis=1)
    return inter / (np.prod(a[:, 2:] - a[:, :2], axis=1) + np.prod(b[:, 2:] - b[:, :2], axis=1) - inter)


def _run_setting(frames: np.ndarray, truth: np.ndarray, kwargs: dict, repeats: int) -> dict:
    """Best-of-`repeats` ms per clip, detections found on searched frames, IoU of the filled track."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        boxes, searched = stages.detect_faces_haar(frames, **kwargs)
        times.append(time.perf_counter() - start)
    filled, _ = stages.fill_missing_boxes(boxes)
    found = float(np.isfinite(boxes[searched]).all(axis=1).mean())
    figures = {"ms_per_clip": round(min(times) * 1000, 1), "ms_all": [round(t * 1000, 1) for t in times],
               "searched_frames": int(searched.sum()), "found_fraction": round(found, 3)}
    if np.isfinite(truth).all():
        iou = _iou(filled, truth) if np.isfinite(filled).all() else np.zeros(len(truth))
        figures.update(iou_mean=round(float(iou.mean()), 4), iou_min=round(float(iou.min()), 4))
    return figures


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # one core, as each Ray task has
    figures = {}
    for motion, clip_kwargs in {**MOTIONS, "no_face": NO_FACE}.items():
        frames, truth = face_track_clip(FRAMES, HEIGHT, WIDTH, seed=3, **clip_kwargs)
        figures[motion] = {name: _run_setting(frames, truth, kw, args.repeats) for name, kw in SETTINGS.items()}
    base, default = "whole_frame_every_frame (baseline)", "tracked_every_frame (default)"
    with_face = [figures[m] for m in MOTIONS]
    speedup = sum(f[base]["ms_per_clip"] for f in with_face) / sum(f[default]["ms_per_clip"] for f in with_face)
    iou_drop = max(f[base]["iou_mean"] - f[default]["iou_mean"] for f in with_face)
    result = {
        "goals": [
            {"name": "default face track speed-up over whole-frame search", "value": round(speedup, 2),
             "target": 4.0, "unit": "x", "met": speedup >= 4.0},
            {"name": "default face track mean IoU drop vs whole-frame search (worst motion)",
             "value": round(iou_drop, 4), "target": 0.02, "unit": "IoU", "met": iou_drop <= 0.02},
        ],
        "figures": figures,
        "setup": {"frames": FRAMES, "size": f"{WIDTH}x{HEIGHT}", "motions": MOTIONS, "settings": SETTINGS,
                  "repeats": args.repeats, "cv2_threads": 1, "opencv": cv2.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))
    return result


if __name__ == "__main__":
    main()
