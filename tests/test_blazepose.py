"""MediaPipe BlazePose / BlazeFace through LiteRT (`model.blazepose`) on a real photograph and a real MP4.

The photograph is scikit-image's bundled `astronaut` (512x512, Eileen Collins, upper body facing the
camera). The models come from the cache `python -m ray_jobs.fetch_models` fills (``make test`` runs it
first); the `models` fixture fills it when it is empty, with pip, as the command does.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from core.media import decode_video, mux_mp4
from core.storage import Storage
from model.blazepose import (COCO_FROM_BLAZEPOSE, FETCH_COMMAND, MODEL_FILES, BlazeFaceDetector, BlazePoseExtractor,
                             default_model_dir, ssd_anchors)
from model.face import FaceCropConfig, reference_face
from ray_jobs.fetch_models import cache_is_complete, fetch_models

# Boxes stated by eye on the 512x512 astronaut, [x0, y0, x1, y1]: her whole visible body (suit from the
# left edge to her right arm, hair top to the image bottom) and her face (hairline to chin, cheek to cheek).
PERSON_BOX = np.array([10, 10, 390, 512], np.float32)
FACE_BOX = np.array([172, 78, 278, 188], np.float32)
NOSE, L_EYE, R_EYE, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 0, 1, 2, 5, 6, 11, 12


@pytest.fixture(scope="module")
def models() -> str:
    folder = str(default_model_dir())
    if not cache_is_complete(Storage(), folder):
        fetch_models(folder)
    return folder


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    return float(inter / ((a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter))


def test_anchor_counts_match_the_models():
    assert len(ssd_anchors(224, (8, 16, 32, 32, 32))) == 2254  # pose_detection: 28*28*2 + 14*14*2 + 7*7*6
    assert len(ssd_anchors(128, (8, 16, 16, 16))) == 896  # BlazeFace short range: 16*16*2 + 8*8*6
    assert COCO_FROM_BLAZEPOSE[L_SHOULDER] == 11 and COCO_FROM_BLAZEPOSE[R_HIP] == 24


def test_pose_on_a_real_photograph(models, astronaut):
    keypoints = BlazePoseExtractor(models)(astronaut[None])[0]
    visible = keypoints[:, 2] > 0.5
    for joint in (NOSE, L_EYE, R_EYE, L_SHOULDER, R_SHOULDER, L_HIP, R_HIP):
        assert keypoints[joint, 2] > 0.5, joint
    x, y = keypoints[visible, 0], keypoints[visible, 1]
    assert ((x >= PERSON_BOX[0]) & (x <= PERSON_BOX[2]) & (y >= PERSON_BOX[1]) & (y <= PERSON_BOX[3])).all()
    head = keypoints[[NOSE, L_EYE, R_EYE], 1].max()
    assert head < keypoints[[L_SHOULDER, R_SHOULDER], 1].min() < keypoints[[L_SHOULDER, R_SHOULDER], 1].max() \
        < keypoints[[L_HIP, R_HIP], 1].min()
    assert keypoints[L_EYE, 1] < keypoints[NOSE, 1]  # eyes above the nose
    # facing the camera: her left side is on the image's right
    assert keypoints[L_SHOULDER, 0] > keypoints[R_SHOULDER, 0] and keypoints[L_EYE, 0] > keypoints[R_EYE, 0]
    assert FACE_BOX[0] < keypoints[NOSE, 0] < FACE_BOX[2] and FACE_BOX[1] < keypoints[NOSE, 1] < FACE_BOX[3]
    assert not BlazePoseExtractor(models)(np.full((2, 240, 320, 3), 128, np.uint8)).any()  # nobody: zeros


def test_blazeface_finds_the_face_and_reference_face_uses_it(models, astronaut):
    box = BlazeFaceDetector(models)(astronaut)
    assert box is not None and _iou(box, FACE_BOX) > 0.6
    assert BlazeFaceDetector(models)(np.full((200, 300, 3), 128, np.uint8)) is None
    for detector in ("blazeface", "auto"):  # auto: the model is in the cache
        face = reference_face(astronaut, FaceCropConfig(detector=detector, model_dir=models))
        assert face.found
        np.testing.assert_allclose(face.box, box)


def _pan_zoom(image: np.ndarray, frames: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) cut from `image` by a window that pans right/down and zooms in, and per frame
    its origin (T, 2) and scale (T,): frame pixel = (image pixel - origin) * scale."""
    import cv2

    width, height = size
    a = np.linspace(0.0, 1.0, frames)
    crop_w = 480 - 80 * a  # zoom in: the window shrinks 480 -> 400 image pixels wide
    origin = np.stack([10 + 60 * a, 30 + 20 * a], axis=1)
    scale = width / crop_w
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        affine = np.array([[scale[t], 0, -origin[t, 0] * scale[t]], [0, scale[t], -origin[t, 1] * scale[t]]])
        out[t] = cv2.warpAffine(image, affine, (width, height), flags=cv2.INTER_AREA)
    return out, origin, scale


def test_track_through_a_real_h264_video_is_smooth(models, astronaut, tmp_path):
    """Pan + zoom of the photo as H.264 (ffmpeg), decoded back: the track follows the known camera motion."""
    still = BlazePoseExtractor(models)(astronaut[None])[0]
    frames, origin, scale = _pan_zoom(astronaut, 16, (320, 240))
    mux_mp4(frames, None, 16.0, tmp_path / "pan.mp4")
    decoded = decode_video(tmp_path / "pan.mp4", 16.0, (320, 240))
    assert decoded.shape == (16, 240, 320, 3)
    joints = [NOSE, L_EYE, R_EYE, L_SHOULDER, R_SHOULDER]
    truth = (still[joints, :2][None] - origin[:, None]) * scale[:, None, None]
    smooth = BlazePoseExtractor(models, fps=16.0)(decoded)
    raw = BlazePoseExtractor(models, fps=16.0, smooth=False)(decoded)
    assert (smooth[:, joints, 2] > 0.5).all()
    error = np.linalg.norm(smooth[:, joints, :2] - truth, axis=-1)
    # px at 320x240, where her shoulders are ~110 px apart; per-frame model noise is 5-10 px (up to 24 raw)
    assert np.median(error) < 9.0 and error.max() < 16.0, error.round(1)
    jerk = lambda track: np.abs(np.diff(track[:, joints, :2], n=2, axis=0)).mean()  # noqa: E731
    assert jerk(smooth) < 0.5 * jerk(raw) and jerk(smooth) < 2.5, (jerk(smooth), jerk(raw))  # 1.6 vs 5.1 px


def test_serving_takes_a_pose_video_through_the_same_extractor(models, astronaut, tmp_path):
    """`serving.inputs.pose_from_video`: the upload at its own size (320x240 <= the 512 detection side) through
    the preprocessing extractor, the keypoints mapped into the output H x W fitted like the reference (cover,
    centre crop); bad bytes are a 422 reason."""
    from ray_jobs.preprocess.stages import fit_transform, transform_points
    from serving.inputs import InputError, pose_from_video

    frames, _, _ = _pan_zoom(astronaut, 8, (320, 240))
    mux_mp4(frames, None, 16.0, tmp_path / "drive.mp4")
    extractor = BlazePoseExtractor(models, fps=16.0)
    got = pose_from_video((tmp_path / "drive.mp4").read_bytes(), "pose_video", 128, 128, 16.0, 32, extractor)
    on_source = extractor(decode_video(tmp_path / "drive.mp4", 16.0, (320, 240)))
    expected = transform_points(on_source, fit_transform((320, 240), (128, 128), "crop"))
    assert got.shape == (8, 17, 3) and np.allclose(got, np.where(on_source[..., 2:] > 0, expected, 0))
    small = pose_from_video((tmp_path / "drive.mp4").read_bytes(), "pose_video", 128, 128, 16.0, 32, extractor, 160)
    assert np.median(np.abs(small - got)[..., :2][(got[..., 2] > 0.5) & (small[..., 2] > 0.5)]) < 3  # 160x120 in
    upper = got[:, [NOSE, L_SHOULDER, R_SHOULDER]]  # in the 128x128 crop (hips and legs fall below it)
    assert (upper[..., 2] > 0.5).all() and ((upper[..., :2] >= 0) & (upper[..., :2] <= 128)).all()
    with pytest.raises(InputError, match="pose_video.*readable|readable"):
        pose_from_video(b"not a video", "pose_video", 128, 128, 16.0, 32, extractor)
    with pytest.raises(InputError, match="8 frames"):
        pose_from_video((tmp_path / "drive.mp4").read_bytes(), "pose_video", 128, 128, 16.0, 4, extractor)


def test_keypoints_land_in_the_clip_geometry(models, astronaut):
    """The extractor on a padded clip (the preprocessing geometry) gives the photo's joints mapped by fit."""
    from ray_jobs.preprocess.stages import fit_transform, transform_points

    import cv2

    source = cv2.resize(astronaut, (320, 240), interpolation=cv2.INTER_AREA)  # non-square source
    transform = fit_transform((320, 240), (256, 256), "pad")  # 0.8x and 32 px bars above and below
    scale, dx, dy = transform
    clip = cv2.warpAffine(source, np.array([[scale, 0, dx], [0, scale, dy]]), (256, 256), flags=cv2.INTER_AREA)
    on_source = BlazePoseExtractor(models, smooth=False)(source[None])[0]
    on_clip = BlazePoseExtractor(models, smooth=False)(clip[None])[0]
    joints = [NOSE, L_SHOULDER, R_SHOULDER]
    # model noise between the two scales: up to ~9 px here; a missed bar offset would be 32
    np.testing.assert_allclose(on_clip[joints, :2], transform_points(on_source[joints, :2], transform), atol=12.0)


def test_empty_cache_fails_naming_the_fetch_command(tmp_path, models):
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.pose import check_pose_models

    with pytest.raises(FileNotFoundError, match=FETCH_COMMAND):
        BlazePoseExtractor(tmp_path)
    cfg = PreprocessConfig(input="in", output="out", pose={"model_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=f"{FETCH_COMMAND} --cache {tmp_path}"):
        check_pose_models(cfg)
    check_pose_models(PreprocessConfig(input="in", output="out", pose={"model_dir": models}))  # filled: passes
    from ray_jobs.preprocess import run
    from ray_jobs.synthetic import SyntheticConfig, generate_video

    (tmp_path / "in").mkdir()
    video = generate_video(SyntheticConfig(out="unused", duration=0.5, seed=1), 0)
    from core.media import mux_mp4

    mux_mp4(video.frames, video.audio, 16.0, tmp_path / "in" / "plain.mp4")  # no sidecar
    job = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), pose={"model_dir": str(tmp_path / "none")})
    with pytest.raises(FileNotFoundError, match=FETCH_COMMAND):
        run(job)  # the job itself fails at start, before any video is decoded
    assert not (tmp_path / "out" / "manifest.json").exists()
    check_pose_models(PreprocessConfig(input="in", output="out", pose={"extractor": "none",
                                                                       "model_dir": str(tmp_path)}))
    auto = FaceCropConfig(detector="auto", model_dir=str(tmp_path))  # auto without the model: Haar
    from model.face import resolve_detector

    assert resolve_detector(auto.detector, auto.model_dir) == "haar"


def test_fetched_cache_records_sha256_and_detects_corruption(models, tmp_path):
    import hashlib
    import json

    record = fetch_models(models)  # complete: nothing is downloaded, the record comes back
    assert set(record["files"]) == set(MODEL_FILES) and record["source"]["wheel"].startswith("mediapipe-0.10.21-")
    for name, entry in record["files"].items():
        data = (default_model_dir() / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    copy = tmp_path / "cache"
    shutil.copytree(models, copy)
    assert cache_is_complete(Storage(), str(copy))
    landmark = copy / "pose_landmark_full.tflite"
    data = bytearray(landmark.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    landmark.write_bytes(bytes(data))
    assert not cache_is_complete(Storage(), str(copy))
    assert json.loads((copy / "models.json").read_text()) == record


def test_pose_stage_extracts_blazepose_keypoints_by_default(models, astronaut, tmp_path):
    """A clip without sidecar keypoints through the preprocessing pose stage (`udfs.add_pose`, the Ray job's
    UDF, called here without Ray: the job path costs ~75 s on 2 cores): frames decoded from the H.264 file
    into the clip geometry (128x128 crop of the 320x240 source); the default extractor's track follows the
    camera's known motion and is what the pose maps are drawn from."""
    from model.pose import render_pose
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.stages import fit_transform, transform_points
    from ray_jobs.preprocess.udfs import add_pose

    frames, origin, scale = _pan_zoom(astronaut, 16, (320, 240))
    mux_mp4(frames, None, 16.0, tmp_path / "pan.mp4")
    clips = decode_video(tmp_path / "pan.mp4", 16.0, (128, 128), "crop").reshape(2, 8, 128, 128, 3)
    cfg = PreprocessConfig(input="in", output="out", width=128, height=128, vae={"enabled": False},
                           pose={"model_dir": models})
    assert cfg.pose.extractor == "blazepose"  # the default
    batch = add_pose({"source": np.array(["pan.mp4"] * 2, object), "clip_index": np.arange(2), "frames": clips,
                      "keypoints": np.zeros((2, 8, 17, 3), np.float32), "has_keypoints": np.zeros(2, bool),
                      "split": np.array(["heldout"] * 2, object), "error_stage": np.array(["", ""], object),
                      "error_reason": np.array(["", ""], object)}, cfg)
    assert list(batch["error_stage"]) == ["", ""]
    still = BlazePoseExtractor(models)(astronaut[None])[0]
    joints = [NOSE, L_EYE, R_EYE, L_SHOULDER]  # her right shoulder leaves the 128x128 crop as the camera pans
    truth = (still[joints, :2][None] - origin[:, None]) * scale[:, None, None]
    truth = transform_points(truth, fit_transform((320, 240), (128, 128), "crop")).reshape(2, 8, len(joints), 2)
    keypoints = batch["keypoints"]
    assert (keypoints[:, :, joints, 2] > 0.5).all()
    error = np.linalg.norm(keypoints[:, :, joints, :2] - truth, axis=-1)
    # px at 128x128: face joints within 7 (measured <= 6.3); the shoulder drifts up to ~16 as the hips leave view
    assert error[..., :3].max() < 8.0 and error[..., 3].max() < 20.0, error.round(1)
    np.testing.assert_array_equal(batch["pose"][1], render_pose(keypoints[1], 128, 128, cfg.pose.render_conf_threshold))


def test_fetch_into_s3_and_run_from_the_node_cache(models, astronaut, storage, s3_bucket, tmp_path):
    """An s3:// cache: fetch_models writes the models there; the job's start check and the node-local copy
    (`local_model_dir`, model/ reads local paths only) read it back. The wheel is rebuilt from the local
    cache with the real wheel's layout (zip, `mediapipe/modules/...` paths) so no 35 MB download runs here."""
    import zipfile

    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.pose import check_pose_models, local_model_dir

    wheel = tmp_path / "mediapipe-0.10.21-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, inner in MODEL_FILES.items():
            archive.write(default_model_dir() / name, inner)
    cache = f"{s3_bucket}/models/mediapipe"
    cfg = PreprocessConfig(input="in", output="out", pose={"model_dir": cache}, storage=storage.cfg)
    with pytest.raises(FileNotFoundError, match=f"{FETCH_COMMAND} --cache {cache}"):
        check_pose_models(cfg, storage)  # empty bucket: fails at start, naming the command
    record = fetch_models(cache, storage, wheel=wheel)
    assert cache_is_complete(storage, cache) and record["source"]["wheel"] == wheel.name
    assert record["files"] == fetch_models(str(default_model_dir()))["files"]  # same bytes, same sha256
    check_pose_models(cfg, storage)
    local = local_model_dir(cache, storage.cfg.model_dump_json())
    assert not local.startswith("s3://")
    assert _iou(BlazeFaceDetector(local)(astronaut), FACE_BOX) > 0.6

