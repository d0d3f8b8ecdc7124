"""Cluster infrastructure: the launcher YAML through Ray's own validator, the KubeRay manifests, and a
real `ray job submit`-equivalent submission to a local Ray head started (and stopped) by this test.

The local head is isolated from other Ray instances on the machine: its own --temp-dir and a free
port for every listener. It is stopped by terminating exactly the processes of its session (found
by the temp dir on their command lines, plus their descendants), never by a machine-wide `ray stop`.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
RAY_BIN = Path(sys.executable).parent / "ray"
REQUIRED_JOBS = {"preprocess", "train_teacher", "train_tpo", "distill_lcm"}
# job module -> its typed config (what `--config FILE --set k=v` is parsed into)
JOB_CONFIGS = {"synthetic": "ray_jobs.synthetic.world:SyntheticConfig",
               "preprocess": "ray_jobs.preprocess.config:PreprocessConfig",
               "train_teacher": "ray_jobs.train_teacher:TeacherConfig",
               "make_preferences": "ray_jobs.make_preferences:PreferencesConfig",
               "train_tpo": "ray_jobs.train_tpo:TPOConfig",
               "distill_lcm": "ray_jobs.distill_lcm:DistillConfig",
               "pipeline": "ray_jobs.pipeline:PipelineConfig"}


# ---------------------------------------------------------------- cluster launcher (ray up)

def _load_cluster() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def _ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before touching a cloud: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_up_validation():
    config = _load_cluster()
    prepared = _ray_up_checks(config)
    node_types = prepared["available_node_types"]
    head = node_types[prepared["head_node_type"]]
    workers = {name: spec for name, spec in node_types.items() if name != prepared["head_node_type"]}

    assert prepared["provider"]["type"] == "aws"
    assert prepared["idle_timeout_minutes"] > 0
    assert prepared["docker"]["image"] and prepared["docker"]["container_name"]
    assert head["resources"].get("CPU", 0) == 0, "the head schedules no work: it only runs drivers and GCS"
    # Every node reaches S3 through its instance profile, never through keys in the config.
    for name, spec in node_types.items():
        assert "Arn" in spec["node_config"]["IamInstanceProfile"], name
    assert "AWS_SECRET_ACCESS_KEY" not in (INFRA / "cluster.yaml").read_text()
    # Workers scale from zero: a CPU pool on spot, GPU pools for training and serving.
    assert all(spec["min_workers"] == 0 < spec["max_workers"] for spec in workers.values())
    cpu_pools = [s for s in workers.values() if s["resources"].get("GPU", 0) == 0]
    gpu_pools = {n: s for n, s in workers.items() if s["resources"].get("GPU", 0) > 0}
    assert cpu_pools and all(s["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for s in cpu_pools)
    assert {spec["resources"]["GPU"] for spec in gpu_pools.values()} >= {1, 8}, "1-GPU serving and 8-GPU training nodes"
    assert sum(s["max_workers"] for s in workers.values()) >= prepared["max_workers"] > 0
    # The project is installed in the image, so start commands need no pip.
    assert not any("pip install" in cmd for cmd in prepared["setup_commands"])
    assert any("--autoscaling-config" in cmd for cmd in prepared["head_start_ray_commands"])


_PLANTS = {  # name -> (mutation, what Ray's error must say)
    "unknown_key": (lambda c: c.update(idle_timeout_minutez=5), "idle_timeout_minutez"),
    "bad_head_type": (lambda c: c.update(head_node_type="no.such.type"), "head_node_type"),
    "min_over_max": (lambda c: c["available_node_types"]["cpu-spot"].update(min_workers=10_000), "min_workers"),
    "bad_type": (lambda c: c.update(max_workers="many"), "is not of type 'integer'"),
}


@pytest.mark.parametrize("plant", sorted(_PLANTS))
def test_cluster_yaml_planted_error_fails_validation(plant):
    config = _load_cluster()
    _ray_up_checks(config)  # the unplanted config passes, so a failure below is the plant's
    mutate, message = _PLANTS[plant]
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        _ray_up_checks(config)


# ---------------------------------------------------------------- KubeRay manifests

def _manifests() -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(KUBERAY.glob("*.yaml"))}


def _check_cluster_spec(name: str, spec: dict) -> None:
    """Autoscaling RayCluster spec: head without work, worker groups with sane bounds and GPU limits."""
    assert spec["enableInTreeAutoscaling"] is True, name
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, name
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: the head must not take work"
    assert head["template"]["spec"]["containers"][0]["image"], name
    groups = spec["workerGroupSpecs"]
    assert groups, name
    for group in groups:
        label = f"{name}:{group['groupName']}"
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], label
        assert group["maxReplicas"] >= 1, label
        container = group["template"]["spec"]["containers"][0]
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        assert gpus == int(requests.get("nvidia.com/gpu", 0)), f"{label}: GPU request != limit"
        if "gpu" in group["groupName"]:
            assert gpus >= 1, f"{label}: a GPU group without GPUs"
            assert group["template"]["spec"]["tolerations"], f"{label}: GPU nodes are tainted"
        assert limits["cpu"] and limits["memory"], label
        # S3 by workload identity (IRSA), no static keys in manifests.
        assert group["template"]["spec"]["serviceAccountName"], label


def test_kuberay_manifests_structure():
    manifests = _manifests()
    jobs = {name: m for name, m in manifests.items() if m["kind"] == "RayJob"}
    services = [m for m in manifests.values() if m["kind"] == "RayService"]
    assert set(manifests) and len(services) == 1
    for name, manifest in manifests.items():
        assert manifest["apiVersion"] == "ray.io/v1", name
        assert manifest["kind"] in ("RayJob", "RayService"), name
        assert manifest["metadata"]["name"], name
    seen_modules = set()
    for name, job in jobs.items():
        spec = job["spec"]
        _check_cluster_spec(name, spec["rayClusterSpec"])
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0, name
        assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(job)
        module, config_file, overrides = _parse_entrypoint(name, spec["entrypoint"])
        seen_modules.add(module)
        assert (REPO / config_file).is_file(), f"{name}: {config_file}"
        assert any(value.split("=", 1)[1].startswith("s3://") for value in overrides), f"{name}: no S3 paths"
        assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["OMP_NUM_THREADS"]
    assert seen_modules >= REQUIRED_JOBS
    _check_cluster_spec("rayservice", services[0]["spec"]["rayClusterConfig"])


def _parse_entrypoint(name: str, entrypoint: str) -> tuple[str, str, list[str]]:
    """`python -m ray_jobs.NAME --config FILE --set k=v ...` -> (NAME, FILE, ["k=v", ...])."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("ray_jobs."), f"{name}: {argv[:3]}"
    assert argv[3] == "--config" and all(flag == "--set" for flag in argv[5::2]), f"{name}: {argv[3:]}"
    return argv[2].removeprefix("ray_jobs."), argv[4], argv[6::2]


def _field(section, name: str):
    return section[name] if isinstance(section, dict) else getattr(section, name)


def _config_class(module: str) -> type:
    target_module, _, class_name = JOB_CONFIGS[module].partition(":")
    return getattr(importlib.import_module(target_module), class_name)


def test_kuberay_job_arguments_parse_into_the_job_configs():
    """Each RayJob's --config file plus its --set overrides is a valid config of that job (no typos)."""
    from core.config import load_config

    for name, manifest in _manifests().items():
        if manifest["kind"] != "RayJob":
            continue
        module, config_file, overrides = _parse_entrypoint(name, manifest["spec"]["entrypoint"])
        cfg = load_config(_config_class(module), REPO / config_file, overrides)
        for override in overrides:  # every override landed where it says
            key, value = override.split("=", 1)
            landed = functools.reduce(_field, key.split("."), cfg)
            assert str(landed).lower() == value.lower() or landed == yaml.safe_load(value), f"{name}: {key}={landed!r}"
        if hasattr(cfg, "scaling") and cfg.scaling.use_gpu:  # the job's ranks fit the GPU group's pods
            groups = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                       * g["maxReplicas"] for g in groups)
            assert cfg.scaling.num_workers <= gpus, f"{name}: {cfg.scaling.num_workers} ranks > {gpus} GPUs"


def test_rayservice_serve_config_passes_serve_schema():
    from ray.serve.schema import ServeDeploySchema

    service = next(m for m in _manifests().values() if m["kind"] == "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(serve_config)
    [app] = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert attr and find_spec(module) is not None, app.import_path
    # The RayService serves the same app as `serve deploy serving/config.yaml`.
    deploy_config = yaml.safe_load((REPO / "serving" / "config.yaml").read_text())
    assert app.import_path == deploy_config["applications"][0]["import_path"]
    assert serve_config == deploy_config, "RayService and serving/config.yaml drifted apart"
    from serving.config import ServeAppConfig

    args = ServeAppConfig.model_validate(app.args)  # what build_app does with them on the cluster
    # The served model is an export folder on S3: its model card names preset, VAE and sampler.
    assert args.export.startswith("s3://") and args.export.endswith("/student/export")
    assert args.model.pretrained_path is None and (args.height, args.width) == (480, 832)
    with pytest.raises(Exception):  # the schema is strict enough to catch a broken config
        ServeDeploySchema.model_validate({**serve_config, "applications": [{"name": "x"}]})


# ---------------------------------------------------------------- job submission to a real local head

def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _session_processes(temp_dir: str) -> list:
    """Every process of the head started with `temp_dir`: its daemons (by command line) and their children."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                roots.append(proc)
        except psutil.Error:
            continue
    found = {proc.pid: proc for proc in roots}
    for proc in roots:
        try:
            found.update({child.pid: child for child in proc.children(recursive=True)})
        except psutil.Error:
            continue
    return list(found.values())


def _stop_session(temp_dir: str) -> None:
    """`ray stop`, scoped to one session: SIGTERM its processes, then SIGKILL what is left after 5 s."""
    import psutil

    procs = _session_processes(temp_dir)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


@pytest.fixture
def local_head():
    """A Ray head on loopback with its own temp dir, ports and auth token.

    Yields (dashboard address, request headers). Token auth is on, as on a real cluster: Ray 2.60 turns
    it on by itself once ~/.ray/auth_token exists, so the test sets it explicitly with its own token
    instead of depending on that file.
    """
    temp_dir = tempfile.mkdtemp(prefix="rayinfra", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    token = secrets.token_hex(32)
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    (gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics,
     node_manager, object_manager) = _free_ports(9)
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")},
           "PATH": f"{RAY_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is ours
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    cmd = [str(RAY_BIN), "start", "--head", "--node-ip-address", "127.0.0.1", f"--port={gcs}",
           "--dashboard-host", "127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env_agent}",
           f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
           f"--object-manager-port={object_manager}", "--num-cpus", "2", "--temp-dir", temp_dir,
           "--disable-usage-stats"]
    try:
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {token}"}
    finally:
        _stop_session(temp_dir)
        assert not [p for p in _session_processes(temp_dir) if p.is_running() and p.status() != "zombie"]
        shutil.rmtree(temp_dir, ignore_errors=True)


def _runtime_env_for_submit() -> dict:
    """What `ray job submit --working-dir . --runtime-env infra/runtime_env.yaml` sends."""
    runtime_env = yaml.safe_load((INFRA / "runtime_env.yaml").read_text())
    # The code comes from --working-dir, the dependencies from the image.
    assert "working_dir" not in runtime_env and "pip" not in runtime_env
    return {**runtime_env, "working_dir": str(REPO)}


def _wait_for_job(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(1)
    client.stop_job(job_id)
    return JobStatus.PENDING


@pytest.mark.timeout(360)
def test_job_submit_runs_synthetic_on_local_head(local_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, headers = local_head
    out = tmp_path / "synth"
    client = JobSubmissionClient(address, headers=headers)
    # executor=ray: the job must join the cluster through RAY_ADDRESS (set by the job supervisor)
    # and run its per-video tasks there, exactly as on a real cluster.
    job_id = client.submit_job(
        entrypoint=f"python -m ray_jobs.synthetic --out {out} --num-videos 2 --seed 1 --duration 1 "
                   "--set executor=ray",
        runtime_env=_runtime_env_for_submit(), submission_id=f"infra-test-{os.getpid()}")
    status = _wait_for_job(client, job_id, timeout_s=240)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "train videos:" in logs
    info = client.get_job_info(job_id)
    package = info.runtime_env["working_dir"]
    assert package.startswith("gcs://_ray_pkg_") and package.endswith(".zip"), package
    assert info.runtime_env["env_vars"]["OMP_NUM_THREADS"] == "4"

    videos = sorted(p.name for p in (out / "videos").iterdir())
    assert len([n for n in videos if n.endswith(".mp4")]) == 2
    assert len([n for n in videos if n.endswith(".json")]) == 2
    for mp4 in (out / "videos").glob("*.mp4"):
        assert mp4.read_bytes()[4:8] == b"ftyp" and mp4.stat().st_size > 1000
    splits = json.loads((out / "splits.json").read_text())
    assert sorted(splits["videos"]["train"] + splits["videos"]["heldout"]) == sorted(
        n.removesuffix(".mp4") for n in videos if n.endswith(".mp4"))


def test_runtime_env_excludes_keep_upload_small(tmp_path):
    """The zip Ray would upload for `--working-dir .` stays small and holds the code, not outputs or venvs."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    runtime_env = _runtime_env_for_submit()
    package = tmp_path / "pkg.zip"
    # include_gitignore=False: the excludes alone must keep it small (Ray can be told to ignore .gitignore).
    create_package(str(REPO), package, include_gitignore=False, excludes=runtime_env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert "ray_jobs/common.py" in names and "infra/runtime_env.yaml" in names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "outputs/")) or "__pycache__" in n]
    assert package.stat().st_size < 20 * 2**20
