"""The synthetic puppet world: real MP4s decoded by ffmpeg, determinism, audio-mouth sync, splits, ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.config import ConfigError, load_config
from core.media import decode_audio, decode_video, probe
from model.pose import COCO17_LIMBS, LIMB_COLORS, render_pose
from ray_jobs.synthetic import SyntheticConfig, generate_video, ground_truth_frames, render_frames, run
from ray_jobs.synthetic.__main__ import main, parse_args
from ray_jobs.synthetic.puppet import make_identity

NUM_VIDEOS, SEED = 4, 7
WORLD = dict(num_videos=NUM_VIDEOS, seed=SEED, num_identities=3, heldout_identities=1)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 4-video world (defaults: 64x64, 16 fps, 3 s) written through the CLI entry point."""
    out = tmp_path_factory.mktemp("world")
    argv = ["--out", str(out), "--num-videos", str(NUM_VIDEOS), "--seed", str(SEED),
            "--set", "num_identities=3", "--set", "heldout_identities=1"]
    assert main(argv) == 0
    sidecars = [json.loads(p.read_text()) for p in sorted((out / "videos").glob("*.json"))]
    return out, sidecars


def test_every_file_decodes_to_stated_frames_fps_size_and_audio(world):
    out, sidecars = world
    assert len(sidecars) == NUM_VIDEOS
    for sidecar in sidecars:
        path = out / "videos" / f"{sidecar['video_id']}.mp4"
        assert (sidecar["width"], sidecar["height"], sidecar["fps"], sidecar["num_frames"]) == (64, 64, 16.0, 48)
        info = probe(path)
        assert (info.width, info.height, info.fps, info.num_frames) == (64, 64, 16.0, 48)
        assert (info.audio_sample_rate, info.audio_channels) == (16000, 1)
        assert decode_video(path, fps=16, size=(64, 64)).shape == (48, 64, 64, 3)
        audio = decode_audio(path, sample_rate=16000)
        assert abs(len(audio) - 3.0 * 16000) <= 16  # the stated duration, to 1 ms
        assert np.asarray(sidecar["keypoints"]).shape == (48, 17, 3)
        assert np.asarray(sidecar["face_boxes"]).shape == (48, 4)
        assert len(sidecar["mouth_openness"]) == 48 and sidecar["keypoint_format"] == "coco17"


def test_same_seed_gives_byte_identical_sidecars(world, tmp_path):
    out, _ = world
    again = tmp_path / "again"
    run(load_config(SyntheticConfig, overrides={**WORLD, "out": str(again)}))
    for first in sorted((out / "videos").glob("*.json")):
        assert (again / "videos" / first.name).read_bytes() == first.read_bytes()
    assert (again / "splits.json").read_bytes() == (out / "splits.json").read_bytes()
    other = generate_video(SyntheticConfig(**{**WORLD, "seed": SEED + 1}), 0).sidecar
    assert other["keypoints"] != json.loads((out / "videos" / first.name).read_text())["keypoints"]


def test_mouth_follows_decoded_audio_envelope(world):
    out, sidecars = world
    for sidecar in sidecars:
        audio = decode_audio(out / "videos" / f"{sidecar['video_id']}.mp4", sample_rate=16000)
        per_frame = audio[: 48 * 1000].reshape(48, 1000)  # 16 kHz / 16 fps = 1000 samples per frame
        envelope = np.sqrt((per_frame.astype(np.float64) ** 2).mean(axis=1))
        mouth = np.asarray(sidecar["mouth_openness"])
        assert mouth.min() >= 0 and mouth.max() == 1.0 and mouth.std() > 0.1
        assert np.corrcoef(envelope, mouth)[0, 1] > 0.8


def test_heldout_identities_never_in_train(world):
    out, sidecars = world
    splits = json.loads((out / "splits.json").read_text())
    train_ids, heldout_ids = set(splits["identities"]["train"]), set(splits["identities"]["heldout"])
    assert len(heldout_ids) == 1 and len(train_ids) == 2 and not train_ids & heldout_ids
    by_id = {s["video_id"]: s for s in sidecars}
    assert sorted(splits["videos"]["train"] + splits["videos"]["heldout"]) == sorted(by_id)
    assert splits["videos"]["heldout"], "4 videos over 3 identities must include the held-out one"
    for name in splits["videos"]["train"]:
        assert by_id[name]["split"] == "train" and by_id[name]["identity_id"] in train_ids
    for name in splits["videos"]["heldout"]:
        assert by_id[name]["split"] == "heldout" and by_id[name]["identity_id"] in heldout_ids


def test_ground_truth_reproduces_frames(world):
    out, sidecars = world
    cfg = SyntheticConfig(**WORLD)
    generated = generate_video(cfg, 1)
    sidecar = next(s for s in sidecars if s["video_id"] == generated.sidecar["video_id"])
    np.testing.assert_array_equal(ground_truth_frames(sidecar, 8, 8, 64, 64), generated.frames[8:16])
    for sidecar in sidecars:
        decoded = decode_video(out / "videos" / f"{sidecar['video_id']}.mp4", fps=16, size=(64, 64))
        assert _psnr(decoded, ground_truth_frames(sidecar, 0, 48, 64, 64)) > 25.0
    with pytest.raises(ValueError, match="outside"):
        ground_truth_frames(sidecar, 44, 8, 64, 64)


def test_puppet_moves_and_identities_differ(world):
    _, sidecars = world
    frames = ground_truth_frames(sidecars[0], 0, 48)
    keypoints = np.asarray(sidecars[0]["keypoints"])
    wrist_travel = np.ptp(keypoints[:, 9:11, :2], axis=0).max()
    assert wrist_travel > 6.0  # pixels at 64x64: visible motion
    assert np.abs(frames[1:].astype(int) - frames[:-1]).mean() > 0.5
    first_frames = [ground_truth_frames(s, 0, 1)[0].astype(int) for s in sidecars[:3]]
    assert np.abs(first_frames[0] - first_frames[1]).mean() > 10  # different identities look different


def test_face_box_tightly_contains_the_head(world):
    _, sidecars = world
    sidecar = sidecars[0]
    identity = make_identity(int(sidecar["identity_id"][2:]), sidecar["seed"])
    keypoints = np.asarray(sidecar["keypoints"])[:8]
    frames = ground_truth_frames(sidecar, 0, 8)
    offscreen = np.full_like(keypoints, -1000.0)
    offscreen[..., 2], offscreen[:, 3, 0] = 1.0, -990.0  # ears 10 px apart, far outside the frame
    background = render_frames(identity, offscreen, np.zeros(8), 64, 64)
    for t, (x0, y0, x1, y1) in enumerate(np.asarray(sidecar["face_boxes"])[:8]):
        assert 8 < x1 - x0 < 20 and x1 - x0 == pytest.approx(y1 - y0, abs=0.02)
        assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y, _ in keypoints[t, :5])  # eyes, ears, nose
        box = (slice(int(np.ceil(y0)), int(y1)), slice(int(np.ceil(x0)), int(x1)))
        covered = np.abs(frames[t][box].astype(int) - background[t][box]).max(axis=-1) > 12
        assert covered.mean() > 0.7  # a disc fills pi/4 of its box; a loose box would show background


def test_pose_rendering_of_sidecar_keypoints(world):
    _, sidecars = world
    keypoints = np.asarray(sidecars[0]["keypoints"])[:4]
    maps = render_pose(keypoints, 64, 64)
    assert maps.shape == (4, 64, 64, 3) and maps.dtype == np.uint8
    limb = COCO17_LIMBS.index((7, 9))  # left forearm
    middle = np.round((keypoints[0, 7, :2] + keypoints[0, 9, :2]) / 2).astype(int)
    around = maps[0, middle[1] - 1: middle[1] + 2, middle[0] - 1: middle[0] + 2].reshape(-1, 3).astype(int)
    assert np.abs(around - LIMB_COLORS[limb]).max(axis=1).min() <= 40  # the limb's own color is drawn there
    assert maps[0, 0, 0].max() == 0 and (maps[0].max(axis=-1) > 0).mean() < 0.3  # a skeleton, not a fill
    hidden = keypoints.copy()
    hidden[..., 2] = 0.0
    assert render_pose(hidden, 64, 64).max() == 0
    batch = np.zeros((2, 4, 64, 64, 3), np.uint8)  # drawing into a batch row gives the same maps
    render_pose(keypoints, 64, 64, out=batch[1])
    np.testing.assert_array_equal(batch[1], maps)
    assert batch[0].max() == 0
    with pytest.raises(ValueError, match="out must be"):
        render_pose(keypoints, 64, 64, out=np.zeros((4, 64, 32, 3), np.uint8))


def test_config_errors_name_the_key(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--out", str(tmp_path), "--set", "bogus_key=1"])
    assert exit_info.value.code == 2 and "bogus_key" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="heldout_identities"):
        load_config(SyntheticConfig, overrides={"num_identities": 2, "heldout_identities": 2})
    with pytest.raises(ConfigError, match="width"):
        load_config(SyntheticConfig, overrides={"width": 63})
    config_file = tmp_path / "synthetic.yaml"
    config_file.write_text("num_videos: 3\nfps: 8\n")
    cfg = parse_args(["--config", str(config_file), "--set", "seed=5", "--num-videos", "2", "--out", "x"])
    assert (cfg.num_videos, cfg.fps, cfg.seed, cfg.out) == (2, 8.0, 5, "x")


def test_writes_to_s3(s3_bucket, storage, world):
    _, sidecars = world
    cfg = SyntheticConfig(**{**WORLD, "num_videos": 1, "out": f"{s3_bucket}/world",
                             "storage": {"endpoint_url": storage.cfg.endpoint_url}})
    run(cfg)
    names = sorted(uri.rsplit("/", 1)[-1] for uri in storage.list(f"{s3_bucket}/world", suffixes=None))
    assert names == ["s7-00000.json", "s7-00000.mp4", "splits.json"]
    stored = storage.read_json(f"{s3_bucket}/world/videos/s7-00000.json")
    assert stored == next(s for s in sidecars if s["video_id"] == "s7-00000")
