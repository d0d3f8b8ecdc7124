"""Shared pytest fixtures: a real S3 endpoint (moto's server over HTTP) and a `Storage` pointed at it.

Kept light on purpose: importing this file imports neither torch nor ray.

- `s3_server` (session): starts `moto.server.ThreadedMotoServer` on 127.0.0.1 with a free port and,
  for the whole session, sets fake AWS credentials, ``AWS_DEFAULT_REGION=us-east-1`` and
  ``AWS_ENDPOINT_URL`` to it. Processes started after it (Ray workers, `ray job submit`) inherit
  these variables, so start Ray *after* requesting this fixture.
- `s3_bucket` (function): a fresh, uniquely named bucket, as ``"s3://<bucket>"``.
- `storage` (function): ``Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))``.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

FAKE_ACCESS_KEY = "AKIATESTFAKEACCESSKEY"
FAKE_SECRET_KEY = "fake-secret-key-that-must-never-be-printed"


@dataclasses.dataclass(frozen=True)
class S3Server:
    """A running moto server: where it listens and the fake credentials it accepts."""

    endpoint_url: str
    region: str = "us-east-1"
    access_key: str = FAKE_ACCESS_KEY
    secret_key: str = FAKE_SECRET_KEY

    def client(self):
        """A plain boto3 S3 client for this server (for test set-up and inspection)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    the 2 CPUs are shared with Ray and the other tests, and small tensors run faster on one thread."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1:<free port>, with the AWS environment pointed at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    info = S3Server(endpoint_url=f"http://{host}:{port}")
    no_config = tmp_path_factory.mktemp("aws") / "absent"  # never read the developer's ~/.aws
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", info.access_key)
        mp.setenv("AWS_SECRET_ACCESS_KEY", info.secret_key)
        mp.setenv("AWS_DEFAULT_REGION", info.region)
        mp.setenv("AWS_ENDPOINT_URL", info.endpoint_url)
        mp.setenv("AWS_CONFIG_FILE", str(no_config))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_config))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            yield info
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh empty bucket on the moto server, as ``s3://<name>``."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def storage(s3_server):
    """A `Storage` whose S3 side talks to the moto server (local paths work as usual)."""
    from core.storage import Storage, StorageConfig

    return Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))


_RAY_KIND: dict[str, str | None] = {"kind": None}  # which `start_ray` configuration runs now


def start_ray(kind: str, **init_kwargs):
    """Ray on this process with ``init_kwargs``, tagged ``kind``; reused when the same kind runs.

    Modules differ in what they need (2 CPUs for the training jobs, more and an API-key variable
    for Serve), and Ray allows one `ray.init` per process: a different kind shuts the running one
    down first. Call it after requesting `s3_server` so workers inherit the S3 environment.
    """
    import ray

    if ray.is_initialized() and _RAY_KIND["kind"] == kind:
        return ray
    if ray.is_initialized():
        ray.shutdown()
    ray.init(include_dashboard=False, log_to_driver=False, **init_kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    _RAY_KIND["kind"] = kind
    return ray


def default_ray():
    """The 2-CPU local Ray most tests share (a Ray start costs seconds on 2 cores)."""
    return start_ray("default", num_cpus=2,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}})


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_end():
    yield
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()


@pytest.fixture
def ray_session(s3_server):
    """The shared 2-CPU local Ray (started, or restarted after a module that needed another)."""
    return default_ray()


@pytest.fixture(scope="session")
def tiny_data(s3_server, tmp_path_factory):
    """Synthetic puppet videos preprocessed into shards with the tiny VAE: the training jobs' input.

    Returns the shards folder. 6 videos x 2 s at 16 fps = 4 clips of 8 frames each (24 clips),
    identities split 4 train / 1 held-out.
    """
    from core.config import load_config
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.job import run as preprocess
    from ray_jobs.synthetic.world import SyntheticConfig, run as synthesize

    default_ray()
    root = tmp_path_factory.mktemp("tiny_data")
    synthesize(SyntheticConfig(out=str(root / "synthetic"), num_videos=6, seed=3, duration=2.0,
                               num_identities=5, heldout_identities=1, executor="local"))
    cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                      {"input": str(root / "synthetic" / "videos"), "output": str(root / "shards")})
    summary = preprocess(cfg)
    assert summary["clips_written"] > 0, summary
    return str(root / "shards")


@pytest.fixture(scope="session")
def raw_data(s3_server, tmp_path_factory):
    """Plain MP4s: synthetic puppet videos with every sidecar taken away, preprocessed with the tiny config.

    128x96 sources into 64x64 crops, so the pose and face models (BlazePose, BlazeFace: the defaults)
    see a detection stream other than the clips; splits come from the split rule (one video held out by
    name). Returns {"shards", "truth": {video_id: the removed sidecar}, "heldout": [video id]}.
    """
    import json

    from core.config import load_config
    from core.storage import Storage
    from model.blazepose import default_model_dir
    from ray_jobs.fetch_models import cache_is_complete, fetch_models
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.job import run as preprocess
    from ray_jobs.synthetic.world import SyntheticConfig, run as synthesize

    if not cache_is_complete(Storage(), str(default_model_dir())):
        fetch_models(str(default_model_dir()))
    default_ray()
    root = tmp_path_factory.mktemp("raw_data")
    synthesize(SyntheticConfig(out=str(root / "synthetic"), num_videos=4, seed=5, duration=2.0, width=128,
                               height=96, num_identities=4, heldout_identities=1, executor="local"))
    truth = {}
    for sidecar in sorted((root / "synthetic" / "videos").glob("*.json")):
        truth[sidecar.stem] = json.loads(sidecar.read_text())
        sidecar.unlink()
    heldout = [sorted(truth)[-1]]
    cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                      {"input": str(root / "synthetic" / "videos"), "output": str(root / "shards"),
                       "pose.extractor": "blazepose", "face.detector": "auto", "split.heldout": heldout})
    summary = preprocess(cfg)
    assert summary["clips_written"] == 4 * 4 and summary["videos_failed"] == 0, summary
    return {"shards": str(root / "shards"), "truth": truth, "heldout": heldout, "summary": summary}


def wake_zero_inits(model, scale: float = 0.05, seed: int = 1) -> None:
    """Give zero-initialised weights (condition paths, output layers, LoRA B matrices) seeded random values,
    so every path of a random-init denoiser acts. Imports torch when called, not when conftest loads."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or (param.abs().max() == 0 and param.ndim >= 2):
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
