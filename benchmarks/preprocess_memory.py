"""Benchmark of a preprocessing task's memory on long videos -> benchmarks/results/preprocess_memory.json.

At the wan-1.3b preset's geometry (832x480, 81-frame clips, 16 fps; VAE off) one task
(`udfs.process_videos`, shards written) runs in a fresh process on one 720p H.264 + stereo AAC
source (ffmpeg's testsrc2 and a sine, with a sidecar of keypoints and face boxes), 30 s and 60 s
long. Each is run decoded whole (the baseline, `decode_window_mb` larger than the video) and
streamed in windows (the default `decode_window_mb`), in the same run. Figures: the process's
peak RSS (ru_maxrss) and wall time.

Goals: streamed, the 60 s video's peak RSS within 1.15x of the 30 s video's (memory does not
follow the video's length), and streaming costs at most 10% more time than decoding whole.
Also recorded: the longer video under a range of window sizes (`window_sweep`), which is how the
default was chosen.

Needs ~8 GiB of free memory: the baseline, the 60 s video decoded whole, peaks at ~6.6 GiB (and
the 1024 MiB window of the sweep about as high). About 2 minutes on 2 cores.

    python benchmarks/preprocess_memory.py [--durations 30 60] [--windows 32 128 256 512 1024]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "preprocess_memory.json"
GEOMETRY = {"width": 832, "height": 480, "clip_frames": 81, "stride": 81, "fps": 16.0, "latent_spatial_factor": 8}
WHOLE_MB = 1 << 20  # a window larger than any video here: decoded whole


def _make_source(root: Path, seconds: int) -> Path:
    """A 720p 25 fps H.264 + 44.1 kHz stereo AAC file and its sidecar (a still skeleton, a face box)."""
    from core.media import ffmpeg_exe

    video = root / f"src{seconds}.mp4"
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y",
                    "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=25:duration={seconds}",
                    "-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=44100:duration={seconds}",
                    "-ac", "2", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-shortest", str(video)],
                   check=True)
    frames = seconds * 25
    skeleton = [[600 + 10 * (j % 5), 200 + 25 * j, 1.0] for j in range(17)]
    sidecar = {"fps": 25, "width": 1280, "height": 720, "keypoints": [skeleton] * frames,
               "face_boxes": [[580, 150, 700, 290]] * frames}
    video.with_suffix(".json").write_text(json.dumps(sidecar))
    return video


def _task(video: str, out: str, window_mb: float, results) -> None:
    """One task in a fresh process: its peak RSS (MiB), wall time and clips written."""
    import numpy as np

    from ray_jobs.preprocess import PreprocessConfig, udfs

    cfg = PreprocessConfig(input=str(Path(video).parent), output=out, vae={"enabled": False},
                           decode_window_mb=window_mb, **GEOMETRY)
    batch = {"source": np.array([video], object), "sidecar": np.array([str(Path(video).with_suffix(".json"))], object),
             "size": np.zeros(1, np.int64), "mtime": np.zeros(1, np.int64)}
    start = time.perf_counter()
    summaries = list(udfs.process_videos(batch, cfg, out))
    seconds = time.perf_counter() - start
    clips = sum(int((s["error_stage"].astype(object) == "").sum()) for s in summaries)
    results.put({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                 "seconds": round(seconds, 2), "clips": clips, "batches": len(summaries)})


def _measure(video: Path, out: Path, window_mb: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_task, args=(str(video), str(out), window_mb, results))
    proc.start()
    figures = results.get()
    proc.join()
    return figures


def main(argv=None) -> dict:
    from ray_jobs.preprocess import PreprocessConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", type=int, nargs=2, default=[30, 60])
    parser.add_argument("--windows", type=float, nargs="*", default=[32, 128, 256, 512, 1024],
                        help="decode_window_mb values tried on the longer video too")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    default_mb = PreprocessConfig.model_fields["decode_window_mb"].default
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        root = Path(tmp)
        for seconds in args.durations:
            video = _make_source(root, seconds)
            figures[f"{seconds}s"] = {
                "whole (baseline)": _measure(video, root / f"whole{seconds}", WHOLE_MB),
                f"windows of {default_mb:g} MiB (default)": _measure(video, root / f"win{seconds}", default_mb)}
        sweep = {f"{mb:g} MiB": _measure(video, root / f"sweep{mb:g}", mb) for mb in args.windows}
    short, long = (figures[f"{s}s"] for s in args.durations)
    window = f"windows of {default_mb:g} MiB (default)"
    growth = long[window]["peak_rss_mib"] / short[window]["peak_rss_mib"]
    slowdown = long[window]["seconds"] / long["whole (baseline)"]["seconds"]
    result = {
        "goals": [
            {"name": f"streamed peak RSS, {args.durations[1]} s video / {args.durations[0]} s video",
             "value": round(growth, 3), "target": 1.15, "unit": "x", "met": growth <= 1.15},
            {"name": f"streamed time / decoded-whole time, {args.durations[1]} s video", "value": round(slowdown, 3),
             "target": 1.1, "unit": "x", "met": slowdown <= 1.1},
        ],
        "figures": figures,
        "window_sweep": {"video": f"{args.durations[1]} s", **sweep},
        "setup": {**GEOMETRY, "source": "1280x720 25 fps H.264 + 44.1 kHz stereo AAC (testsrc2 + sine)",
                  "vae": False, "decode_window_mb": default_mb, "one task per process": True},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
