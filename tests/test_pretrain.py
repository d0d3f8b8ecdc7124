"""The training recipe's pieces and the pretrained tiny teacher: EMA warm-up, joint CFG dropout, rendered
clips through the preprocessing stages, the one-device pretraining job, and the shipped teacher animating
identities it never saw."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.conditions import Conditions
from ray_jobs.training.ema import EMA, warmup_decay

ROOT = Path(__file__).resolve().parents[1]


def test_ema_warmup_follows_the_weights_early_and_reaches_the_decay():
    assert warmup_decay(0.999, 1) == pytest.approx(2 / 11)
    assert warmup_decay(0.999, 10_000) == pytest.approx(0.999)
    module = torch.nn.Linear(2, 2)
    warm, fixed = EMA(module, 0.99, zero_stage=0, warmup=True), EMA(module, 0.99, zero_stage=0, warmup=False)
    with torch.no_grad():
        module.weight.add_(1.0)  # the weights move away from the init
    for step in range(1, 21):
        warm.update(step)
        fixed.update()
    gap = lambda ema: float((ema.shadow["weight"] - module.weight.detach()).abs().mean())  # noqa: E731
    assert gap(warm) < 0.05 < gap(fixed)  # 0.99 without warm-up still holds ~82% of the old weights
    with pytest.raises(ValueError, match="needs the optimizer step"):
        warm.update()


def _cond(batch: int) -> Conditions:
    return Conditions(ref_latent=torch.zeros(batch, 4, 1, 2, 2), pose=torch.zeros(batch, 3, 2, 4, 4),
                      audio=torch.zeros(batch, 2, 3, 5), face=torch.zeros(batch, 4, 1, 2, 2),
                      keep={"face": torch.arange(batch) % 2 == 0})


def test_joint_drop_drops_the_cfg_conditions_together_at_its_rate():
    cond = _cond(4000).random_drop_joint(["pose", "audio", "face"], 0.25, torch.Generator().manual_seed(0))
    pose, audio, face = (cond.keep_mask(n) for n in ("pose", "audio", "face"))
    dropped = ~pose
    assert 0.22 < dropped.float().mean() < 0.28
    assert torch.equal(pose, audio)  # together, never one without the other
    assert not face[dropped].any()
    assert torch.equal(face[~dropped], (torch.arange(4000) % 2 == 0)[~dropped])  # earlier drops stay
    assert cond.keep_mask("ref").all()


def test_rendered_frames_give_the_same_clips_as_their_decoded_video(tmp_path):
    """`clips_from_frames` is the preprocessing path minus the codec: fed the decoded frames it equals
    the rows the job makes from the MP4 file."""
    from core.config import load_config
    from core.media import decode_video_and_audio, probe
    from ray_jobs.preprocess import udfs
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.synthetic.world import SyntheticConfig, write_video

    world = SyntheticConfig(out=str(tmp_path), num_videos=1, seed=3, duration=1.0)
    write_video(world, 0)
    video = tmp_path / "videos" / "s3-00000.mp4"
    cfg = load_config(PreprocessConfig, ROOT / "ray_jobs/configs/tiny/preprocess.yaml", {"vae.enabled": False})
    item = {"source": str(video), "sidecar": str(video.with_suffix(".json"))}
    from_file = udfs._rows_to_columns(udfs.decode_clips(item, cfg))
    for stage in udfs.CPU_STAGES:
        from_file = stage(from_file, cfg)
    frames, wave = decode_video_and_audio(video, cfg.fps, (cfg.width, cfg.height), cfg.fit,
                                          cfg.audio.features.sample_rate, probe(video))
    sidecar = json.loads(video.with_suffix(".json").read_text())
    rendered = udfs.clips_from_frames(str(video), sidecar, frames, wave, cfg)
    assert len(rendered["frames"]) == len(from_file["frames"]) == 2
    for column in ("frames", "pose", "audio_feats", "motion_mask", "ref_face_crop", "ref_face_box", "keypoints"):
        np.testing.assert_array_equal(rendered[column], from_file[column], err_msg=column)
    assert rendered["has_ref_face"].all() and list(rendered["split"]) == list(from_file["split"])


def test_pretrain_job_trains_evaluates_and_exports_a_loadable_teacher(tmp_path):
    out = tmp_path / "teacher"
    args = ["--set", f"output={out}", "--set", "world.num_videos=3", "--set", "world.num_identities=3",
            "--set", "world.heldout_identities=1", "--set", "world.duration=1.0", "--set", "demo_world=null",
            "--set", "steps=4", "--set", "max_seconds=null", "--set", "batch_size=2", "--set", "optim.warmup_steps=2",
            "--set", "eval.clips=1", "--set", "eval.steps=2", "--set", "eval.guidances=[1.0,2.0]",
            "--set", "data_workers=1", "--set", "log_every=2", "--set", "model.overrides={num_layers: 1}"]
    subprocess.run([sys.executable, "-m", "ray_jobs.pretrain_teacher", *args], cwd=ROOT, check=True, timeout=600)
    report = json.loads((out / "FIT_REPORT.json").read_text())
    assert report["steps"] == 4 and [row["step"] for row in report["curve"]] == [2, 4]
    assert report["world_clips"]["train"] > 0 and report["world_clips"]["heldout"] > 0
    rows = {row["variant"]: row for row in report["heldout"]}
    assert set(rows) == {"copy_reference", "vae_round_trip", "teacher_g1", "teacher_g2"}
    assert rows["teacher_g1"]["nfe"] == 2 and rows["teacher_g2"]["nfe"] == 4
    assert rows["vae_round_trip"]["psnr"] > 28 > rows["copy_reference"]["psnr"]  # real frames, real baselines
    from model.presets import ModelConfig, build_denoiser

    model = build_denoiser(ModelConfig(pretrained_path=str(out)))
    assert model.config.num_layers == 1


def test_the_shipped_teacher_animates_identities_it_never_saw():
    """builtin:tiny_teacher on held-out clips of the demo world (seed 0; pretrained on seeds 1 and 2):
    far above copying the reference, on the pose it is given."""
    from model.flow import inference_sigmas
    from model.metrics import psnr
    from model.presets import ModelConfig, build_denoiser
    from model.samplers import sample_euler_cfg
    from model.vae import load_vae, video_to_uint8
    from ray_jobs.pretrain_teacher import PretrainConfig, _heldout, encode_latents, render_world
    from ray_jobs.training.teacher_objective import TRAIN_COLUMNS

    cfg = PretrainConfig()
    world = cfg.demo_world.model_copy(update={"num_videos": 8})  # one video of each identity
    vae = load_vae(None)
    clips = _heldout(encode_latents(render_world(world, cfg.preprocess_cfg(), 1), vae), 4)
    model = build_denoiser(ModelConfig(pretrained_path="builtin:tiny_teacher")).eval()
    batch = {k: torch.from_numpy(np.ascontiguousarray(clips[k])) for k in TRAIN_COLUMNS if k in clips}
    cond = Conditions.from_batch(batch)
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    x = sample_euler_cfg(model, noise, inference_sigmas(10), cond, cond.drop(["pose", "audio", "face"]), 1.0).x
    generated = video_to_uint8(vae.decode(x)).numpy()
    copied = np.repeat(clips["ref_frame"][:, None], generated.shape[1], axis=1)
    gain = np.mean([psnr(g, t) - psnr(c, t) for g, c, t in zip(generated, copied, clips["frames"])])
    assert len(set(clips["identity_id"])) == 2 and gain > 5.0, gain
    # ... and it follows the pose it is given: another clip's pose makes it worse.
    swapped = Conditions.from_batch({**batch, "pose": batch["pose"].flip(0)})
    x = sample_euler_cfg(model, noise, inference_sigmas(10), swapped, swapped.drop(["pose", "audio", "face"]), 1.0).x
    wrong_pose = video_to_uint8(vae.decode(x)).numpy()
    assert np.mean([psnr(w, t) for w, t in zip(wrong_pose, clips["frames"])]) < np.mean(
        [psnr(g, t) for g, t in zip(generated, clips["frames"])]) - 1.0
