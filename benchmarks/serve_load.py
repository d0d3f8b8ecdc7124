"""Load test of the Serve app on loopback: latency, throughput, 503s, lost requests, autoscaling, HTTP overhead.

    .venv/bin/python benchmarks/serve_load.py [--requests 40] [--concurrency 6] [--time-limit 420]

Bounded in count (``--requests``) and time (``--time-limit``); talks to 127.0.0.1 only. Phases:
1. overhead: the same request (tiny preset, 8 frames, 4 steps) run ``--repeats`` times in-process
   through `AnimationEngine` (decode inputs + generate + mux: exactly what the replica does) and
   ``--repeats`` times one at a time over HTTP; goal: Serve's added median latency <= 5 %.
2. load: ``--requests`` requests from ``--concurrency`` client threads; a request is *lost* when it
   gets neither a 200 with a decodable MP4 nor a 503 (goal 0).
3. cool-down: replica counts keep being sampled until the app is back at min_replicas (or a cap).
Replica counts (RUNNING Animator replicas) are sampled once a second through `serve.status()`.
Writes benchmarks/results/serve.json: {"goals": [{name, value, target, unit, met}], ...raw figures}.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


def _png() -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:64]
    buf = io.BytesIO()
    Image.fromarray(np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(seconds: float) -> bytes:
    import wave

    samples = (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * 16000)) / 16000) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(16000)
        out.writeframes(samples.tobytes())
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_vae(folder: Path) -> str:
    """A random tiny AutoencoderKLWan (the benchmark measures serving, not pixels)."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, False]).save_pretrained(folder)
    return str(folder)


def _app_args(vae: str, output: str) -> dict:
    return {"model": {"preset": "tiny", "vae_path": vae}, "output": output, "torch_threads": 1,
            "animator": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1.0,
                         "upscale_delay_s": 2.0, "downscale_delay_s": 10.0, "metrics_interval_s": 0.5,
                         "look_back_period_s": 2.0, "max_ongoing_requests": 2, "max_queued_requests": 6,
                         "num_cpus": 0.5, "num_gpus": 0, "max_batch_size": 2}}


class ReplicaSampler(threading.Thread):
    """Samples RUNNING Animator replicas once a second: [(seconds since start, count)]."""

    def __init__(self, app: str) -> None:
        super().__init__(daemon=True)
        self.app, self.samples, self.start_time, self._stop_event = app, [], time.monotonic(), threading.Event()

    def count(self) -> int:
        from ray import serve

        states = serve.status().applications[self.app].deployments["Animator"].replica_states
        return int(states.get("RUNNING", 0))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((round(time.monotonic() - self.start_time, 1), self.count()))
            self._stop_event.wait(1.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _post(url: str, files: dict, data: dict) -> tuple[int, float, bytes]:
    start = time.perf_counter()
    try:
        response = requests.post(f"{url}/v1/animations", files=files, data=data, timeout=300)
    except requests.RequestException:
        return -1, time.perf_counter() - start, b""
    return response.status_code, time.perf_counter() - start, response.content


def _valid_mp4(content: bytes, frames: int) -> bool:
    from core.media import MediaError, probe

    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        tmp.write(content)
        tmp.flush()
        try:
            info = probe(tmp.name)
        except MediaError:
            return False
        return info.has_video and info.num_frames == frames


def measure_overhead(url: str, args_dict: dict, files: dict, data: dict, repeats: int) -> dict:
    """Median in-process vs HTTP latency of the same request, alternating to share machine noise."""
    from serving.config import ServeAppConfig
    from serving.engine import AnimationEngine
    from serving.inputs import decode_audio_bytes, decode_image

    cfg = ServeAppConfig.model_validate(args_dict)
    engine = AnimationEngine(cfg)
    engine.warmup()

    def in_process() -> float:
        start = time.perf_counter()
        ref = decode_image(files["image"][1], "image", engine.height, engine.width, cfg.limits.max_image_pixels)
        wave = decode_audio_bytes(files["audio"][1], "audio", 16000, cfg.limits.max_duration_s)
        from serving.inputs import AnimationRequest

        engine.animate(AnimationRequest(ref, wave, None, int(data["frames"]), float(data["fps"]), int(data["steps"]), 0))
        return time.perf_counter() - start

    local, http = [], []
    _post(url, files, data)  # warm the HTTP path
    for _ in range(repeats):
        local.append(in_process())
        code, seconds, _ = _post(url, files, data)
        if code == 200:
            http.append(seconds)
    med_local, med_http = statistics.median(local), statistics.median(http)
    return {"in_process_s": local, "http_s": http, "in_process_median_s": med_local, "http_median_s": med_http,
            "added_fraction": (med_http - med_local) / med_local}


def run_load(url: str, files: dict, data: dict, count: int, concurrency: int, deadline: float) -> dict:
    """`count` requests from `concurrency` threads, stopping new ones at `deadline`."""
    results: list[tuple[int, float, bool]] = []
    start = time.perf_counter()

    def one(seed: int):
        if time.monotonic() > deadline:
            return None
        code, seconds, content = _post(url, files, {**data, "seed": seed})
        return code, seconds, code == 200 and _valid_mp4(content, int(data["frames"]))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(one, range(count)) if r is not None]
    wall = time.perf_counter() - start
    ok = [s for code, s, valid in results if code == 200 and valid]
    lost = sum(1 for code, _, valid in results if not (code == 503 or (code == 200 and valid)))
    return {"sent": len(results), "ok": len(ok), "rejected_503": sum(1 for c, _, _ in results if c == 503),
            "lost": lost, "wall_s": wall, "throughput_rps": len(ok) / wall,
            "p50_s": float(np.percentile(ok, 50)) if ok else None, "p99_s": float(np.percentile(ok, 99)) if ok else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--time-limit", type=float, default=420.0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    import ray
    from ray import serve

    from serving.app import build_app

    deadline = time.monotonic() + args.time_limit
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    app_args = _app_args(_tiny_vae(work / "vae"), str(work / "out"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    files = {"image": ("ref.png", _png(), "image/png"), "audio": ("a.wav", _wav(0.5), "audio/wav")}
    data = {"frames": "8", "fps": "16", "steps": "4"}
    try:
        overhead = measure_overhead(url, app_args, files, data, args.repeats)
        sampler = ReplicaSampler("bench")
        sampler.start()
        load = run_load(url, files, data, args.requests, args.concurrency, deadline)
        cooldown_end = min(deadline, time.monotonic() + 60)
        while time.monotonic() < cooldown_end and sampler.count() > 1:
            time.sleep(1.0)
        time.sleep(1.5)
        sampler.stop()
    finally:
        serve.shutdown()
        ray.shutdown()
    counts = [n for _, n in sampler.samples]
    floor = app_args["animator"]["min_replicas"]
    scaled_up = bool(counts) and max(counts) > counts[0]
    # Back down means back at min_replicas with replicas RUNNING; 0 would be replicas killed, not scaled.
    scaled_down = scaled_up and counts[-1] == floor
    goals = [
        {"name": "lost_requests", "value": load["lost"], "target": 0, "unit": "requests", "met": load["lost"] == 0},
        {"name": "serve_http_added_latency", "value": round(overhead["added_fraction"] * 100, 2), "target": 5.0,
         "unit": "% of in-process median", "met": overhead["added_fraction"] <= 0.05},
        {"name": "scales_up_under_load", "value": max(counts) if counts else 0, "target": 2, "unit": "replicas",
         "met": scaled_up},
        {"name": "scales_back_down", "value": counts[-1] if counts else 0, "target": floor, "unit": "replicas",
         "met": scaled_down},
    ]
    result = {"goals": goals, "load": load, "overhead": overhead, "replicas_over_time": sampler.samples,
              "config": {"requests": args.requests, "concurrency": args.concurrency, "frames": 8, "steps": 4,
                         "animator": app_args["animator"]}, "machine": "2 shared CPU cores, no GPU"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"goals": goals, "load": load, "overhead_pct": goals[1]["value"]}, indent=2))


if __name__ == "__main__":
    main()
