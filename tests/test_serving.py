"""The Serve app: real Ray Serve on a local Ray, real HTTP on 127.0.0.1, real MP4s, real moto S3 over HTTP.

Two applications run in one Serve instance (started once per module):
* ``/s3``: outputs on the moto S3 server, API key on, tight limits (max_ongoing 2 + max_queued 2).
* ``/local``: outputs in a local folder, no API key.
Both use the tiny preset with random init and a random tiny VAE written here (fast, and independent
of the checked-in VAE); the pixels are noise, which is all these tests need.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
import time
import wave as wavefile
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import start_ray

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
FPS = 16.0


def _png(width: int = 80, height: int = 96) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 3 % 256, yy * 2 % 256, (xx + yy) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _face_png() -> tuple[bytes, np.ndarray]:
    """A 64x64 PNG with a Haar-detectable face (`ray_jobs.synthetic.faces`) and its exact box float32 (4,)."""
    from PIL import Image

    from ray_jobs.synthetic.faces import face_track_clip

    frames, boxes = face_track_clip(1, 64, 64)
    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="PNG")
    return buf.getvalue(), boxes[0]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def _wav(seconds: float, rate: int = 22050) -> bytes:
    """A 440 Hz tone as 16-bit PCM WAV at `rate` (the server resamples to 16 kHz)."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wavefile.open(buf, "wb") as out:
        out.setnchannels(1), out.setsampwidth(2), out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buf.getvalue()


def _keypoints(frames: int) -> bytes:
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.uniform(8, 56, (frames, 17, 2)), np.ones((frames, 17, 1))], -1)
    return json.dumps(points.tolist()).encode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> str:
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_vae")
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                     temperal_downsample=[False, False]).save_pretrained(folder)
    return str(folder)


def _args(tiny_vae: str, output: str, **extra) -> dict:
    # Haar: the synthetic test face's box is Haar's (BlazeFace, the 'auto' default with its model, finds a tighter one)
    base = {"model": {"preset": "tiny", "vae_path": tiny_vae}, "output": output, "torch_threads": 1, "face": {"detector": "haar"},
            "limits": {"max_upload_bytes": 200_000, "max_steps": 8, "max_frames": 32, "max_duration_s": 2.0},
            "animator": {"min_replicas": 1, "max_replicas": 1, "max_ongoing_requests": 2, "max_queued_requests": 2,
                         "num_cpus": 0.5, "num_gpus": 0, "max_batch_size": 2}}
    base.update(extra)
    return base


@pytest.fixture(scope="module")
def serve_urls(s3_server, tiny_vae, tmp_path_factory):
    """Ray + Serve with the two apps; s3_server is requested first so Ray workers inherit its AWS env."""
    import ray
    from ray import serve

    from serving.app import build_app

    bucket = "serve-test-bucket"
    s3_server.client().create_bucket(Bucket=bucket)
    local_out = tmp_path_factory.mktemp("serve_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SERVE_TEST_API_KEY", KEY)
        start_ray("serve", num_cpus=6)  # restarts Ray so workers see SERVE_TEST_API_KEY
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        s3_args = _args(tiny_vae, f"s3://{bucket}/serve", api_key_env="SERVE_TEST_API_KEY",
                        allowed_s3_buckets=[bucket], retry_after_s=3)
        from ray.serve.api import RunTarget

        local_args = _args(tiny_vae, str(local_out))
        local_args["model"]["motion_frames"] = 2  # long requests continue chunk from chunk (trained clips: 8 frames)
        local_args["animator"]["batch_wait_timeout_s"] = 5.0  # only ever waited for while others are in flight
        local_args.update(precision="bf16", vae={"dtype": "bfloat16"})  # bf16 on CPU: the GPU default's code path
        serve.run_many([RunTarget(build_app(s3_args), name="s3", route_prefix="/s3"),  # both start in parallel
                        RunTarget(build_app(local_args), name="local", route_prefix="/local")])
        try:
            yield {"s3": f"http://127.0.0.1:{port}/s3", "local": f"http://127.0.0.1:{port}/local",
                   "bucket": bucket, "local_out": local_out, "s3_server": s3_server}
        finally:
            serve.shutdown()
            ray.shutdown()


def _post(url: str, files: dict, data: dict | None = None, key: str | None = KEY) -> requests.Response:
    headers = {"X-API-Key": key} if key else {}
    return requests.post(f"{url}/v1/animations", files=files, data=data or {}, headers=headers, timeout=120)


def _probe_mp4(content: bytes, tmp_path: Path):
    from core.media import decode_audio, decode_video, probe

    path = tmp_path / f"out{time.monotonic_ns()}.mp4"
    path.write_bytes(content)
    return probe(path), decode_video(path, FPS, (64, 64)), (decode_audio(path) if probe(path).has_audio else None)


# --------------------------------------------------------------------------- no Ray
def test_config_yaml_passes_serve_deploy_schema():
    from ray.serve.schema import ServeDeploySchema

    from core.storage import Storage
    from serving.config import ServeAppConfig, resolve_served

    for name in ("config.yaml", "config.dev.yaml"):
        data = yaml.safe_load((REPO / "serving" / name).read_text())
        schema = ServeDeploySchema.model_validate(data)
        assert schema.applications[0].import_path == "serving.app:build_app"
        cfg = ServeAppConfig.model_validate(data["applications"][0]["args"])
        assert (cfg.export is not None) == (name == "config.yaml")  # the cluster serves an export, dev a random init
    dev = ServeAppConfig.model_validate(yaml.safe_load((REPO / "serving" / "config.dev.yaml").read_text())
                                        ["applications"][0]["args"])
    served = resolve_served(dev, Storage())
    assert served.spec.kind == "consistency" and served.default_steps == 4 and (served.height, served.width) == (64, 64)
    cluster = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())["applications"][0]["args"]
    assert cluster["api_key_env"] == "ANIMATION_API_KEY" and "api_key" not in cluster
    with pytest.raises(ValueError, match="api_key_env"):
        ServeAppConfig(api_key_env="sk-literal key")


@pytest.fixture(scope="module")
def engine(tiny_vae):
    """The in-process engine: tiny preset (random init, seed 0, face path on) and the test VAE."""
    import torch

    from serving.config import ServeAppConfig
    from serving.engine import AnimationEngine

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return AnimationEngine(ServeAppConfig(model={"preset": "tiny", "vae_path": tiny_vae}, face={"detector": "haar"}))


def test_engine_batch_of_one_matches_generate(engine):
    from model.generate import generate
    from model.sampling import SamplerSpec
    from serving.inputs import AnimationRequest, decode_image

    ref = decode_image(_png(), "image", 64, 64, 10**6)
    audio = np.sin(np.arange(8000) / 10).astype(np.float32)
    one = AnimationRequest(ref, audio, None, 6, FPS, 2, seed=7)  # no face found in the gradient: the null face
    box = np.array([16, 4, 48, 36], np.float32)
    other = AnimationRequest(ref[::-1].copy(), None, np.asarray(json.loads(_keypoints(6)), np.float32), 6, FPS, 2,
                             seed=3, face_box=box)
    steps_seen = []
    batch = engine.generate_batch([one, other], [lambda d, t: steps_seen.append((d, t)), None])  # with + without a face
    direct = generate(engine.model, engine.vae, engine.conditions(one), 6, 64, 64,
                      spec=SamplerSpec(kind="consistency", steps=2), seed=7)
    alone = engine.generate_batch([other])[0]
    assert batch[0].frames.shape == (6, 64, 64, 3) and batch[0].nfe == direct.nfe == 2
    assert np.abs(batch[0].frames.astype(int) - direct.frames.numpy().astype(int)).max() <= 1
    assert np.abs(batch[1].frames.astype(int) - alone.frames.astype(int)).max() <= 1
    assert not np.array_equal(batch[0].frames, batch[1].frames)
    assert steps_seen == [(1, 2), (2, 2)]
    assert batch[0].face.as_dict() == {"source": "none", "box": None}
    assert batch[1].face.as_dict() == alone.face.as_dict() == {"source": "given", "box": [16.0, 4.0, 48.0, 36.0]}


@pytest.mark.skipif(not hasattr(__import__("cv2"), "CascadeClassifier"), reason="OpenCV 5 has no Haar cascades")
def test_engine_face_condition_is_the_given_box_else_detected_else_null(engine):
    import torch

    from model.face import crop_faces, reference_face
    from serving.inputs import AnimationRequest, decode_image

    face_png, truth = _face_png()
    faced = decode_image(face_png, "image", 64, 64, 10**6)
    plain = decode_image(_png(), "image", 64, 64, 10**6)
    box = np.array([10.0, 6.0, 42.0, 40.0], np.float32)  # deliberately not the detected face
    given = engine.conditions(AnimationRequest(faced, None, None, 4, FPS, 1, 0, face_box=box))
    crop = crop_faces(faced[None], box[None], engine.cfg.face.size, engine.cfg.face.margin)
    assert given.face.shape == (1, 16, 1, 8, 8) and given.keep_mask("face").tolist() == [True]
    assert torch.equal(given.face, engine.vae.encode(crop[:, None]).float())
    detected_face = reference_face(faced, engine.cfg.face)
    assert detected_face.found and _iou(detected_face.box, truth) > 0.8
    detected = engine.conditions(AnimationRequest(faced, None, None, 4, FPS, 1, 0))
    assert detected.keep_mask("face").tolist() == [True]
    assert torch.equal(detected.face, engine.vae.encode(detected_face.crop[None, None]).float())
    assert (detected.face - given.face).abs().max() > 1e-3  # the two crops differ, so the check can fail
    missing = engine.conditions(AnimationRequest(plain, None, None, 4, FPS, 1, 0))  # nothing to detect
    assert missing.keep_mask("face").tolist() == [False] and missing.face.shape == (1, 16, 1, 8, 8)
    assert not missing.face.any()
    [run] = engine.generate_batch([AnimationRequest(plain, None, None, 4, FPS, 1, 0)])
    assert run.frames.shape == (4, 64, 64, 3) and run.face.source == "none"


def test_job_lease_and_a_cancel_that_a_concurrent_record_write_cannot_lose(tmp_path):
    """One run at a time per job (lease), taken over only when the ingress says its replica died; a cancel
    sticks even when the running replica's read-modify-write of the record drops ``cancel_requested``."""
    from core.storage import Storage
    from serving.jobs import JobBusy, JobCancelled, JobStore

    store = JobStore(Storage(), str(tmp_path), stale_s=600)
    store.create("a" * 32, 10, {})
    assert store.claim("a" * 32, "replica-1")["attempts"] == 1
    with pytest.raises(JobBusy, match="running on replica-1"):
        store.claim("a" * 32, "replica-2")
    assert store.claim("a" * 32, "replica-2", takeover=True)["attempts"] == 2
    store.update("a" * 32, progress={"done": 1, "total": 10})
    store.cancel("a" * 32)
    store.update("a" * 32, cancel_requested=False)  # the runner's record write, read before the cancel
    with pytest.raises(JobCancelled):
        store.update("a" * 32, progress={"done": 2, "total": 10})
    with pytest.raises(JobBusy):
        store.claim("a" * 32, "replica-3", takeover=True)


# --------------------------------------------------------------------------- Serve over HTTP
def test_sync_returns_mp4_with_requested_frames_and_audio(serve_urls, tmp_path):
    response = _post(serve_urls["s3"], {"image": ("ref.png", _png(), "image/png"),
                                        "audio": ("a.wav", _wav(0.5), "audio/wav")},
                     {"fps": FPS, "steps": 2, "seed": 1})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4" and response.headers["X-Frames"] == "8"
    info, frames, audio = _probe_mp4(response.content, tmp_path)
    assert info.has_video and info.has_audio and (info.width, info.height) == (64, 64)
    assert frames.shape == (8, 64, 64, 3)
    assert abs(info.duration_s - 0.5) < 0.1
    assert abs(audio.size / 16000 - 0.5) < 0.07 and np.abs(audio).max() > 0.2  # the tone made it through AAC

    pose = _post(serve_urls["s3"], {"image": ("ref.png", _png(), "image/png"),
                                    "keypoints": ("k.json", _keypoints(6), "application/json")},
                 {"frames": 6, "fps": FPS, "steps": 2})
    assert pose.status_code == 200, pose.text
    info, frames, _ = _probe_mp4(pose.content, tmp_path)
    assert frames.shape[0] == 6 and not info.has_audio


def test_api_key_required(serve_urls):
    files = {"image": ("ref.png", _png(), "image/png")}
    for key in (None, "wrong"):
        response = _post(serve_urls["s3"], files, {"steps": 1}, key=key)
        assert response.status_code == 401 and response.json()["error"]["field"] == "X-API-Key"
    assert requests.get(f"{serve_urls['s3']}/healthz", timeout=10).status_code == 200  # health needs no key
    assert requests.get(f"{serve_urls['s3']}/readyz", timeout=10).json() == {"status": "ready"}


@pytest.mark.parametrize("files,data,status,field", [
    ({"image": ("big.png", b"\x89PNG" + b"0" * 250_000, "image/png")}, {}, 413, "image"),
    ({"image": ("x.png", b"this is not an image", "image/png")}, {}, 422, "image"),
    ({"image": ("ref.png", "PNG", "image/png"), "audio": ("a.wav", b"RIFF garbage", "audio/wav")}, {}, 422, "audio"),
    ({"image": ("ref.png", "PNG", "image/png"), "audio": ("a.wav", "WAV3S", "audio/wav")}, {}, 413, "audio"),
    ({"image": ("ref.png", "PNG", "image/png")}, {"steps": 99}, 422, "steps"),
    ({"image": ("ref.png", "PNG", "image/png")}, {"frames": "many"}, 422, "frames"),
    ({"image": ("ref.png", "PNG", "image/png")}, {"frames": 33}, 422, "frames"),
    ({"image": ("ref.png", "PNG", "image/png"), "keypoints": ("k.json", b"[[1, 2]]", "application/json")}, {}, 422, "keypoints"),
    ({"image": ("ref.png", "PNG", "image/png"), "pose_video": ("p.mp4", b"x" * 10, "video/mp4")}, {}, 422, "pose_video"),
    ({}, {"image_uri": "https://example.com/a.png"}, 422, "image_uri"),
    ({}, {"image_uri": "s3://someone-elses-bucket/a.png"}, 403, "image_uri"),
    ({}, {}, 422, "image"),
])
def test_bad_input_is_4xx_naming_the_field(serve_urls, files, data, status, field):
    replace = {"PNG": _png(), "WAV3S": _wav(3.0)}
    files = {k: (n, replace.get(c, c) if isinstance(c, str) else c, t) for k, (n, c, t) in files.items()}
    response = _post(serve_urls["s3"], files, data)
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


@pytest.mark.parametrize("box,reason", [
    ("not json", "not a JSON array"),
    ("[1, 2, 3]", "must be 4 numbers"),
    ("[0, 0, 10, NaN]", "finite"),
    ("[0, 0, Infinity, 10]", "finite"),
    ("[10, 10, 10, 30]", "positive size"),
    ("[30, 10, 20, 30]", "positive size"),
    ("[40, 0, 70, 20]", "not inside the 64x64 image"),
    ("[-1, 0, 20, 20]", "not inside the 64x64 image"),
])
def test_bad_face_box_is_422_with_the_reason(serve_urls, box, reason):
    response = _post(serve_urls["s3"], {"image": ("ref.png", _png(), "image/png")}, {"face_box": box, "steps": 1})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "face_box" and reason in error["message"], error


def test_sync_response_says_which_face_was_used(serve_urls):
    face_png, _ = _face_png()
    given = _post(serve_urls["local"], {"image": ("face.png", face_png, "image/png")},
                  {"frames": 4, "steps": 1, "face_box": "[10, 6.5, 42, 40]"}, key=None)
    assert given.status_code == 200, given.text
    assert given.headers["X-Face"] == "given" and given.headers["X-Face-Box"] == "10,6.5,42,40"
    faceless = _post(serve_urls["local"], {"image": ("ref.png", _png(), "image/png")}, {"frames": 4, "steps": 1}, key=None)
    assert faceless.status_code == 200, faceless.text  # no face found: runs with the learned null face
    assert faceless.headers["X-Face"] == "none" and "X-Face-Box" not in faceless.headers


def test_idle_replica_runs_a_lone_request_without_waiting_to_fill_a_batch(serve_urls, tmp_path):
    # /local's batch wait is 5 s; an idle replica must not spend it on a request that has no company.
    start = time.monotonic()
    response = _post(serve_urls["local"], {"image": ("ref.png", _png(), "image/png")}, {"frames": 4, "steps": 1}, key=None)
    elapsed = time.monotonic() - start
    assert response.status_code == 200, response.text
    assert elapsed < 4.0, f"lone request took {elapsed:.1f} s: it waited for a batch"
    frames = _probe_mp4(response.content, tmp_path)[1]
    assert frames.shape[0] == 4 and frames.std() > 1  # /local runs in bf16 (denoiser and VAE): a real video
    assert response.headers["X-Precision"] == "bf16/bf16"
    assert _post(serve_urls["s3"], {"image": ("ref.png", _png(), "image/png")}, {"frames": 4, "steps": 1}
                 ).headers["X-Precision"] == "fp32/fp32"  # auto on CPU


def test_a_pose_video_drives_the_request(serve_urls, tmp_path):
    """A driving video instead of keypoints: decoded, fitted and run through the BlazePose extractor on the
    ingress; its length sets the frames (`serving.inputs.pose_from_video`, tested against the extractor)."""
    from core.media import mux_mp4
    from ray_jobs.synthetic import SyntheticConfig, generate_video

    video = generate_video(SyntheticConfig(out="unused", duration=0.5, seed=2), 0)
    mux_mp4(video.frames[:6], None, FPS, tmp_path / "drive.mp4")
    files = {"image": ("ref.png", _png(), "image/png"),
             "pose_video": ("drive.mp4", (tmp_path / "drive.mp4").read_bytes(), "video/mp4")}
    response = _post(serve_urls["local"], files, {"steps": 1, "fps": FPS}, key=None)
    assert response.status_code == 200, response.text
    assert response.headers["X-Frames"] == "6" and _probe_mp4(response.content, tmp_path)[1].shape[0] == 6
    both = _post(serve_urls["local"], {**files, "keypoints": ("k.json", _keypoints(6), "application/json")}, {}, key=None)
    assert both.status_code == 422 and "pose_video" in both.text


def test_async_flow_reports_progress_and_survives_in_the_store(serve_urls, tmp_path):
    url = serve_urls["local"]
    face_png, truth = _face_png()
    response = _post(url, {"image": ("face.png", face_png, "image/png")}, {"frames": 8, "steps": 4, "mode": "async"}, key=None)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    seen, deadline = [], time.monotonic() + 90
    while time.monotonic() < deadline:
        record = requests.get(f"{url}/v1/animations/{job_id}", timeout=10).json()
        seen.append((record["status"], record["progress"]["done"]))
        if record["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert record["status"] == "done", record
    assert record["progress"] == {"done": 4, "total": 4} and record["nfe"] == 4
    assert record["params"]["face_box"] is None and record["face"]["source"] == "detected"  # no box sent: Haar found it
    assert _iou(np.array(record["face"]["box"]), truth) > 0.8
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:]))  # progress never goes back
    stored = json.loads((serve_urls["local_out"] / "jobs" / f"{job_id}.json").read_text())
    assert stored["status"] == "done" and (serve_urls["local_out"] / "videos" / f"{job_id}.mp4").is_file()
    video = requests.get(f"{url}/v1/animations/{job_id}/video", timeout=30)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert _probe_mp4(video.content, tmp_path)[1].shape[0] == 8
    assert requests.get(f"{url}/v1/animations/{'0' * 32}", timeout=10).status_code == 404
    assert requests.get(f"{url}/v1/animations/..%2Fetc", timeout=10).status_code == 404


def test_s3_output_redirects_to_presigned_url_and_s3_input(serve_urls, tmp_path):
    url, bucket = serve_urls["s3"], serve_urls["bucket"]
    serve_urls["s3_server"].client().put_object(Bucket=bucket, Key="inputs/ref.png", Body=_png())
    response = _post(url, {}, {"image_uri": f"s3://{bucket}/inputs/ref.png", "frames": 4, "steps": 1, "mode": "async"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + 90
    while requests.get(f"{url}/v1/animations/{job_id}", headers={"X-API-Key": KEY}, timeout=10).json()["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    redirect = requests.get(f"{url}/v1/animations/{job_id}/video", headers={"X-API-Key": KEY},
                            allow_redirects=False, timeout=10)
    assert redirect.status_code == 307, redirect.text
    location = redirect.headers["location"]
    assert location.startswith(serve_urls["s3_server"].endpoint_url) and "Signature" in location
    assert f"/{bucket}/serve/videos/{job_id}.mp4" in location
    video = requests.get(location, timeout=10)
    assert video.status_code == 200
    assert _probe_mp4(video.content, tmp_path)[1].shape[0] == 4


def test_burst_beyond_capacity_gets_503_and_accepted_requests_complete(serve_urls, tmp_path):
    files = {"image": ("ref.png", _png(), "image/png")}
    burst = 10  # capacity is max_ongoing 2 + max_queued 2 on the one replica
    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        responses = list(pool.map(lambda s: _post(serve_urls["s3"], files, {"frames": 8, "steps": 2, "seed": s}),
                                  range(burst)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "3" and r.json()["error"]["message"]
        else:
            assert _probe_mp4(r.content, tmp_path)[1].shape == (8, 64, 64, 3)


# --------------------------------------------------------------------------- long requests, durable jobs
def _long_job(url: str, seed: int, steps: int = 2, frames: int = 20) -> str:
    files = {"image": ("ref.png", _png(), "image/png"), "audio": ("a.wav", _wav(frames / FPS), "audio/wav")}
    response = _post(url, files, {"frames": frames, "fps": FPS, "steps": steps, "seed": seed, "mode": "async"}, key=None)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _events(url: str, job_id: str) -> list[tuple[str, dict]]:
    """The job's server-sent events until the stream ends: (event, data) pairs."""
    events, name = [], None
    with requests.get(f"{url}/v1/animations/{job_id}/events", stream=True, timeout=180) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_long_request_runs_as_chunks_with_live_events_and_early_chunks(serve_urls, tmp_path):
    """20 frames from a model trained on 8-frame clips: 3 chunks (starts 0, 6, 12; each continues from the
    last 2 latent frames of the one before), as many frames as the audio lasts, progress as events."""
    url = serve_urls["local"]
    job_id = _long_job(url, seed=4)
    events = _events(url, job_id)
    assert events[-1][0] == "done" and all(name == "progress" for name, _ in events[:-1]), [e[0] for e in events]
    steps = [data["progress"]["done"] for _, data in events]
    assert steps == sorted(steps) and events[-1][1]["progress"] == {"done": 6, "total": 6, "chunks": {"done": 3, "total": 3}}
    first = requests.get(f"{url}/v1/animations/{job_id}/chunks/0", timeout=30)
    assert first.status_code == 200 and first.headers["X-Chunk"] == "1/3"
    assert _probe_mp4(first.content, tmp_path)[1].shape == (8, 64, 64, 3)
    assert requests.get(f"{url}/v1/animations/{job_id}/chunks/3", timeout=30).status_code == 404
    info, frames, audio = _probe_mp4(requests.get(f"{url}/v1/animations/{job_id}/video", timeout=30).content, tmp_path)
    assert frames.shape == (20, 64, 64, 3) and abs(audio.size / 16000 - 20 / FPS) < 0.07
    diff = np.abs(frames[:8].astype(np.int16) - _probe_mp4(first.content, tmp_path)[1].astype(np.int16))
    assert diff.mean() < 1.0, diff.mean()  # the early chunk is the video's (two H.264 encodings of the same frames)


def test_cancel_stops_a_running_job(serve_urls):
    url = serve_urls["local"]
    job_id = _long_job(url, seed=5, steps=8, frames=32)
    deadline = time.monotonic() + 60
    while requests.get(f"{url}/v1/animations/{job_id}", timeout=10).json()["progress"]["done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answer = requests.delete(f"{url}/v1/animations/{job_id}", timeout=10)
    assert answer.status_code == 202, answer.text
    name, final = _events(url, job_id)[-1]
    assert name == "cancelled" and final["status"] == "cancelled" and final["progress"]["done"] < final["progress"]["total"]
    assert requests.get(f"{url}/v1/animations/{job_id}/video", timeout=10).status_code == 409
    assert requests.delete(f"{url}/v1/animations/{'0' * 32}", timeout=10).status_code == 404


def test_a_job_survives_killing_its_replica_and_resumes_after_its_stored_chunks(serve_urls, tmp_path):
    """Kill the Animator replica after the first chunk: the ingress runs the job again on the restarted
    replica, which resumes after the stored chunks (fewer model evaluations than a whole run; the first
    chunk's frames are the ones stored before the kill), and the video is the one an uninterrupted run of
    the same request and seed gives (the random init is seeded, so the new replica serves the same weights)."""
    import ray

    url = serve_urls["local"]
    job_id = _long_job(url, seed=6, steps=4, frames=32)
    deadline = time.monotonic() + 120
    while requests.get(f"{url}/v1/animations/{job_id}", timeout=10).json()["progress"].get("chunks", {}).get("done", 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = _probe_mp4(requests.get(f"{url}/v1/animations/{job_id}/chunks/0", timeout=30).content, tmp_path)[1]
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "local" in a["name"] and "Animator" in a["name"] and a["name"].startswith("SERVE_REPLICA")]
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    name, final = _events(url, job_id)[-1]
    assert name == "done" and final["attempts"] == 2, final
    chunks = final["progress"]["chunks"]["total"]
    assert chunks == 5 and final["nfe"] <= 4 * (chunks - 1), final  # at least the stored chunk was not sampled again
    video = _probe_mp4(requests.get(f"{url}/v1/animations/{job_id}/video", timeout=30).content, tmp_path)[1]
    assert video.shape == (32, 64, 64, 3)
    assert np.abs(video[:8].astype(np.int16) - before.astype(np.int16)).mean() < 1.0
    again = _long_job(url, seed=6, steps=4, frames=32)
    assert _events(url, again)[-1][1]["attempts"] == 1
    uninterrupted = _probe_mp4(requests.get(f"{url}/v1/animations/{again}/video", timeout=30).content, tmp_path)[1]
    assert np.array_equal(video, uninterrupted)
