"""The pipeline's last three steps: evaluate teacher / TPO / student, ask the served student once, write the report.

Kept apart from `ray_jobs.pipeline` (the stage driver) because it loads every trained artifact.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.storage import Storage

__all__ = ["evaluate_pipeline", "request_served_student", "write_pipeline_report", "build_variants"]

log = logging.getLogger(__name__)


def _export(configs: dict, stage: str, storage: Storage) -> str:
    cfg = configs[stage]
    return storage.join(cfg.run.storage_path, cfg.run.name, "export")


def build_variants(cfg, configs: dict, storage: Storage) -> list:
    """copy-the-reference, teacher at its card's sampler and at 30 NFE, TPO (its card: 30 NFE), student at each step count.

    Every model is loaded from its export folder and sampled as its model card says; only the step
    counts the report compares are set here.
    """
    from artifacts.exports import load_export
    from ray_jobs.evaluate import Variant

    ev = cfg.evaluation
    teacher = load_export(_export(configs, "teacher", storage), storage)
    spec = teacher.sampler.model_copy(update={"guidance": ev.teacher_guidance}) if ev.teacher_guidance is not None else teacher.sampler
    variants = [Variant.copy_reference("copy reference"), Variant.round_trip("VAE round trip"),
                Variant(f"teacher {spec.with_steps(ev.teacher_steps).nfe} NFE", teacher.model, spec.with_steps(ev.teacher_steps)),
                Variant(f"teacher {spec.with_steps(15).nfe} NFE", teacher.model, spec.with_steps(15))]
    if "tpo" in configs:
        tpo = load_export(_export(configs, "tpo", storage), storage)
        variants.append(Variant(f"TPO {tpo.sampler.nfe} NFE", tpo.model, tpo.sampler, tpo.adapter_switch))
    if "distill" in configs:
        student = load_export(_export(configs, "distill", storage), storage)
        for steps in ev.student_steps:
            variants.append(Variant(f"student {steps} step", student.model, student.sampler.consistency_at(steps)))
    return variants


def evaluate_pipeline(cfg, configs: dict, storage: Storage) -> dict[str, Any]:
    """Metrics table + clip frames on held-out clips; saves table JSON and grid MP4 into the report dir.

    metrics.json: ``table`` (copy reference, VAE round trip, then each model; columns as
    `ray_jobs.evaluate`: pose error, PCK, mouth sync, flicker beside PSNR/SSIM/motion error, NFE,
    seconds), ``ground_truth`` (the perception model on the exact frames: its own error) and ``rows`` per clip.
    """
    from artifacts.models import load_vae
    from ray_jobs.evaluate import GROUND_TRUTH, evaluate, heldout_clips, summarize, warm_up, write_grid

    torch.manual_seed(0)
    report = Path(cfg.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    clips = heldout_clips(configs["teacher"].data, storage, cfg.evaluation.num_clips)
    variants = build_variants(cfg, configs, storage)
    vae = load_vae(configs["teacher"].model.vae_path, storage)
    for variant in variants:  # one untimed generation per model so no row pays lazy initialisation
        warm_up(variant, clips[0], vae)
    result = evaluate(variants, clips, vae, storage)
    summary = summarize(result["rows"])
    detector = [row for row in summary if row["variant"] == GROUND_TRUTH]  # the detector's own error
    table = [row for row in summary if row["variant"] != GROUND_TRUTH]
    (report / "metrics.json").write_text(json.dumps({"table": table, "ground_truth": detector, "rows": result["rows"]},
                                                    indent=2, default=float))
    shown = [v.name for v in variants if v.model is not None]  # the grid shows models, not references
    write_grid(result["frames"], result["truth"], report / "grid.mp4", float(clips[0].get("fps", 16)), shown)
    (report / "grid_columns.json").write_text(json.dumps(["ground truth", *shown]))
    return {"table": table}


def request_served_student(cfg, configs: dict, storage: Storage) -> dict[str, Any]:
    """Start the Serve app on the student export, POST one animation over HTTP, save the MP4."""
    from ray import serve

    from core.media import probe
    from ray_jobs.evaluate import heldout_clips
    from serving.app import build_app

    report = Path(cfg.report_dir)
    student = _export(configs, "distill", storage)
    args = {"export": student, "output": str(report / "serve_outputs"),
            "storage": cfg.storage.model_dump(mode="json"), "animator": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5,
                                                                       "initial_replicas": 1}}
    port = 8000 + uuid.uuid4().int % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="pipeline-student", route_prefix="/", blocking=False)
    try:
        clip = heldout_clips(configs["teacher"].data, storage, 1)[0]
        body, seconds = _post_animation(port, clip)
        out = report / "served_student.mp4"
        out.write_bytes(body)
        info = probe(out)
    finally:
        serve.delete("pipeline-student")
        serve.shutdown()
    return {"seconds": seconds, "frames": info.num_frames, "has_audio": info.has_audio, "path": str(out)}


def _post_animation(port: int, clip: dict) -> tuple[bytes, float]:
    """multipart/form-data POST of the clip's reference frame, audio, keypoints and reference face box (as
    preprocessing found it); returns (MP4 bytes, seconds)."""
    import cv2

    from core.media import mux_mp4

    ok, png = cv2.imencode(".png", np.asarray(clip["ref_frame"])[:, :, ::-1])
    audio_mp4 = mux_mp4(np.repeat(np.asarray(clip["ref_frame"])[None], 8, axis=0),
                        np.asarray(clip["audio"], dtype=np.float32), 16.0)
    boundary = uuid.uuid4().hex
    keypoints = json.dumps(np.asarray(clip["keypoints"], dtype=np.float64).round(2).tolist()).encode()
    parts = [("image", "ref.png", "image/png", png.tobytes()), ("audio", "audio.mp4", "video/mp4", audio_mp4),
             ("keypoints", "pose.json", "application/json", keypoints)]
    fields = {"frames": "8", "fps": "16", "mode": "sync", "seed": "0"}
    if bool(clip.get("has_ref_face", False)):
        height, width = np.asarray(clip["ref_frame"]).shape[:2]  # the server rejects boxes outside the image
        box = np.clip(np.asarray(clip["ref_face_box"], dtype=np.float64), 0, [width, height, width, height])
        fields["face_box"] = json.dumps(box.round(2).tolist())
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                    for k, v in fields.items())
    body += b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{n}\"; filename=\"{f}\"\r\n"
                     f"Content-Type: {t}\r\n\r\n".encode() + data + b"\r\n" for n, f, t, data in parts)
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/animations", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    start = time.perf_counter()
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.read(), time.perf_counter() - start
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or time.monotonic() > deadline:
                raise RuntimeError(f"served student answered {exc.code}: {exc.read()[:300]!r}") from exc
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
        time.sleep(2)


_TABLE_NOTES = [
    "Held-out identities; ground truth re-rendered exactly from the sidecars; e2e seconds include VAE decode.",
    "Pose error (mean px) and PCK (share of keypoints within 5 % of the frame height): keypoints detected on the "
    "generated frames by the puppet perception model (model/assets/puppet_perception) against the exact ones.",
    "Mouth sync r: Pearson r of the detected mouth openness against the true track (0 = a still mouth).",
    "Flicker: mean frame-to-frame luma change inside pixels that are static in the truth (0 = steady background).",
    "ground_truth = the detector run on the exact frames: its own error; a row close to it is as good as this "
    "detector can tell.",
    "Copy reference = every frame is the reference frame: a model must beat it clearly on PSNR and pose error.",
    "VAE round trip = the clip's own latents decoded: the ceiling of any model generating in this latent space.",
]


def write_pipeline_report(cfg, configs: dict, storage: Storage, stages: list[dict], results: dict) -> Path:
    """report.md / report.html with the table, quality-vs-NFE and loss-curve PNGs and the video grid."""
    from ray_jobs.report import plot_loss_curves, plot_quality_vs_nfe, write_report

    report = Path(cfg.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    metrics = report / "metrics.json"
    saved = json.loads(metrics.read_text()) if metrics.exists() else {}
    table = saved.get("ground_truth", []) + saved.get("table", [])  # the held-out table leads the report
    images, videos, notes = {}, {}, []
    if table:
        images["quality vs NFE"] = plot_quality_vs_nfe(table, report / "quality_vs_nfe.png").name
    curves = {}
    for stage in ("teacher", "tpo", "distill"):
        if stage in configs:
            uri = storage.join(configs[stage].run.storage_path, configs[stage].run.name, "metrics.jsonl")
            if storage.exists(uri):
                curves[configs[stage].run.name] = [json.loads(ln) for ln in storage.read_text(uri).splitlines()]
    if curves:
        images["training loss"] = plot_loss_curves(curves, report / "loss_curves.png").name
    if (report / "grid.mp4").exists():
        columns = json.loads((report / "grid_columns.json").read_text())
        videos["grid: " + " | ".join(columns)] = "grid.mp4"
    if (report / "served_student.mp4").exists():
        videos["served student (HTTP response)"] = "served_student.mp4"
    notes += _TABLE_NOTES
    write_report(report, "Human-animation pipeline report", table, stages, images, videos, notes)
    return report / "report.md"
