"""Preprocessing job: real synthetic MP4s plus planted bad files, on local disk and on moto's S3 server.

One small local Ray (2 CPUs) for the module. Checks exact clip counts, the clip contents against
independent decodes, every bad file's error row, the shard schema read back by `ray.data.read_parquet`,
VAE latents against a direct encode, and that re-runs write nothing new.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from model.audio import audio_features
from core.config import ConfigError, load_config
from model.face import reference_face
from core.media import MediaError, decode_audio, decode_video, ffmpeg_exe, mux_mp4
from model.pose import render_pose
from core.storage import Storage
from artifacts import tables as shards
from ray_jobs.preprocess import PreprocessConfig, main, run
from ray_jobs.preprocess import stages
from ray_jobs.preprocess import udfs
from ray_jobs.preprocess.udfs import add_face_track
from ray_jobs.preprocess.pose import OnnxPoseExtractor, decode_heatmaps, decode_simcc
from ray_jobs.synthetic import SyntheticConfig, generate_video, sidecar_json
from ray_jobs.synthetic.faces import face_track_clip, frontal_face

T, FPS, SIZE = 8, 16.0, 64
GOOD = ("good0", "good1")  # 1 s each -> 16 frames -> 2 clips
# planted file -> (stage, substring of the reason) when silent videos are not allowed
BAD = {
    "truncated": ("probe", "not a readable media file"),
    "garbage": ("probe", "not a readable media file"),
    "empty": ("probe", "empty file"),
    "audio_only": ("probe", "no video stream"),
    "short": ("clip", "shorter than one clip"),
    "bad_sidecar": ("sidecar", "unreadable sidecar"),
    "silent": ("audio", "no audio stream"),
}
# Steps timed in every run without the VAE, in pipeline order (`summary["stage_seconds"]`).
CPU_STEPS = ("decode", "audio_features", "pose", "face_track", "motion_mask", "write_shard")
SCHEMA = {  # column -> (dtype, per-row shape) of docs/design.md at the tiny geometry
    "frames": (np.uint8, (T, SIZE, SIZE, 3)), "ref_frame": (np.uint8, (SIZE, SIZE, 3)),
    "keypoints": (np.float32, (T, 17, 3)), "pose": (np.uint8, (T, SIZE, SIZE, 3)),
    "audio": (np.float32, (8000,)), "audio_feats": (np.float32, (T, 6, 32)), "has_audio": (np.bool_, ()),
    "face_boxes": (np.float32, (T, 4)), "face_crops": (np.uint8, (T, 32, 32, 3)), "has_face": (np.bool_, ()),
    "ref_face_box": (np.float32, (4,)), "ref_face_crop": (np.uint8, (32, 32, 3)), "has_ref_face": (np.bool_, ()),
    "motion_mask": (np.float32, (T, 16, 16)), "mouth_openness": (np.float32, (T,)),
    "clip_index": (np.int64, ()), "start_frame": (np.int64, ()), "fps": (np.float64, ()),
}


@pytest.fixture
def ray_local(s3_server):
    """The shared 2-CPU local Ray, started after the S3 fixture so workers inherit its environment."""
    from conftest import default_ray

    return default_ray()


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", *args], check=True)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two good 1 s synthetic videos with sidecars, and one planted file per kind of bad input."""
    root = tmp_path_factory.mktemp("videos")
    cfg = SyntheticConfig(out=str(root), duration=1.0, seed=3)
    for index, name in enumerate(GOOD):
        video = generate_video(cfg, index)
        mux_mp4(video.frames, video.audio, FPS, root / f"{name}.mp4")
        (root / f"{name}.json").write_bytes(sidecar_json({**video.sidecar, "video_id": name}))
    spare = generate_video(cfg, 2)
    good = (root / "good0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "empty.mp4").write_bytes(b"")
    _ffmpeg("-i", str(root / "good0.mp4"), "-vn", "-c:a", "copy", str(root / "audio_only.mp4"))
    mux_mp4(spare.frames[:3], spare.audio[:3200], FPS, root / "short.mp4")  # 0.19 s
    (root / "bad_sidecar.mp4").write_bytes(good)
    (root / "bad_sidecar.json").write_text('{"keypoints": [[1, 2')
    mux_mp4(spare.frames, None, FPS, root / "silent.mp4")
    (root / "silent.json").write_bytes(sidecar_json({**spare.sidecar, "video_id": "silent"}))
    (root / "notes.txt").write_text("not a video: ignored by the listing")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    """A small random-weight AutoencoderKLWan (spatial factor 4), saved as a diffusers folder."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, False], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae"
    vae.save_pretrained(path)
    return path


def _config(input_uri: str, output_uri: str, **overrides) -> PreprocessConfig:
    fields = {"shard_clips": 16, "vae": {"enabled": False}, **overrides}
    return PreprocessConfig(input=input_uri, output=output_uri, **fields)


def _read_errors(storage, output: str, run_name: str):
    import pyarrow.parquet as pq

    fs, path = storage.arrow_path(storage.join(output, run_name, "errors.parquet"))
    return pq.read_table(path, filesystem=fs).to_pylist()


def _read_shards(ray, storage, output: str):
    manifest = storage.read_json(storage.join(output, "manifest.json"))
    fs, _ = storage.arrow_path(output)
    paths = [storage.arrow_path(storage.join(output, shard))[1] for shard in manifest["shards"]]
    return manifest, shards.read_dataset(paths, fs)


def _listing(storage, output: str) -> dict[str, bytes]:
    return {uri: storage.read_bytes(uri) for uri in storage.list(output)}


def _check_clip(row: dict, videos: Path) -> None:
    """One shard row against an independent decode of its source and its sidecar."""
    name, start = Path(row["source"]).stem, int(row["start_frame"])
    assert start == 8 * row["clip_index"] and row["video_id"] == name
    frames = decode_video(videos / f"{name}.mp4", FPS, (SIZE, SIZE))
    np.testing.assert_array_equal(row["frames"], frames[start:start + T])
    np.testing.assert_array_equal(row["ref_frame"], frames[0])
    sidecar = json.loads((videos / f"{name}.json").read_text())
    np.testing.assert_allclose(row["keypoints"], np.asarray(sidecar["keypoints"][start:start + T]), atol=1e-4)
    np.testing.assert_allclose(row["mouth_openness"], sidecar["mouth_openness"][start:start + T], atol=1e-6)
    np.testing.assert_array_equal(row["motion_mask"], stages.motion_mask(row["frames"][None], 0.04, 4)[0])
    assert row["has_face"] and row["face_crops"].std() > 0
    box = np.asarray(sidecar["face_boxes"][0], np.float32)  # the reference's face: the sidecar's first-frame box
    assert row["has_ref_face"] and "face_latents" not in row
    np.testing.assert_allclose(row["ref_face_box"], box, atol=1e-4)
    np.testing.assert_array_equal(row["ref_face_crop"], reference_face(row["ref_frame"], _config("in", "out").face, box).crop)
    if row["has_audio"]:
        wave = decode_audio(videos / f"{name}.mp4")
        np.testing.assert_array_equal(row["audio"][: len(wave) - start * 1000], wave[start * 1000: start * 1000 + 8000])
        np.testing.assert_allclose(row["audio_feats"], audio_features(row["audio"], FPS, T), atol=1e-5)
    else:
        assert not row["audio"].any() and not row["audio_feats"].any()


def test_local_run_clips_errors_schema_and_incremental_resume(ray_local, videos, tmp_path):
    from core.storage import Storage

    storage, inputs, output = Storage(), tmp_path / "videos", str(tmp_path / "shards")
    shutil.copytree(videos, inputs, ignore=shutil.ignore_patterns("good1.*"))  # good1 arrives later
    first = run(_config(str(inputs), output))
    assert (first["videos_ok"], first["videos_failed"], first["clips_written"]) == (1, len(BAD), 2)
    assert list(first["stage_seconds"]) == list(CPU_STEPS) and all(v > 0 for v in first["stage_seconds"].values())
    errors = {Path(e["source"]).stem: e for e in _read_errors(storage, output, "run-0001")}
    assert set(errors) == set(BAD)
    for name, (stage, reason) in BAD.items():
        assert errors[name]["stage"] == stage and reason in errors[name]["reason"], errors[name]
    for name in ("good1.mp4", "good1.json"):
        shutil.copy(videos / name, inputs / name)
    second = run(_config(str(inputs), output))
    assert (second["run"], second["videos_ok"], second["clips_written"], second["videos_skipped"]) == (
        "run-0002", 1, 2, 1 + len(BAD))
    assert not _read_errors(storage, output, "run-0002")
    manifest, ds = _read_shards(ray_local, storage, output)
    assert [r["run"] for r in manifest["runs"]] == ["run-0001", "run-0002"] and manifest["counts"]["clips"] == 4
    assert manifest["runs"][0]["stage_seconds"] == first["stage_seconds"]
    assert manifest["shard_encoding"] == shards.ENCODING
    assert manifest["store_pixels"] is True and manifest["schema"]["frames"] == f"uint8 ({T}, {SIZE}, {SIZE}, 3)"
    assert manifest["sources"][str(inputs / "good1.mp4")]["status"] == "ok"
    assert manifest["sources"][str(inputs / "empty.mp4")]["status"] == "failed"
    assert len(manifest["sources"][str(inputs / "good0.mp4")]["sha256"]) == 64
    rows = sorted(ds.take_all(), key=lambda r: (r["source"], r["clip_index"]))
    assert [(Path(r["source"]).stem, r["clip_index"]) for r in rows] == [(g, i) for g in GOOD for i in (0, 1)]
    batch = ds.take_batch(4, batch_format="numpy")
    for column, (dtype, shape) in SCHEMA.items():
        assert batch[column].dtype == dtype and batch[column].shape == (4, *shape), column
    import pyarrow.parquet as pq  # on disk: raw-bytes tensor columns that describe their own dtype and shape

    on_disk = pq.read_schema(str(Path(output) / manifest["shards"][0]))
    assert shards.tensor_column_schema(on_disk) == {c: (np.dtype(d), s) for c, (d, s) in SCHEMA.items() if s}
    assert on_disk.field("frames").type.byte_width == T * SIZE * SIZE * 3
    row_group = pq.read_metadata(str(Path(output) / manifest["shards"][0])).row_group(0)
    min_max = {row_group.column(i).path_in_schema: (row_group.column(i).statistics or None) and
               row_group.column(i).statistics.has_min_max for i in range(row_group.num_columns)}
    assert min_max["clip_index"] and min_max["start_frame"]  # scalars keep min/max statistics
    assert not any(min_max[c] for c in ("face_boxes", "mouth_openness", "keypoints", "frames"))  # tensors: none
    for row in rows:
        _check_clip(row, videos)
    before = _listing(storage, output)
    cli = ["--config", "ray_jobs/configs/tiny/preprocess.yaml", "--set", f"input={inputs}", "--set",
           f"output={output}", "--set", "vae.enabled=false", "--set", "videos_per_task=2", "--set", "shard_clips=16"]
    again = main(cli)  # the CLI entry point, on the Ray already up
    assert again["run"] is None and again["clips_written"] == 0 and again["videos_skipped"] == 2 + len(BAD)
    assert _listing(storage, output) == before  # nothing new, nothing rewritten
    with pytest.raises(ValueError, match="clip_frames=8"):
        main(cli + ["--set", "clip_frames=4"])


def test_s3_run_with_silent_allowed_and_vae(ray_local, videos, s3_bucket, storage, tiny_vae):
    from model.vae import load_vae

    input_uri, output = f"{s3_bucket}/raw", f"{s3_bucket}/shards"
    for path in sorted(videos.iterdir()):
        storage.upload_file(path, f"{input_uri}/{path.name}")
    cfg = _config(input_uri, output, storage=storage.cfg, audio={"allow_silent": True},
                  vae={"enabled": True, "path": str(tiny_vae), "batch_size": 4})
    summary = run(cfg)
    assert (summary["videos_ok"], summary["videos_failed"], summary["clips_written"]) == (3, len(BAD) - 1, 6)
    steps = summary["stage_seconds"]  # the VAE actors' time too, carried through the re-batching
    assert list(steps) == [*CPU_STEPS[:-1], "vae", "write_shard"] and all(v > 0 for v in steps.values())
    errors = {Path(e["source"]).stem: e["stage"] for e in _read_errors(storage, output, "run-0001")}
    assert errors == {name: stage for name, (stage, _) in BAD.items() if name != "silent"}
    manifest, ds = _read_shards(ray_local, storage, output)
    assert manifest["counts"]["clips"] == 6 and all(s.startswith("run-0001/shards/") for s in manifest["shards"])
    rows = sorted(ds.take_all(), key=lambda r: (r["source"], r["clip_index"]))
    assert [(Path(r["source"]).stem, r["clip_index"]) for r in rows] == [
        (n, i) for n in ("good0", "good1", "silent") for i in (0, 1)]
    assert [r["has_audio"] for r in rows] == [True] * 4 + [False] * 2
    vae = load_vae(str(tiny_vae))
    for row in rows:
        _check_clip({**row, "source": str(videos / Path(row["source"]).name)}, videos)
        np.testing.assert_allclose(row["latents"], vae.encode(row["frames"][None])[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(row["ref_latent"], vae.encode(row["ref_frame"][None, None])[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(row["ref_face_latent"], vae.encode(row["ref_face_crop"][None, None])[0].numpy(),
                                   atol=1e-4)
        assert row["ref_face_latent"].shape == (16, 1, 8, 8) and "face_latents" not in row
    before = _listing(storage, output)
    assert run(cfg)["clips_written"] == 0 and _listing(storage, output) == before


def _long_video(root: Path, seconds: float, name: str = "long") -> Path:
    """A synthetic video with audio and its sidecar, `seconds` long (16 frames a second)."""
    video = generate_video(SyntheticConfig(out=str(root), duration=seconds, seed=5), 0)
    path = root / f"{name}.mp4"
    mux_mp4(video.frames, video.audio, FPS, path)
    (root / f"{name}.json").write_bytes(sidecar_json({**video.sidecar, "video_id": name}))
    return path


def _item(video: Path) -> dict:
    """The input item the job's listing makes of a video with its sidecar."""
    return {"source": str(video), "sidecar": str(video.with_suffix(".json")), "size": 0, "mtime": 0}


WINDOW_12_FRAMES = 12 * SIZE * SIZE * 3 / 2**20  # decode_window_mb of 12 frames


@pytest.mark.parametrize("stride", [8, 5, 11])
def test_a_long_video_streams_in_windows_with_the_same_clips(tmp_path, stride):
    video = _long_video(tmp_path, 4.0)  # 64 frames
    windows = list(udfs.iter_clip_rows(_item(video), _config("in", "out", stride=stride,
                                                            decode_window_mb=WINDOW_12_FRAMES)))
    assert len(windows) >= 4 and all(streamed for _, streamed in windows)
    streamed = [row for rows, _ in windows for row in rows]
    whole = udfs.decode_clips(_item(video), _config("in", "out", stride=stride))
    assert [r["start_frame"] for r in streamed] == list(range(0, 64 - T + 1, stride))
    assert [r["clip_index"] for r in streamed] == list(range(len(whole)))
    for one, other in zip(whole, streamed, strict=True):
        assert one.keys() == other.keys()
        for key, value in one.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(other[key], value, err_msg=key)
            else:
                assert other[key] == value, key


def test_streaming_bounds_a_tasks_memory_by_the_window(tmp_path):
    """Windowed, a task's peak memory does not grow with the video's frames (only its wave, 64 kB/s)."""
    import tracemalloc

    side = 128  # 0.8 MB of frames per second of video at 16 fps, against 64 kB of wave

    def run_task(seconds: float, **overrides) -> tuple[int, list[dict]]:
        video = _long_video(tmp_path, seconds, name=f"long{seconds:g}")
        batch = {k: np.array([v], object) for k, v in _item(video).items()}
        cfg = _config(str(tmp_path), str(tmp_path / "out"), width=side, height=side, **overrides)
        tracemalloc.start()
        try:
            summaries = list(udfs.process_videos(batch, cfg, str(tmp_path / "shards")))
            return tracemalloc.get_traced_memory()[1], summaries
        finally:
            tracemalloc.stop()

    run_task(1.0, decode_window_mb=1.0)  # first-call imports (pyarrow.parquet...) must not count
    whole_peak, whole = run_task(10.0)
    short_peak, windowed = run_task(10.0, decode_window_mb=1.0)  # 21 frames a window
    long_peak, _ = run_task(30.0, decode_window_mb=1.0)
    assert len(whole) == 1 and len(windowed) >= 7
    assert sum(len(s["clip_index"]) for s in windowed) == len(whole[0]["clip_index"]) == 20
    assert all(s["shard"].all() for s in windowed)  # every window written
    assert short_peak < whole_peak / 2, (short_peak, whole_peak)
    frames_added = 20 * 16 * side * side * 3  # 20 s more: 15.7 MB more frames
    assert long_peak - short_peak < frames_added / 4, (short_peak, long_peak)


def test_streamed_windows_go_through_the_vae_pool(ray_local, tmp_path, tiny_vae):
    from model.vae import load_vae

    inputs = tmp_path / "in"
    inputs.mkdir()
    video = _long_video(inputs, 3.0)  # 48 frames: 6 clips, streamed 12 frames at a time
    cfg = _config(str(inputs), str(tmp_path / "out"), decode_window_mb=WINDOW_12_FRAMES,
                  vae={"enabled": True, "path": str(tiny_vae), "batch_size": 4})
    assert run(cfg)["clips_written"] == 6
    _, ds = _read_shards(ray_local, Storage(), cfg.output)
    rows = sorted(ds.take_all(), key=lambda r: r["clip_index"])
    whole = udfs.decode_clips(_item(video), _config("in", "out"))
    assert [r["clip_index"] for r in rows] == list(range(6))
    vae = load_vae(str(tiny_vae))
    for row, expected in zip(rows, whole, strict=True):
        np.testing.assert_array_equal(row["frames"], expected["frames"])
        np.testing.assert_array_equal(row["ref_frame"], expected["ref_frame"])
        np.testing.assert_allclose(row["latents"], vae.encode(row["frames"][None])[0].numpy(), atol=1e-4)


def test_a_cut_long_video_keeps_the_clips_before_the_cut(ray_local, tmp_path):
    video = _long_video(tmp_path, 4.0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    faststart, cut = tmp_path / "faststart.mp4", inputs / "cut.mp4"
    _ffmpeg("-i", str(video), "-c", "copy", "-movflags", "+faststart", str(faststart))
    cut.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * 0.6)])
    shutil.copy(video.with_suffix(".json"), cut.with_suffix(".json"))
    cfg = _config(str(inputs), str(tmp_path / "out"), decode_window_mb=WINDOW_12_FRAMES)
    rows = udfs.decode_clips(_item(cut), cfg)
    good, [error] = rows[:-1], rows[-1:]
    assert 0 < len(good) < 8 and all(not r["error_stage"] for r in good)
    assert error["error_stage"] == "decode" and "truncated" in error["error_reason"]
    summary = run(cfg)  # the job: a partial video, its clips written, the cut in the error rows
    assert (summary["videos_partial"], summary["clips_written"], summary["error_rows"]) == (1, len(good), 1)
    [row] = _read_errors(Storage(cfg.storage), cfg.output, summary["run"])
    assert row["stage"] == "decode" and "truncated" in row["reason"]
    with pytest.raises(MediaError):
        decode_video(cut, FPS, (SIZE, SIZE))  # decoded whole, the same file is an error with no clips


def test_step_timings_account_for_the_task_and_sum_over_rows(videos, tmp_path):
    """Each step's seconds are spread over the task's rows; their sum is (nearly) the task's wall time."""
    import time

    cfg = _config(str(videos), str(tmp_path))
    names = ["good0", "garbage", "good1"]  # an error row takes its share too
    batch = {"source": np.array([str(videos / f"{n}.mp4") for n in names], object),
             "sidecar": np.array([str(videos / f"{n}.json") if n != "garbage" else "" for n in names], object),
             "size": np.zeros(3, np.int64), "mtime": np.zeros(3, np.int64)}
    start = time.perf_counter()
    [summary] = udfs.process_videos(batch, cfg, str(tmp_path))  # videos this short: one batch for the task
    wall = time.perf_counter() - start
    assert list(summary["error_stage"]) == ["", "", "probe", "", ""]
    models = [udfs.TIMING_PREFIX + step for step in udfs.MODEL_STEPS]
    for column in models:  # the pose/face models: not run, the sidecars give keypoints and boxes
        assert summary[column].shape == (5,) and not summary[column].any()
    columns = [c for c in summary if c.startswith(udfs.TIMING_PREFIX) and c not in models]
    assert [c.removeprefix(udfs.TIMING_PREFIX) for c in columns] == list(CPU_STEPS)
    for column in columns:  # one value per row, all equal within the task
        assert summary[column].shape == (5,) and np.ptp(summary[column]) == 0 and summary[column][0] > 0
    timed = sum(summary[c].sum() for c in columns)
    assert 0.9 * wall <= timed <= wall


def test_motion_mask_marks_both_neighbours_and_pools():
    frames = np.zeros((1, 5, 8, 8, 3), np.uint8)
    frames[0, 2, 0, 0, 1] = 255  # one pixel lights up in frame 2 only
    mask = stages.motion_mask(frames, delta=0.1, factor=4)
    assert mask.shape == (1, 5, 2, 2) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask[0, :, 0, 0], [0, 1 / 16, 1 / 16, 1 / 16, 0])
    assert mask[0, :, 1:, :].sum() == 0 and mask[0, :, :, 1:].sum() == 0
    frames[0, 2, 0, 0, 1] = 20  # below delta * 255 = 25.5
    assert stages.motion_mask(frames, delta=0.1, factor=4).sum() == 0


def _motion_mask_reference(frames: np.ndarray, delta: float, factor: int) -> np.ndarray:
    """The DanceLCM mask written plainly, whole clips at once in int16: the chunked stage must equal it."""
    diff = np.abs(np.diff(frames.astype(np.int16), axis=1)).max(axis=-1) > np.floor(delta * 255.0)
    moving = np.zeros(frames.shape[:-1], bool)
    moving[:, :-1] |= diff
    moving[:, 1:] |= diff
    b, t, h, w = moving.shape
    return moving.reshape(b, t, h // factor, factor, w // factor, factor).mean(axis=(3, 5), dtype=np.float32)


@pytest.mark.parametrize("shape, factor", [((3, 5, 16, 24), 4), ((2, 1, 8, 8), 4), ((1, 9, 16, 32), 8),
                                           ((2, 4, 32, 32), 16)])
@pytest.mark.parametrize("chunk_bytes", [1, 2000, 1 << 22])  # one frame, a few frames, everything per chunk
def test_motion_mask_chunks_match_the_whole_clip_formula(shape, factor, chunk_bytes):
    rng = np.random.default_rng(sum(shape))
    frames = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    frames[:, :, : shape[2] // 2] = frames[:, :1, : shape[2] // 2]  # a still half, so not every pixel moves
    frames[:, :, -2:] = np.clip(frames[:, :1, -2:].astype(int) + rng.integers(-12, 13, frames[:, :, -2:].shape),
                                0, 255)  # +-12 around delta * 255 = 10.2: both sides of the threshold
    mask = stages.motion_mask(frames, 0.04, factor, chunk_bytes=chunk_bytes)
    np.testing.assert_array_equal(mask, _motion_mask_reference(frames, 0.04, factor))
    assert mask.mean() < 1 and (mask.mean() > 0) == (shape[1] > 1)  # a one-frame clip has no neighbour


def test_clip_starts_geometry_and_tracks():
    np.testing.assert_array_equal(stages.clip_starts(20, 8, 4), [0, 4, 8, 12])
    assert len(stages.clip_starts(7, 8, 8)) == 0
    scale, tx, ty = stages.fit_transform((128, 64), (64, 64), "crop")  # cover: x2 height -> 128 wide, crop 64
    assert (scale, tx, ty) == (1.0, -32.0, 0.0)
    assert stages.fit_transform((128, 64), (64, 64), "pad") == (0.5, 0.0, 16.0)
    np.testing.assert_array_equal(stages.resample_track(np.arange(30), 30.0, 15.0, 5), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(stages.slice_audio(np.arange(10, dtype=np.float32), 8, 4, 16.0, 16),
                                  [8, 9, 0, 0])  # 1 sample per frame; zero-padded past the end


def test_face_track_fill_smooth_crop_and_no_face():
    boxes = np.array([[10, 10, 20, 20], [np.nan] * 4, [14, 10, 24, 20]], np.float32)
    filled, found = stages.fill_missing_boxes(boxes)
    np.testing.assert_allclose(filled[1], [12, 10, 22, 20])
    assert found == pytest.approx(2 / 3)
    smoothed = stages.smooth_boxes(filled, 3)
    np.testing.assert_allclose(smoothed[1], [12, 10, 22, 20], atol=1e-5)
    np.testing.assert_allclose(smoothed[0], [(10 + 10 + 12) / 3, 10, (20 + 20 + 22) / 3, 20], atol=1e-5)
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    frames[:, 10:20, 10:20] = 200
    crops = stages.crop_faces(frames[:1], np.array([[10, 10, 20, 20]], np.float32), size=10, margin=1.0)
    assert crops.shape == (1, 10, 10, 3) and crops.min() == 200  # exactly the box
    blank = np.zeros((2, 64, 64, 3), np.uint8)
    if hasattr(cv2, "CascadeClassifier"):  # OpenCV 4.x bundles the cascade
        boxes, searched = stages.detect_faces_haar(blank)
        assert np.isnan(boxes).all() and searched.all()
    else:  # OpenCV 5 removed it: the face stage must say so (it becomes an error row, never silent)
        with pytest.raises(RuntimeError, match="no Haar cascades"):
            stages.detect_faces_haar(blank)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of (N, 4) boxes, row by row."""
    inter = np.prod(np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None), axis=1)
    return inter / (np.prod(a[:, 2:] - a[:, :2], axis=1) + np.prod(b[:, 2:] - b[:, :2], axis=1) - inter)


haar = pytest.mark.skipif(not hasattr(cv2, "CascadeClassifier"), reason="OpenCV 5 has no Haar cascades")


def _face_batch(clips: np.ndarray, boxes: np.ndarray | None = None, has_boxes: list[bool] | None = None) -> dict:
    """The face stage's input as decoding makes it: clip 0 of one video per row (uint8 (B, T, H, W, 3)),
    sidecar boxes (B, T, 4) where `has_boxes`, the reference = each clip's first frame with the sidecar's
    first-frame box (NaN without one)."""
    count = len(clips)
    boxes = np.full((count, T, 4), np.nan, np.float32) if boxes is None else boxes
    has_boxes = np.array([False] * count if has_boxes is None else has_boxes)
    ref_boxes = np.where(has_boxes[:, None], boxes[:, 0], np.nan).astype(np.float32)
    return {"source": np.array([f"v{i}.mp4" for i in range(count)], object), "video_id": np.array([f"v{i}" for i in range(count)], object),
            "clip_index": np.zeros(count, np.int64), "frames": clips, "ref_frame": clips[:, 0].copy(),
            "face_boxes": boxes, "has_face_boxes": has_boxes, "ref_face_box": ref_boxes,
            "error_stage": np.array([""] * count, object), "error_reason": np.array([""] * count, object)}


@haar
@pytest.mark.parametrize("height,width", [(240, 416), (64, 64)])
def test_haar_face_track_follows_a_moving_face(height, width):
    frames, truth = face_track_clip(12, height, width)
    whole, searched = stages.detect_faces_haar(frames, track_search=0)  # the whole frame, every frame
    assert searched.all() and _iou(whole, truth).min() > 0.8  # the fixture is a face to the cascade
    tracked, _ = stages.detect_faces_haar(frames)
    assert _iou(tracked, whole).min() > 0.9  # searching near the last face finds the same face
    sparse, searched = stages.detect_faces_haar(frames, every=4)
    assert np.flatnonzero(searched).tolist() == [0, 4, 8, 11]
    assert np.isnan(sparse[~searched]).all() and np.isfinite(sparse[searched]).all()
    filled, found = stages.fill_missing_boxes(sparse)
    assert found == pytest.approx(4 / 12) and _iou(filled, truth).min() > 0.75
    with pytest.raises(ValueError, match="every >= 1"):
        stages.detect_faces_haar(frames, every=0)
    with pytest.raises(ValueError, match="leaves the"):
        face_track_clip(2, height, width, side=(0.5, 0.5), path=((0.1, 0.5), (0.1, 0.5)))


@haar
def test_haar_track_keeps_its_face_until_lost_then_takes_the_largest():
    frames, small = face_track_clip(10, 240, 416, side=(0.3, 0.3), path=((0.25, 0.5), (0.3, 0.5)))
    frames[4:, 40:190, 250:400] = frontal_face(150)[..., None]  # a larger face appears on frame 4
    big = np.array([250, 40, 400, 190], np.float32)
    frames[8:, :, :200] = 128  # and the first one is gone from frame 8
    tracked, _ = stages.detect_faces_haar(frames)
    whole, _ = stages.detect_faces_haar(frames, track_search=0)
    assert _iou(tracked[:8], small[:8]).min() > 0.8  # one face followed through the clip
    assert _iou(whole[4:], np.tile(big, (6, 1))).min() > 0.8  # frame by frame, the largest face wins
    assert _iou(tracked[8:], np.tile(big, (2, 1))).min() > 0.8  # lost: the whole frame is searched again


@haar
def test_haar_track_stops_once_the_clip_cannot_have_a_face():
    frames, truth = face_track_clip(T, SIZE, SIZE)
    frames[:5] = 128  # a face on the last 3 of 8 frames only: 3/8 < min_detect_fraction 0.5
    full, _ = stages.detect_faces_haar(frames)
    stopped, searched = stages.detect_faces_haar(frames, min_found=0.5)
    assert np.isfinite(full[5:]).all() and searched.all()
    assert np.isnan(stopped).all()  # after the 5th miss no search could reach 0.5: frames 5-7 never searched
    half = face_track_clip(T, SIZE, SIZE)[0]
    half[:4] = 128  # exactly half the frames have a face: 0.5 is still reachable after 4 misses
    kept, _ = stages.detect_faces_haar(half, min_found=0.5)
    assert np.isnan(kept[:4]).all() and np.isfinite(kept[4:]).all()
    out = add_face_track(_face_batch(frames[None]), _config("in", "out"))  # the stage passes min_detect_fraction
    assert not out["has_face"][0] and not out["face_crops"].any()
    # the reference (frame 0) is blank: no reference face either, a zero crop and a NaN box
    assert not out["has_ref_face"][0] and not out["ref_face_crop"].any() and np.isnan(out["ref_face_box"]).all()


@haar
def test_face_stage_haar_counts_detections_over_searched_frames():
    """No sidecar boxes: the detector runs while decoding (`udfs._Detections`), the face stage fills,
    smooths and counts; frames Haar skipped take the nearest searched frame's box."""
    frames, truth = face_track_clip(T, SIZE, SIZE)
    sidecar = {"keypoints": np.zeros((T, 17, 3)).tolist()}  # the pose model is not under test

    def face_stage(clip: np.ndarray, **face) -> dict:
        cfg = _config("in", "out", face={"detector": "haar", **face}, audio={"allow_silent": True})
        return udfs.clips_from_frames("v0.mp4", sidecar, clip, None, cfg)

    sparse = face_stage(frames, detect_every=4)  # 3 of 8 frames searched, a face on each
    assert sparse["has_face"][0] and _iou(sparse["face_boxes"][0], truth).min() > 0.7
    # no sidecar: the reference's face is the Haar detection on the reference frame, cut by reference_face
    assert sparse["has_ref_face"][0] and _iou(sparse["ref_face_box"], truth[:1]).min() > 0.8
    expected = reference_face(frames[0], _config("in", "out", face={"detector": "haar"}).face)
    np.testing.assert_array_equal(sparse["ref_face_crop"][0], expected.crop)
    np.testing.assert_array_equal(sparse["ref_face_box"][0], expected.box)
    mostly_blank = frames.copy()
    mostly_blank[[1, 2, 3, 5, 6]] = 128
    assert not face_stage(mostly_blank)["has_face"][0]  # 3 of 8 < min_detect_fraction 0.5
    assert face_stage(mostly_blank, detect_every=4)["has_face"][0]  # the searched 0, 4, 7 all have it


def test_face_stage_sidecar_boxes_and_no_face_flag():
    cfg = _config("in", "out", face={"detector": "none"})
    frames = np.full((2, T, SIZE, SIZE, 3), 90, np.uint8)
    boxes = np.tile(np.array([16, 16, 48, 48], np.float32), (2, T, 1))
    batch = _face_batch(frames, boxes, [True, False])
    out = add_face_track(dict(batch), cfg)
    assert out["has_face"].tolist() == [True, False] and list(out["error_stage"]) == ["", ""]
    assert out["face_crops"].shape == (2, T, 32, 32, 3)
    assert (out["face_crops"][0] == 90).mean() > 0.9 and not out["face_crops"][1].any()
    np.testing.assert_allclose(out["face_boxes"][0], boxes[0])
    np.testing.assert_array_equal(out["face_boxes"][1], 0)
    assert out["has_ref_face"].tolist() == [True, False]  # sidecar box on the reference; none and no detector
    np.testing.assert_array_equal(out["ref_face_box"][0], boxes[0, 0])
    assert np.isnan(out["ref_face_box"][1]).all()
    np.testing.assert_array_equal(out["ref_face_crop"][0], reference_face(frames[0, 0], cfg.face, boxes[0, 0]).crop)
    assert not out["ref_face_crop"][1].any()
    haar = add_face_track({**batch, "error_stage": np.array(["", ""], object)}, _config("in", "out"))
    if not hasattr(cv2, "CascadeClassifier"):
        assert list(haar["error_stage"]) == ["", "face"] and "no Haar cascades" in haar["error_reason"][1]


def _bright_spot_pose_model(path: Path, input_size: tuple[int, int] = (192, 256), split_ratio: int = 2) -> None:
    """A real ONNX graph with RTMPose's SimCC interface that puts all 17 joints on the brightest spot.

    input (N, 3, H, W) -> simcc_x (N, 17, W * r), simcc_y (N, 17, H * r): the channel mean's column and
    row maxima, each repeated r times. No trained pose model is reachable here; this one has known
    answers, so the extractor's letterbox, onnxruntime call, decoding and mapping back are checked.
    """
    import onnx
    from onnx import TensorProto, helper

    width, height = input_size

    def ints(name: str, values: list[int]):
        return helper.make_tensor(name, TensorProto.INT64, [len(values)], values)

    nodes = [helper.make_node("ReduceMean", ["input", "axis1"], ["gray"], keepdims=0),  # (N, H, W)
             helper.make_node("ReduceMax", ["gray", "axis1"], ["columns"], keepdims=0),  # (N, W)
             helper.make_node("ReduceMax", ["gray", "axis2"], ["rows"], keepdims=0)]  # (N, H)
    for name, out in (("columns", "simcc_x"), ("rows", "simcc_y")):
        nodes += [helper.make_node("Unsqueeze", [name, "last"], [f"{name}1"]),  # (N, L, 1)
                  helper.make_node("Concat", [f"{name}1"] * split_ratio, [f"{name}r"], axis=-1),  # (N, L, r)
                  helper.make_node("Reshape", [f"{name}r", f"{name}_shape"], [f"{name}_flat"]),  # (N, 1, L * r)
                  helper.make_node("Expand", [f"{name}_flat", "joints"], [out])]  # (N, 17, L * r)
    constants = [ints("axis1", [1]), ints("axis2", [2]), ints("last", [-1]), ints("joints", [1, 17, 1]),
                 ints("columns_shape", [0, 1, width * split_ratio]), ints("rows_shape", [0, 1, height * split_ratio])]
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "bright_spot_pose", [tensor("input", TensorProto.FLOAT, ["N", 3, height, width])],
                              [tensor("simcc_x", TensorProto.FLOAT, ["N", 17, width * split_ratio]),
                               tensor("simcc_y", TensorProto.FLOAT, ["N", 17, height * split_ratio])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _dot_frames(points: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    """One soft white dot per frame at each (x, y) pixel position on black: uint8 (T, H, W, 3)."""
    frames = np.zeros((len(points), height, width, 3), np.uint8)
    for frame, (x, y) in zip(frames, points):
        cv2.circle(frame, (int(round(x * 16)), int(round(y * 16))), 3 * 16, (255, 255, 255), -1, cv2.LINE_AA, 4)
        frame[:] = cv2.GaussianBlur(frame, (0, 0), 1.5)
    return frames


def test_pose_extractor_decoding_and_missing_onnxruntime(tmp_path, monkeypatch):
    simcc_x = np.zeros((1, 17, 384), np.float32)
    simcc_y = np.zeros((1, 17, 512), np.float32)
    simcc_x[0, :, 100], simcc_y[0, :, 50] = 0.9, 0.7
    np.testing.assert_allclose(decode_simcc(simcc_x, simcc_y)[0, 0], [50, 25, 0.7])
    heat = np.zeros((1, 17, 64, 48), np.float32)
    heat[0, 3, 10, 20] = 0.8
    np.testing.assert_allclose(decode_heatmaps(heat, (192, 256))[0, 3], [20.5 * 4, 10.5 * 4, 0.8])
    with pytest.raises(FileNotFoundError):
        OnnxPoseExtractor(str(tmp_path / "pose.onnx"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the optional extra not installed: a clear error
    with pytest.raises(ImportError, match=r"pip install 'human-animation-platform\[pose\]'"):
        OnnxPoseExtractor(str(tmp_path / "pose.onnx"))


@pytest.mark.parametrize("height,width", [(64, 64), (48, 96), (96, 40)])
def test_onnx_pose_extractor_runs_a_real_model_through_onnxruntime(tmp_path, height, width):
    _bright_spot_pose_model(tmp_path / "pose.onnx")
    points = [(0.3 * width, 0.6 * height), (0.8 * width, 0.15 * height), (0.15 * width, 0.85 * height)]
    keypoints = OnnxPoseExtractor(str(tmp_path / "pose.onnx"))(_dot_frames(points, height, width))
    assert keypoints.shape == (3, 17, 3) and keypoints.dtype == np.float32
    truth = np.repeat(np.array(points, np.float32)[:, None], 17, axis=1)
    np.testing.assert_allclose(keypoints[..., :2], truth, atol=1.0)  # letterboxed in, mapped back to frame pixels
    assert (keypoints[..., 2] > 1.0).all()  # the peak's normalised intensity: well above pose's conf threshold


def test_job_extracts_pose_with_an_onnx_model_from_s3(ray_local, s3_bucket, storage, tmp_path):
    _bright_spot_pose_model(tmp_path / "pose.onnx")
    storage.upload_file(tmp_path / "pose.onnx", f"{s3_bucket}/models/pose.onnx")
    path = [(10 + 2.5 * t, 50 - 2 * t) for t in range(16)]  # 1 s: a dot moving up and right
    mux_mp4(_dot_frames(path, SIZE, SIZE), np.zeros(16000, np.float32), FPS, tmp_path / "dot.mp4")
    storage.upload_file(tmp_path / "dot.mp4", f"{s3_bucket}/raw/dot.mp4")  # no sidecar: pose from the model
    cfg = _config(f"{s3_bucket}/raw", f"{s3_bucket}/shards", storage=storage.cfg,
                  pose={"extractor": "onnx", "model_path": f"{s3_bucket}/models/pose.onnx"})
    summary = run(cfg)
    assert (summary["videos_ok"], summary["clips_written"], summary["error_rows"]) == (1, 2, 0)
    _, ds = _read_shards(ray_local, storage, cfg.output)
    for row in ds.take_all():
        window = np.array(path[row["start_frame"]:row["start_frame"] + T], np.float32)
        np.testing.assert_allclose(row["keypoints"][..., :2], np.repeat(window[:, None], 17, axis=1), atol=1.5)
        np.testing.assert_array_equal(row["pose"], render_pose(row["keypoints"], SIZE, SIZE))


def test_config_validation_and_tiny_example():
    cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml")
    assert (cfg.clip_frames, cfg.stride, cfg.width, cfg.fit, cfg.face.size) == (8, 8, 64, "crop", 32)
    with pytest.raises(ConfigError, match="fit"):
        load_config(PreprocessConfig, None, ["input=a", "output=b", "fit=stretch"])
    with pytest.raises(ConfigError, match="not a multiple of latent_spatial_factor"):
        load_config(PreprocessConfig, None, ["input=a", "output=b", "width=66"])
    with pytest.raises(ConfigError, match="model_path"):
        load_config(PreprocessConfig, None, ["input=a", "output=b", "pose.extractor=onnx"])


def test_one_run_decode_failure_is_attributed_to_the_stream_at_fault(tmp_path):
    """Video and audio decode in one ffmpeg run; when it fails, the error row still names the stage."""
    from ray_jobs.preprocess.udfs import decode_clips

    frames = np.zeros((32, SIZE, SIZE, 3), np.uint8)
    frames[:, :, : SIZE // 2] = 200
    clip, faststart, cut = tmp_path / "clip.mp4", tmp_path / "faststart.mp4", tmp_path / "cut.mp4"
    mux_mp4(frames, np.sin(np.arange(32000) / 9).astype(np.float32) * 0.3, fps=FPS, out_path=clip)
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-i", str(clip), "-c", "copy", "-movflags", "+faststart",
                    str(faststart)], check=True)
    cut.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * 0.75)])  # opens, decodes short
    cfg = _config(str(tmp_path), str(tmp_path / "out"))
    good = decode_clips({"source": str(clip), "sidecar": "", "size": 0, "mtime": 0}, cfg)
    assert len(good) == 32 // T and all(r["error_stage"] == "" and r["has_audio"] for r in good)
    bad = decode_clips({"source": str(cut), "sidecar": "", "size": 0, "mtime": 0}, cfg)
    assert len(bad) == 1 and bad[0]["error_stage"] == "decode" and "truncated" in bad[0]["error_reason"]


def test_split_rule_without_sidecars_is_deterministic_and_keeps_identities_together():
    from ray_jobs.preprocess.config import SplitConfig
    from ray_jobs.preprocess.job import check_compatible
    from ray_jobs.preprocess.stages import assign_split

    rule = SplitConfig(heldout_fraction=0.3)
    keys = [f"video{i}" for i in range(200)]
    splits = [assign_split(None, "unknown", k, rule) for k in keys]
    assert 0.2 < splits.count("heldout") / len(keys) < 0.4 and set(splits) == {"train", "heldout"}
    assert splits == [assign_split(None, "", k, SplitConfig(heldout_fraction=0.3)) for k in keys]  # deterministic
    assert len({assign_split(None, "dancer7", k, rule) for k in keys}) == 1  # the identity is the key when known
    assert [assign_split(None, "unknown", k, SplitConfig(heldout_fraction=0.3, salt="b")) for k in keys] != splits
    assert assign_split("heldout", "unknown", "video0", rule) == "heldout"  # a sidecar's split wins by default
    assert assign_split("unknown", "unknown", "video0", rule) == splits[0]  # an invalid one does not
    listed = SplitConfig(use_sidecar=False, heldout=["video3"])
    assert assign_split("heldout", "unknown", "video0", listed) == "train"
    assert assign_split("train", "unknown", "video3", listed) == "heldout"
    # one output keeps one rule: a video must not move between train and heldout across runs
    cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml", {"input": "in", "output": "out"})
    manifest = {"config": cfg.model_dump(mode="json")}
    check_compatible(cfg, manifest)
    with pytest.raises(ValueError, match="split rule"):
        check_compatible(cfg.model_copy(update={"split": SplitConfig(salt="other")}), manifest)


def test_clips_of_a_video_without_a_split_in_its_sidecar_get_the_rules_split():
    from ray_jobs.preprocess.config import SplitConfig
    from ray_jobs.preprocess.stages import assign_split

    video = generate_video(SyntheticConfig(out="unused", duration=1.0, seed=3), 0)
    sidecar = {k: v for k, v in video.sidecar.items() if k not in ("split", "identity_id", "video_id")}
    for rule in (SplitConfig(heldout=["v0"]), SplitConfig(heldout_fraction=0.5)):
        cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                          {"input": "in", "output": "out", "split": rule.model_dump()})
        clips = udfs.clips_from_frames("v0.mp4", sidecar, video.frames, video.audio, cfg)
        assert len(clips["split"]) >= 1 and set(clips["split"]) == {assign_split(None, "unknown", "v0", rule)}
    assert set(clips["identity_id"]) == {"unknown"}


# ------------------------------------------------------------------ latent-first shards (store_pixels)
def _tiny_clips(split: str, **overrides) -> tuple[dict, PreprocessConfig]:
    """The CPU stages' clips of one 1 s synthetic video at the tiny geometry, all of `split`."""
    video = generate_video(SyntheticConfig(out="unused", duration=1.0, seed=5), 0)
    cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                      {"input": "in", "output": "out", "vae": {"enabled": False}, **overrides})
    return udfs.clips_from_frames("v0.mp4", {**video.sidecar, "split": split}, video.frames, video.audio, cfg), cfg


def _write_output(root: Path, clips: dict, cfg: PreprocessConfig) -> str:
    """`udfs.write_shard` into root/run-0001/shards and a manifest as the job writes it (one run)."""
    from ray_jobs.preprocess.job import _schema_doc

    summary = udfs.write_shard({k: v.copy() if isinstance(v, np.ndarray) else v for k, v in clips.items()},
                               cfg, str(root / "run-0001" / "shards"))
    manifest = {"runs": [{"run": "run-0001"}], "shards": [f"run-0001/shards/{summary['shard'][0]}"],
                "config": cfg.model_dump(mode="json"), "store_pixels": cfg.stores_pixels, "schema": _schema_doc(cfg)}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root / manifest["shards"][0])


def test_store_pixels_auto_keeps_tiny_shards_as_they_were_and_drops_real_preset_pixels(tmp_path):
    from artifacts.shards import PIXEL_COLUMNS

    clips, cfg = _tiny_clips("train")
    assert cfg.store_pixels is None and cfg.stores_pixels  # auto: tiny keeps its pixels
    real = cfg.model_copy(update={"width": 832, "height": 480, "clip_frames": 81})
    assert not real.stores_pixels and real.model_copy(update={"store_pixels": True}).stores_pixels
    good = {c: np.asarray(clips[c]) for c in udfs.SHARD_COLUMNS}
    tmp = tmp_path
    with_pixels = Path(_write_output(tmp, clips, cfg)).read_bytes()
    assert with_pixels == shards.parquet_bytes(good, cfg.shard_compression)  # bit-identical to before the option
    lean_cfg = cfg.model_copy(update={"store_pixels": False})
    lean, _ = _tiny_clips("train", store_pixels=False)
    assert not lean["pose"].any() and clips["pose"].any()  # train maps are never drawn without pixels
    assert np.array_equal(lean["keypoints"], clips["keypoints"]) and np.array_equal(lean["frames"], clips["frames"])
    import pyarrow.parquet as pq

    table = pq.read_table(_write_output(tmp / "lean", lean, lean_cfg))
    assert {c: table.column(c).null_count for c in PIXEL_COLUMNS} == {c: len(clips["split"]) for c in PIXEL_COLUMNS}
    assert table.schema.field("frames").nullable and not table.schema.field("keypoints").nullable
    assert shards.tensor_column_schema(table.schema, ["pose"]) == {"pose": (np.dtype(np.uint8), (T, SIZE, SIZE, 3))}
    assert np.array_equal(shards.table_to_numpy(table)["motion_mask"], clips["motion_mask"])
    lean_bytes = (tmp / "lean" / json.loads((tmp / "lean" / "manifest.json").read_text())["shards"][0]).stat().st_size
    assert lean_bytes < len(with_pixels) / 3, (lean_bytes, len(with_pixels))
    manifest = json.loads((tmp / "lean" / "manifest.json").read_text())
    assert manifest["store_pixels"] is False and "null in train rows" in manifest["schema"]["frames"]
    from ray_jobs.preprocess.job import check_compatible

    with pytest.raises(ValueError, match="store_pixels=False"):
        check_compatible(cfg.model_copy(update={"output": "out"}), manifest)


def test_pose_maps_drawn_on_the_worker_equal_the_stored_ones_bitwise(ray_local, tmp_path):
    """Train clips without pixels read through `read_shards` as keypoints + canvas; `Conditions.from_batch`
    draws the maps on the worker, and they equal the maps a store_pixels=true run stored, bit for bit."""
    import torch

    from artifacts.shards import data_card, read_shards, take_clips
    from model.conditions import Conditions
    from model.pose import render_pose_batch
    from ray_jobs.training.teacher_objective import TRAIN_COLUMNS

    stored, cfg = _tiny_clips("train")
    assert np.array_equal(render_pose_batch(stored["keypoints"], SIZE, SIZE, cfg.pose.render_conf_threshold),
                          stored["pose"])
    lean, lean_cfg = _tiny_clips("train", store_pixels=False, pose={"render_conf_threshold": 0.5})
    lean["keypoints"][:, :, 5:11, 2] = 0.4  # arms under this data's threshold, above the default's
    _write_output(tmp_path, {**lean, "split": np.array(["heldout"] + ["train"] * (len(lean["split"]) - 1),
                                                      dtype=object)}, lean_cfg)
    card = data_card(str(tmp_path), Storage())
    assert (card.store_pixels, card.pose_conf_threshold, card.frames.height) == (False, 0.5, SIZE)
    columns = [c for c in TRAIN_COLUMNS if c not in ("latents", "ref_latent", "ref_face_latent")]
    batch = read_shards(str(tmp_path), Storage(), "train", columns).take_batch(8, batch_format="numpy")
    assert "pose" not in batch and set(batch["pose_height"]) == {SIZE} and set(batch["pose_conf_threshold"]) == {0.5}
    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    drawn = Conditions.from_batch({**tensors, "ref_latent": torch.zeros(len(batch["keypoints"]), 1)}).pose
    want = render_pose_batch(lean["keypoints"][1:], SIZE, SIZE, 0.5)
    assert want.any() and not np.array_equal(want, stored["pose"][1:])  # the threshold matters
    from_stored = Conditions.from_batch({"ref_latent": torch.zeros(len(want), 1), "pose": torch.from_numpy(want)}).pose
    assert torch.equal(drawn, from_stored)
    with pytest.raises(ValueError, match=r"no \['frames'\]"):
        read_shards(str(tmp_path), Storage(), "train", ["frames", "keypoints"])
    heldout = take_clips(str(tmp_path), Storage(), "heldout", 1)[0]
    assert np.array_equal(heldout["frames"], lean["frames"][0]) and heldout["pose"].shape == (T, SIZE, SIZE, 3)
    train = take_clips(str(tmp_path), Storage(), "train", 1)[0]
    assert "frames" not in train and "pose" not in train and np.array_equal(train["keypoints"], lean["keypoints"][1])


def test_plain_videos_without_sidecars_get_splits_pose_and_faces(raw_data):
    """Sidecar-less synthetic MP4s: the split rule assigns splits (recorded in the manifest), BlazePose's
    keypoints and BlazeFace's boxes, found on the 128x96 detection stream and mapped into the 64x64 crop,
    land on the removed sidecars' truth (mapped the same way). The teacher trains on these shards in
    test_train_teacher.py::test_sequence_parallel_run_trains_and_resumes."""
    from artifacts.shards import take_clips

    shards = Path(raw_data["shards"])
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["config"]["split"]["heldout"] == raw_data["heldout"]
    assert raw_data["summary"]["stage_seconds"]["pose_model"] > 0 and raw_data["summary"]["stage_seconds"]["face_model"] > 0
    rows = [row for split in ("train", "heldout") for row in take_clips(str(shards), Storage(), split, limit=100)]
    assert {r["video_id"]: r["split"] for r in rows} == {v: "heldout" if v in raw_data["heldout"] else "train"
                                                         for v in raw_data["truth"]}
    assert {r["identity_id"] for r in rows} == {"unknown"}
    scale, tx, ty = stages.fit_transform((128, 96), (SIZE, SIZE), "crop")
    errors, ious, faces = [], [], []
    for row in rows:
        truth = np.asarray(raw_data["truth"][row["video_id"]]["keypoints"], np.float32)[row["start_frame"]:][:T]
        keypoints = np.asarray(row["keypoints"], np.float32)
        seen = keypoints[..., 2] > 0.5
        inside = (truth[..., 0] * scale + tx > 0) & (truth[..., 0] * scale + tx < SIZE)  # not cropped away
        errors.append(np.linalg.norm(keypoints[..., :2] - (truth[..., :2] * scale + [tx, ty]), axis=-1)[seen & inside])
        boxes = np.asarray(raw_data["truth"][row["video_id"]]["face_boxes"], np.float32)[row["start_frame"]:][:T]
        faces.append(row["has_face"])
        if row["has_face"]:
            found = np.asarray(row["face_boxes"], np.float32)
            ious.append(np.mean([_iou(found[t:t + 1], boxes[t:t + 1] * scale + [tx, ty, tx, ty])[0] for t in range(T)]))
    errors = np.concatenate(errors)
    print(f"raw videos: keypoint error median {np.median(errors):.2f} px over {len(errors)} joints, "
          f"has_face {np.mean(faces):.2f}, face IoU median {np.median(ious):.2f}")
    assert len(errors) > 0.5 * len(rows) * T * 17 * 0.5  # most joints of most frames seen
    assert np.median(errors) < 3.0, np.median(errors)  # px at 64x64 (the puppets' joints, BlazePose on cartoons)
    assert np.mean(faces) >= 0.75 and np.median(ious) > 0.3, (np.mean(faces), ious)


def test_detection_stream_geometry():
    """The models see the source at its aspect, long side detection_long_side, never upscaled; clip frames
    already that large are used instead of a second decode (no mapping then)."""
    from types import SimpleNamespace

    from core.media import detection_size

    assert detection_size((1280, 720), 512) == (512, 288) and detection_size((128, 96), 512) == (128, 96)
    assert detection_size((1080, 1920), 512) == (288, 512)  # portrait phone video
    real = PreprocessConfig(input="in", output="out", width=832, height=480, latent_spatial_factor=8)
    hd = udfs._Detections(real, SimpleNamespace(width=1280, height=720), {})
    assert hd.needed and hd.reuses_clip_frames and hd.transform == (1.0, 0.0, 0.0)
    tiny = udfs._Detections(_config("in", "out"), SimpleNamespace(width=128, height=96), {})
    assert not tiny.reuses_clip_frames and tiny.size == (128, 96)
    np.testing.assert_allclose(tiny.transform, (2 / 3, -32 / 3, 0.0))  # 96 -> 64 high, 85.3 wide cropped to 64
    sidecar = {"keypoints": [], "face_boxes": []}  # the sidecar gives both tracks: nothing to detect
    assert not udfs._Detections(_config("in", "out"), SimpleNamespace(width=128, height=96), sidecar).needed
