"""`python -m ray_jobs.evaluate` end to end on preprocessed shards, and how it picks a model's sampler."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = {"variant", "nfe", "seconds", "psnr", "ssim", "pose_error", "pck", "mouth_sync", "flicker", "motion_error"}


def _random_teacher(folder: Path) -> Path:
    """An untrained tiny denoiser saved as a diffusers folder (what a teacher export looks like)."""
    import torch

    from model.presets import ModelConfig, build_denoiser

    torch.manual_seed(0)
    build_denoiser(ModelConfig()).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_evaluate_cli_writes_metrics_and_grid(tiny_data, tmp_path):
    from core.media import probe

    teacher = _random_teacher(tmp_path / "teacher")
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "ray_jobs.evaluate", "--config", "ray_jobs/configs/tiny/evaluate.yaml",
           "--set", f"model={teacher}", "--set", f"data={tiny_data}", "--set", "limit=2", "--set", "steps=2",
           "--set", f"output={out}", "--set", "threads=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    rows = {row["variant"]: row for row in doc["rows"]}
    assert list(rows) == ["ground_truth", "copy_reference", "vae_round_trip", "teacher"]
    assert all(ROW_KEYS <= set(row) and row["clips"] == 2 for row in rows.values())
    truth, copy, vae, model = rows["ground_truth"], rows["copy_reference"], rows["vae_round_trip"], rows["teacher"]
    assert truth["psnr"] is None and truth["ssim"] == pytest.approx(1.0)  # infinite PSNR is written as null
    assert truth["flicker"] < 1e-3 and truth["motion_error"] == 0.0 and truth["nfe"] == 0
    assert truth["pose_error"] < 2.0 and truth["pck"] > 0.85  # the detector's own error on exact frames
    assert copy["pose_error"] > 1.5 * truth["pose_error"]  # a frozen reference does not follow the pose
    assert vae["pose_error"] < copy["pose_error"] and vae["psnr"] > copy["psnr"]
    assert model["nfe"] == 4 and model["seconds"] > 0  # 2 Euler steps with CFG
    assert model["flicker"] > truth["flicker"]  # an untrained model's frames are noise
    assert len(doc["clips"]) == 4 * 2 and doc["grid_columns"] == ["ground truth", "copy_reference", "teacher"]
    info = probe(out / "grid.mp4")
    assert (info.width, info.height, info.num_frames) == (3 * 64, 2 * 64, 8)


def test_student_folder_gets_the_consistency_sampler(tmp_path):
    from core.storage import Storage
    from ray_jobs.evaluate import EvaluateConfig, model_variant

    student = _random_teacher(tmp_path / "student")
    meta = {"format": "full", "preset": "tiny", "face_injection": True, "edges": [0.0, 0.3, 0.5, 0.75, 1.0]}
    (student / "student.json").write_text(json.dumps(meta))  # a student exported before model cards
    variant = model_variant(EvaluateConfig(model=str(student)), Storage())
    assert variant.spec.kind == "consistency" and variant.name == "student"
    assert variant.spec.consistency_edges().tolist() == pytest.approx(meta["edges"])
    two = model_variant(EvaluateConfig(model=str(student), steps=2), Storage())
    assert two.spec.consistency_edges().tolist() == [0.0, 0.5, 1.0] and two.spec.nfe == 2
    assert two.model.patch_embedding.weight.dtype == torch.float32  # precision auto on CPU
    half = model_variant(EvaluateConfig(model=str(student), precision="bf16"), Storage()).model
    assert half.patch_embedding.weight.dtype == torch.bfloat16 and half.scale_shift_table.dtype == torch.float32
    teacher = model_variant(EvaluateConfig(model=str(_random_teacher(tmp_path / "teacher")), steps=3), Storage())
    assert teacher.spec.kind == "euler_cfg" and (teacher.spec.steps, teacher.spec.guidance, teacher.spec.shift) == (3, 1.5, 1.0)


def test_summaries_keep_infinite_and_nan_apart():
    from ray_jobs.evaluate import finite_or_none, summarize

    rows = [{"variant": "a", "clip": 0, "psnr": math.inf, "mouth_sync": math.nan},
            {"variant": "a", "clip": 1, "psnr": math.inf, "mouth_sync": 0.5}]
    table = summarize(rows)
    assert table[0]["psnr"] == math.inf and table[0]["mouth_sync"] == 0.5 and table[0]["clips"] == 2
    assert finite_or_none(table) == [{"variant": "a", "clips": 2, "psnr": None, "mouth_sync": 0.5}]


def test_extra_metrics_are_named_by_import_path_and_checked_at_start():
    from pydantic import ValidationError

    from model.metrics import psnr
    from ray_jobs.evaluate import EvaluateConfig, extra_metric

    cfg = EvaluateConfig(metrics=["model.metrics:psnr"])
    assert extra_metric(cfg.metrics[0]) is psnr
    with pytest.raises(ValidationError, match="no attribute 'lpips'"):
        EvaluateConfig(metrics=["model.metrics:lpips"])
    with pytest.raises(ValidationError, match="package.module:attribute"):
        EvaluateConfig(metrics=["lpips"])
