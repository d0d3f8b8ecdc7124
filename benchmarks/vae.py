"""Tiny VAE reconstruction on held-out synthetic identities against the issue's 30 dB target.

Baselines measured in the same run: for quality, the same architecture unfitted (fresh init, same
seed); for speed, the same fitted VAE through diffusers' per-frame causal loop
(`framewise_fast_path=False`) against the frame-wise fast path (model/vae.py). Writes
benchmarks/results/vae.json.

    python benchmarks/vae.py [--frames 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from model.vae import TINY_VAE_PATH, VAEConfig, VideoVAE, load_vae
from ray_jobs.fit_vae import FitVAEConfig, build_tiny_vae, FACE_MARGIN, render_identity_frames
from model.face import crop_faces
from model.metrics import psnr
from ray_jobs.fit_vae import _identities as fit_identities

RESULTS = Path(__file__).parent / "results" / "vae.json"


def heldout_pixels(num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames (1, T, 64, 64, 3) and face crops (1, T, 32, 32, 3) of every held-out identity, rendered fresh."""
    frames, faces = [], []
    for index, identity in enumerate(fit_identities(FitVAEConfig())["heldout"]):
        clip, boxes = render_identity_frames(identity, num_frames, np.random.default_rng(100 + index), size=64)
        frames.append(clip)
        faces.append(crop_faces(clip, boxes, 32, FACE_MARGIN))
    return torch.from_numpy(np.concatenate(frames))[None], torch.from_numpy(np.concatenate(faces))[None]


def measure(vae: VideoVAE, pixels: torch.Tensor) -> float:
    recon = vae.decode(vae.encode(pixels))
    return float(psnr(pixels.permute(0, 4, 1, 2, 3).float() / 255, (recon + 1) / 2))


def timed_ms(fn, repeats: int = 5) -> float:
    """Median wall milliseconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def speed_figures(frames: torch.Tensor) -> dict[str, float]:
    """Encode and decode milliseconds of one 16-frame 64x64 clip, fast path vs diffusers' causal loop."""
    clip = frames[:, :16]
    figures = {}
    for name, vae in (("fast", load_vae()), ("causal_loop", load_vae(config=VAEConfig(framewise_fast_path=False)))):
        latents = vae.encode(clip)
        figures[f"encode_ms_16x64x64_{name}"] = timed_ms(lambda: vae.encode(clip))
        figures[f"decode_ms_16x64x64_{name}"] = timed_ms(lambda: vae.decode(latents))
    for stage in ("encode", "decode"):
        figures[f"{stage}_speedup"] = figures[f"{stage}_ms_16x64x64_causal_loop"] / figures[f"{stage}_ms_16x64x64_fast"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=16, help="frames per held-out identity")
    args = parser.parse_args()
    torch.set_num_threads(2)
    frames, faces = heldout_pixels(args.frames)
    fitted = load_vae()
    baseline = VideoVAE(build_tiny_vae(FitVAEConfig().arch, seed=0).eval())
    figures = {"fitted_frames_db": measure(fitted, frames), "fitted_faces_db": measure(fitted, faces),
               "unfitted_frames_db": measure(baseline, frames), "unfitted_faces_db": measure(baseline, faces),
               **speed_figures(frames), "heldout_frames": int(frames.shape[1]),
               "fit_report": json.loads((TINY_VAE_PATH / "FIT_REPORT.json").read_text())}
    goals = [{"name": f"held-out reconstruction PSNR ({kind})", "value": round(figures[f"fitted_{kind}_db"], 2),
              "target": 30.0, "unit": "dB", "met": figures[f"fitted_{kind}_db"] >= 30.0} for kind in ("frames", "faces")]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"goals": goals, **figures}, indent=2))
    print(json.dumps({"goals": goals, **{k: v for k, v in figures.items() if k != "fit_report"}}, indent=2))


if __name__ == "__main__":
    main()
