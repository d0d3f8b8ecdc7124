"""One request on two workers: the Serve app with ``animator.sequence_parallel = 2`` over real HTTP.

The served video equals the one-device engine's for the same seed; a killed worker fails its
request with a 500 and the replica replaces its group, so the next request succeeds.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import requests
import torch
from conftest import start_ray, wake_zero_inits
from test_serving import FPS, _free_port, _keypoints, _png, _probe_mp4, _wav

from model.presets import ModelConfig, build_denoiser


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> str:
    """A tiny teacher folder with random weights and every zero-init path woken (no card: one is inferred)."""
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    wake_zero_inits(model)
    folder = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _args(export: str, output: str, sp: int) -> dict:
    return {"export": export, "output": output, "torch_threads": 1, "warmup": False,
            "limits": {"max_upload_bytes": 200_000, "max_steps": 8, "max_frames": 32, "max_duration_s": 2.0},
            "animator": {"min_replicas": 1, "max_replicas": 1, "num_cpus": 0.5, "num_gpus": 0,
                         "sequence_parallel": sp, "worker_num_cpus": 1}}


@pytest.fixture(scope="module")
def sp_url(s3_server, export_dir, tmp_path_factory):
    import ray
    from ray import serve

    from serving.app import build_app

    start_ray("serve-sp", num_cpus=4)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(_args(export_dir, str(tmp_path_factory.mktemp("out")), sp=2)), name="sp", route_prefix="/sp")
    try:
        yield f"http://127.0.0.1:{port}/sp"
    finally:
        serve.shutdown()
        ray.shutdown()


def _files(frames: int) -> dict:
    return {"image": ("ref.png", _png(64, 64), "image/png"), "audio": ("a.wav", _wav(frames / FPS), "audio/wav"),
            "keypoints": ("k.json", _keypoints(frames), "application/json")}


def _post(url: str, frames: int = 8, seed: int = 5) -> requests.Response:
    return requests.post(f"{url}/v1/animations", files=_files(frames),
                         data={"frames": frames, "fps": FPS, "steps": 3, "seed": seed}, timeout=300)


def test_sp2_request_returns_the_one_device_video(sp_url, export_dir, tmp_path):
    from core.storage import Storage
    from serving.config import ServeAppConfig, resolve_served
    from serving.engine import AnimationEngine
    from serving.inputs import AnimationRequest, decode_audio_bytes, decode_image, parse_keypoints

    response = _post(sp_url)
    assert response.status_code == 200, response.text
    info, served, _ = _probe_mp4(response.content, tmp_path)
    assert info.num_frames == 8 and info.has_audio

    # the same request on one device, in this process
    cfg = ServeAppConfig.model_validate(_args(export_dir, str(tmp_path / "local"), sp=1))
    engine = AnimationEngine(cfg, resolve_served(cfg, Storage()))
    request = AnimationRequest(decode_image(_png(64, 64), "image", 64, 64, 10**6),
                               decode_audio_bytes(_wav(8 / FPS), "audio", 16000, 2.0),
                               parse_keypoints(_keypoints(8), "keypoints", 64, 64), 8, FPS, 3, seed=5)
    mp4, _ = engine.animate(request)
    _, local, _ = _probe_mp4(mp4, tmp_path)
    diff = np.abs(served.astype(np.int16) - local.astype(np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())  # H.264 of frames equal to ~1e-5
    assert served.std() > 5  # a real picture, not a flat frame


def _workers() -> dict[str, int]:
    """Live sequence-parallel worker actors: name -> pid."""
    import ray

    from serving.parallel import WORKER_PREFIX

    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(WORKER_PREFIX)]
    found = {}
    for actor in named:
        try:
            found[actor["name"]] = ray.get(ray.get_actor(actor["name"], namespace=actor["namespace"]).pid.remote(),
                                           timeout=30)
        except Exception:  # noqa: BLE001 - a dead one is not live
            continue
    return found


def test_a_killed_worker_fails_its_request_and_the_group_is_replaced(sp_url):
    before = _workers()
    assert len(before) == 2
    os.kill(sorted(before.values())[1], signal.SIGKILL)
    failed = _post(sp_url)
    assert failed.status_code == 500 and "generation failed" in failed.json()["error"]["message"]
    again = _post(sp_url)  # the replica started a new group when the request failed
    assert again.status_code == 200, again.text
    after = _workers()
    assert len(after) == 2 and set(after).isdisjoint(before) and set(after.values()).isdisjoint(before.values())
