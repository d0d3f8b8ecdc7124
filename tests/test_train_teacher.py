"""Teacher training on Ray Train + DeepSpeed (CPU, gloo): S3 checkpoints, resume, fault tolerance, ZeRO-3, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.config import load_config
from core.storage import Storage, StorageConfig
from ray_jobs.train_teacher import TeacherConfig, run
from artifacts.shards import take_clip
from ray_jobs.training.engine import deepspeed_config
from ray_jobs.training.config import DeepSpeedSection

TINY = "ray_jobs/configs/tiny/train_teacher.yaml"


def _config(data: str, **overrides) -> TeacherConfig:
    base = {"data": data, "batch_size": 1, "checkpoint.every_n_steps": 2, "optim.warmup_steps": 0,
            "validation.steps": 2, "scaling.num_workers": 2}
    return load_config(TeacherConfig, TINY, {**base, **overrides})


def _metric_steps(storage: Storage, run_uri: str) -> list[int]:
    return [json.loads(line)["step"] for line in storage.read_text(f"{run_uri}/metrics.jsonl").splitlines()]


def test_deepspeed_config_is_generated_and_overridable():
    section = DeepSpeedSection(zero_stage=3, gradient_accumulation_steps=2,
                               raw_override={"zero_optimization": {"reduce_bucket_size": 123}})
    ds = deepspeed_config(section, micro_batch=2, world_size=2, use_gpu=False)
    assert ds["train_batch_size"] == 8
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                       "reduce_bucket_size": 123}
    assert ds["bf16"]["enabled"] is False
    assert deepspeed_config(DeepSpeedSection(), 1, 1, use_gpu=True)["bf16"]["enabled"] is True
    # 4 workers as 2 sequence-parallel pairs: the batch counts the 2 data-parallel ranks
    ulysses = deepspeed_config(DeepSpeedSection(), micro_batch=2, world_size=4, use_gpu=False, sequence_parallel=2)
    assert (ulysses["train_batch_size"], ulysses["sequence_parallel_size"], ulysses["data_parallel_size"]) == (4, 2, 2)
    assert "sequence_parallel_size" not in ds


def test_validation_clip_comes_from_heldout(tiny_data):
    clip = take_clip(tiny_data, Storage(), split="heldout")
    assert clip["split"] == "heldout"
    assert clip["frames"].shape == (8, 64, 64, 3)


@pytest.mark.parametrize("override, named", [
    ({"model.audio.n_mels": 16}, "audio features"),
    ({"model.vae_path": "model/assets/tiny_teacher"}, "VAE"),
])
def test_shards_made_for_another_model_fail_at_start_naming_both(tiny_data, override, named):
    """Shards whose VAE or audio geometry differ from the model's fail before any worker starts, naming both sides."""
    with pytest.raises(ValueError, match=named) as caught:
        run(_config(tiny_data, **override))
    message = str(caught.value)
    assert tiny_data in message or "tiny checked-in VAE" in message
    if named == "VAE":
        assert "tiny_teacher" in message and "tiny checked-in VAE" in message
    else:
        assert "'n_mels': 16" in message and "'n_mels': 32" in message


def test_sequence_parallel_run_trains_and_resumes(raw_data, tmp_path):
    """2 workers as one sequence-parallel group (sp=2, dp=1): each clip's tokens split across both; resumes.

    On shards of plain videos (no sidecars: splits by rule, BlazePose keypoints, BlazeFace boxes; see
    test_preprocess.py::test_plain_videos_without_sidecars_get_splits_pose_and_faces)."""
    tiny_data = raw_data["shards"]
    overrides = {"scaling.sequence_parallel": 2, "run.storage_path": str(tmp_path), "run.name": "teacher-sp",
                 "validation.steps": 1}
    first = run(_config(tiny_data, steps=2, **{**overrides, "run.tensorboard": True}))
    assert first.metrics["step"] == 2
    assert first.export == str(tmp_path / "teacher-sp" / "export") and first.card.kind == "teacher"  # its artifact
    assert first.card.frames.height == 64 and first.card.sampler.shift == 1.0
    run_dir = tmp_path / "teacher-sp"
    assert list((run_dir / "validation").rglob("*.mp4")) and (run_dir / "tensorboard").is_dir()
    # The copy-the-reference baseline on the same clip rides along: a static video's motion error is
    # the clip's true motion, which the synthetic dancers always have.
    val = json.loads((run_dir / "validation" / "step_000002" / "metrics.json").read_text())
    assert val["copy_ref_motion_error"] > 0.001 and val["motion_error"] >= 0
    assert first.metrics["val_copy_ref_motion_error"] == val["copy_ref_motion_error"]
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["val_motion_error"] == val["motion_error"]
    second = run(_config(tiny_data, steps=4, **overrides))
    assert second.metrics["step"] == 4
    lines = [json.loads(ln) for ln in (tmp_path / "teacher-sp" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4]
    assert all(ln["loss"] > 0 and ln["grad_norm"] > 0 and ln["sequence_parallel"] == 2 for ln in lines)
    # one data-parallel rank: batch_size clips per step, not batch_size x workers
    assert all(abs(ln["samples_per_s"] * ln["step_time_s"] - 1) < 1e-6 for ln in lines)
    from artifacts.exports import load_export

    assert load_export(str(tmp_path / "teacher-sp" / "export"), Storage()).card.kind == "teacher"


def test_sequence_parallel_must_divide_the_workers(tiny_data):
    with pytest.raises(ValueError, match="must divide"):
        _config(tiny_data, **{"scaling.sequence_parallel": 2, "scaling.num_workers": 3})


@pytest.fixture(scope="module")
def uniform_data(tiny_data, tmp_path_factory) -> str:
    """Shards whose train clips are all one clip: which worker streams which row (Ray Data's streaming
    split is dynamic) then cannot change what a step computes, so two runs can be compared bitwise."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    manifest = json.loads((Path(tiny_data) / "manifest.json").read_text())
    table = pq.read_table(Path(tiny_data) / manifest["shards"][0])
    one = table.filter(pc.equal(table["split"], "train")).slice(0, 1)
    folder = tmp_path_factory.mktemp("uniform")
    (folder / "data").mkdir()
    pq.write_table(pa.concat_tables([one] * 8), folder / "data" / "uniform.parquet")
    (folder / "manifest.json").write_text(json.dumps({**manifest, "shards": ["data/uniform.parquet"]}))
    return str(folder)


def test_zero3_resume_from_s3_fetches_only_each_ranks_shards_and_ends_on_the_same_weights(
        uniform_data, s3_bucket, s3_server):
    """Issue 19: each rank downloads the shared state and its own ZeRO-3 / EMA shards only (counted from
    what it fetched), and a run that fails and resumes ends on the same step and weights as one that does not.
    In bf16 on CPU (DeepSpeed casts the module; the model casts its fp32 inputs), exported in bf16."""
    from safetensors.torch import load_file

    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))
    common = {"deepspeed.zero_stage": 3, "deepspeed.precision": "bf16", "run.storage_path": f"{s3_bucket}/runs",
              "storage.endpoint_url": s3_server.endpoint_url, "objective.ema_decay": 0.9}
    straight = run(_config(uniform_data, steps=4, **{**common, "run.name": "z3-straight"}))
    resumed = run(_config(uniform_data, steps=4, **{**common, "run.name": "z3-resumed", "run.fail_at_step": 3,
                                                    "run.max_failures": 1}))
    assert straight.metrics["step"] == resumed.metrics["step"] == 4
    for rank in (0, 1):
        fetched = storage.read_json(f"{s3_bucket}/runs/z3-resumed/resume/rank{rank}.json")
        assert fetched["step"] == 2
        ranked = [f for f in fetched["files"] if "rank_" in f.replace("mp_rank_", "") or "_rank" in f]
        own = [f for f in ranked if f"zero_pp_rank_{rank}_" in f or f.endswith(f"_rank{rank}.pt")]
        assert ranked == own and len(own) >= 3, fetched  # ZeRO-3 model + optimizer shards, EMA shard: its own only
        assert {"train_state.json", "metrics.jsonl"} <= set(fetched["files"])
    weights = []
    for name in ("z3-straight", "z3-resumed"):
        with storage.local_copy(f"{s3_bucket}/runs/{name}/export") as folder:
            weights.append(load_file(str(Path(folder) / "diffusion_pytorch_model.safetensors")))
    from artifacts.exports import load_export

    loaded = load_export(f"{s3_bucket}/runs/z3-resumed/export", storage)  # rebuilt from its card alone, from S3
    assert loaded.card.kind == "teacher" and not loaded.card.inferred
    assert loaded.sampler.kind == "euler_cfg" and loaded.sampler.guidance == 1.5  # the YAML's validation.guidance
    assert weights[0].keys() == weights[1].keys() and weights[0]["patch_embedding.weight"].dtype == torch.bfloat16
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [json.loads(ln)["loss"] for ln in storage.read_text(f"{s3_bucket}/runs/z3-resumed/metrics.jsonl").splitlines()]
    assert len(losses) == 4 and all(loss == loss and loss > 0 for loss in losses)
    assert _metric_steps(storage, f"{s3_bucket}/runs/z3-resumed") == [1, 2, 3, 4]  # each step logged once
