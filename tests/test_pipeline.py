"""The main job end to end on a reduced config: every stage runs, the report folder is complete, re-runs skip."""

from __future__ import annotations

import json

from core.config import load_config
from core.media import probe
from ray_jobs.pipeline import STAGES, PipelineConfig, run

# One Ray Train worker per training stage: this test checks the wiring between stages; two-worker
# DeepSpeed runs of each job are tested in their own files (test_train_teacher, test_tpo, test_distill).
ONE_WORKER = {"scaling.num_workers": 1}
REDUCED = {
    "synthetic": {"num_videos": 4, "duration": 1.0, "num_identities": 3, "heldout_identities": 1},
    "teacher": {"steps": 3, "batch_size": 1, "checkpoint.every_n_steps": 3, "validation.steps": 1, **ONE_WORKER},
    # Unguarded pairs (best vs worst on each dimension): with 2 candidates and the guard, a strong teacher
    # often leaves no pair at all, and TPO has nothing to train on.
    "preferences": {"max_clips": 2, "sampling.num_candidates": 2, "sampling.steps": 1, "other_dimension_tolerance": None},
    "tpo": {"steps": 2, "batch_size": 1, "checkpoint.every_n_steps": 2, **ONE_WORKER},
    "distill": {"steps": 2, "batch_size": 1, "checkpoint.every_n_steps": 2, **ONE_WORKER},
    "evaluation": {"num_clips": 1, "teacher_steps": 2, "student_steps": [2, 1]},
}


def test_pipeline_runs_every_stage_and_writes_the_report(ray_session, tmp_path, capsys):
    overrides = {"workdir": str(tmp_path / "work"), "report_dir": str(tmp_path / "report"), **REDUCED}
    cfg = load_config(PipelineConfig, "ray_jobs/configs/tiny/pipeline.yaml", overrides)
    result = run(cfg)

    assert [s["stage"] for s in result["stages"]] == list(STAGES)
    assert all(s["status"] == "ran" for s in result["stages"])
    printed = capsys.readouterr().out
    assert all(f"{stage}: done in" in printed for stage in STAGES)

    report = tmp_path / "report"
    for name in ("report.md", "report.html", "quality_vs_nfe.png", "loss_curves.png", "grid.mp4",
                 "served_student.mp4", "metrics.json"):
        assert (report / name).stat().st_size > 0, name
    table = json.loads((report / "metrics.json").read_text())["table"]
    variants = [row["variant"] for row in table]
    assert variants == ["copy reference", "VAE round trip", "teacher 4 NFE", "teacher 30 NFE", "TPO 30 NFE",
                        "student 2 step", "student 1 step"]
    assert [row["nfe"] for row in table] == [0, 0, 4, 30, 30, 2, 1]
    # The round trip decodes the clip's own latents: far closer to the truth than a frozen reference.
    assert table[1]["psnr"] > table[0]["psnr"] + 3
    md = (report / "report.md").read_text()
    assert "| TPO 30 NFE | 30 |" in md and "loss_curves.png" in md
    served = probe(report / "served_student.mp4")
    assert served.num_frames == 8 and served.has_audio

    # A second run finds every stage's marker and skips it (the report is rewritten).
    again = run(cfg)
    assert all(s["status"].startswith("skipped") for s in again["stages"])
