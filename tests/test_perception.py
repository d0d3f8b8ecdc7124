"""The puppet perception model: the checked-in fit on unseen identities, its folder, and the fitting job."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.metrics import lip_sync, pck, pose_error
from model.perception import PERCEPTION_PATH, PuppetPerception, load_perception

# Bounds on the checked-in fit; its FIT_REPORT.json measured 0.69 px, PCK 0.991, mouth r 0.985 on all
# 1,728 held-out frames (2 of those videos here: 0.68 px, 0.983, 0.980).
MAX_HELDOUT_PX = 1.0
MIN_HELDOUT_PCK = 0.95
MIN_MOUTH_R = 0.9


@pytest.fixture(scope="module")
def detector() -> PuppetPerception:
    return load_perception()


def _fit_world():
    from ray_jobs.synthetic.world import SyntheticConfig

    report = json.loads((PERCEPTION_PATH / "FIT_REPORT.json").read_text())["config"]
    return SyntheticConfig(seed=report["world_seed"], num_identities=report["num_identities"],
                           heldout_identities=report["heldout_identities"], duration=report["duration"])


def _videos(world, indices):
    from ray_jobs.synthetic.world import generate_video

    return [generate_video(world, i) for i in indices]


def test_checked_in_detector_on_heldout_identities(detector):
    from ray_jobs.synthetic.puppet import identity_index
    from ray_jobs.synthetic.world import identity_splits

    world = _fit_world()
    assert world.seed != 0  # fitted on a world of its own, not the demo's
    heldout = [identity_index(i) for i in identity_splits(world)["heldout"][:2]]
    videos = _videos(world, heldout)  # video i shows identity i % num_identities
    assert all(v.sidecar["split"] == "heldout" for v in videos)
    frames = np.concatenate([v.frames for v in videos])
    truth = np.concatenate([np.asarray(v.sidecar["keypoints"]) for v in videos])
    mouth = np.concatenate([np.asarray(v.sidecar["mouth_openness"]) for v in videos])
    found = detector.detect(frames)
    assert found.keypoints.shape == (len(frames), 17, 2) and found.mouth.shape == (len(frames),)
    assert pose_error(found.keypoints, truth) < MAX_HELDOUT_PX
    assert pck(found.keypoints, truth, height=64) > MIN_HELDOUT_PCK
    assert lip_sync(found.mouth, mouth) > MIN_MOUTH_R


def test_copy_reference_scores_far_worse_than_truth_on_the_demo_world(detector):
    """Frozen first frame vs the moving truth (demo world seed 0, identities the detector never saw)."""
    from ray_jobs.synthetic.world import SyntheticConfig, ground_truth_frames

    video = _videos(SyntheticConfig(seed=0, duration=3.0), [1])[0]
    truth = np.asarray(video.sidecar["keypoints"])
    mouth = np.asarray(video.sidecar["mouth_openness"])
    on_truth = detector.detect(video.frames)
    copied = detector.detect(np.repeat(video.frames[:1], len(video.frames), axis=0))
    assert pose_error(copied.keypoints, truth) > 2.5 * pose_error(on_truth.keypoints, truth)
    assert lip_sync(on_truth.mouth, mouth) > MIN_MOUTH_R
    assert lip_sync(copied.mouth, mouth) == 0.0
    big = ground_truth_frames(video.sidecar, 0, 16, 128, 128)  # another size: resized in, scaled back out
    assert pose_error(detector.detect(big).keypoints, 2 * truth[:16]) < 2.5  # px at 128x128 (1.24 measured)


def test_saved_folder_rebuilds_the_model(detector, tmp_path):
    import torch

    assert (PERCEPTION_PATH / "config.json").is_file()
    weights = sum(p.stat().st_size for p in PERCEPTION_PATH.glob("*.safetensors"))
    assert 0 < weights < 2 * 2**20
    detector.save_pretrained(str(tmp_path / "copy"))
    again = load_perception(str(tmp_path / "copy"))
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    a, b = detector.detect(frames), again.detect(frames)
    assert np.array_equal(a.keypoints, b.keypoints) and np.array_equal(a.mouth, b.mouth)
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["_class_name"] == "PuppetPerception"
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(torch.zeros(2, 64, 64, 3))


def test_fit_job_writes_a_loadable_folder_and_report(tmp_path):
    from core.config import ConfigError, load_config
    from ray_jobs.fit_perception import FitPerceptionConfig, fit_perception

    path = "ray_jobs/configs/assets/fit_perception.yaml"
    with pytest.raises(ConfigError, match="world_seed"):
        load_config(FitPerceptionConfig, path, {"world_seed": 0})
    cfg = load_config(FitPerceptionConfig, path, {
        "out": str(tmp_path / "fit"), "num_identities": 64, "heldout_identities": 4, "videos_per_identity": 1,
        "duration": 0.25, "steps": 3, "batch_size": 4, "demo_videos": 1, "arch.width": 4, "arch.mouth_width": 4})
    report = fit_perception(cfg)
    assert report["steps"] == 3 and report["train_frames"] == 60 * 4
    scores = report["scores"]
    assert set(scores) == {"heldout_truth", "heldout_vae_round_trip", "train_truth", "demo_world_seed0_truth"}
    assert scores["heldout_truth"]["frames"] == 4 * 4 and scores["heldout_truth"]["keypoint_error_px"] > 0
    model = load_perception(str(tmp_path / "fit"))
    assert model.config.width == 4
    assert json.loads((tmp_path / "fit" / "FIT_REPORT.json").read_text())["config"]["world_seed"] == cfg.world_seed
