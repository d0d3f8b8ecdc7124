"""LoRA-TPO (AlignHuman): Diffusion-DPO math, segment routing on real outputs, per-segment training,
a 2-worker DPO run on synthetic pairs, and the preference-pairs job writing to the moto S3 server."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import wake_zero_inits

from model.conditions import Conditions
from model.denoiser import use_adapter
from model.losses import diffusion_dpo_loss
from model.presets import ModelConfig, build_denoiser
from model.samplers import default_tpo_plan, sample_segment_routed
from artifacts.card import ModelCard
from core.storage import Storage
from ray_jobs.train_tpo import ADAPTERS, TPOConfig, TPOObjective, TPOTask, adapter_params, add_tpo_adapters

BOUNDARY = 0.875


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 16, 8, 16, 16, generator=gen)
    cond = Conditions(ref_latent=torch.randn(batch, 16, 1, 16, 16, generator=gen),
                      pose=torch.rand(batch, 3, 8, 64, 64, generator=gen) * 2 - 1,
                      audio=torch.randn(batch, 8, 6, 32, generator=gen),
                      face=torch.randn(batch, 16, 1, 8, 8, generator=gen))  # the reference's face latent
    return x0, cond


@contextlib.contextmanager
def _zeroed(model: torch.nn.Module, adapter: str):
    """Temporarily set one adapter's LoRA B matrices to zero (the adapter then adds nothing)."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n and f".{adapter}." in n}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in saved:
            params[n].zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)


@pytest.fixture(scope="module")
def tpo_model():
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    add_tpo_adapters(model, TPOObjective(lora_rank=4))
    wake_zero_inits(model)
    return model


# --- Diffusion-DPO math -------------------------------------------------------------------------

def test_dpo_loss_math():
    """log 2 at policy == reference; no gradient into the reference; zero gradient only for identical
    pairs (in general it is beta/2 (grad e_w - grad e_l)); lowering the winner error lowers the loss."""
    beta = 10.0
    w = torch.tensor([0.5, 0.7], requires_grad=True)
    l = torch.tensor([0.6, 0.4], requires_grad=True)
    w_ref, l_ref = w.detach().clone().requires_grad_(True), l.detach().clone().requires_grad_(True)
    out = diffusion_dpo_loss(w, l, w_ref, l_ref, beta)
    assert torch.allclose(out.loss, torch.full((2,), math.log(2.0)))
    assert torch.equal(out.implicit_acc, torch.full((2,), 0.5))
    out.loss.sum().backward()
    assert w_ref.grad is None and l_ref.grad is None  # the reference never gets gradient
    assert torch.allclose(w.grad, torch.full((2,), beta / 2)) and torch.allclose(l.grad, torch.full((2,), -beta / 2))

    # identical winner and loser (same network, same x0): the parameter gradient is exactly zero
    theta = torch.tensor([1.3, -0.2], requires_grad=True)
    err = (theta ** 2).sum().reshape(1)
    same = diffusion_dpo_loss(err, err, err.detach(), err.detach(), beta)
    (grad,) = torch.autograd.grad(same.loss.sum(), theta)
    assert torch.equal(grad, torch.zeros(2))

    # lowering the winner's error (reference fixed) lowers the loss and flips the implicit accuracy
    better = diffusion_dpo_loss(w.detach() - 0.01, l.detach(), w_ref.detach(), l_ref.detach(), beta)
    assert bool((better.loss < math.log(2.0)).all()) and torch.equal(better.implicit_acc, torch.ones(2))
    assert torch.allclose(better.reward_margin, torch.full((2,), beta * 0.01))
    worse = diffusion_dpo_loss(w.detach(), l.detach() - 0.01, w_ref.detach(), l_ref.detach(), beta)
    assert bool((worse.loss > math.log(2.0)).all()) and torch.equal(worse.implicit_acc, torch.zeros(2))


def test_rewards_by_import_path_resolve_anywhere_and_fail_at_start():
    """A user reward named 'package.module:function' imports in any process; a wrong one fails config checks."""
    from pydantic import ValidationError

    from ray_jobs.preferences import PreferencesConfig
    from ray_jobs.preferences.rewards import get_reward, gt_motion

    cfg = PreferencesConfig(rewards={"motion": "ray_jobs.preferences.rewards:gt_motion", "fidelity": "gt_fidelity"})
    assert get_reward(cfg.rewards["motion"]) is gt_motion
    with pytest.raises(ValidationError, match="no attribute 'nope'"):
        PreferencesConfig(rewards={"motion": "ray_jobs.preferences.rewards:nope", "fidelity": "gt_fidelity"})
    with pytest.raises(ValidationError, match="cannot import module"):
        PreferencesConfig(rewards={"motion": "not_a_package.rewards:score", "fidelity": "gt_fidelity"})


def test_pair_picking_with_and_without_the_other_dimension_guard():
    from ray_jobs.preferences.job import pick_pair

    # candidate 0 has the best fidelity but the worst motion; candidate 1 is second on fidelity
    scores = {"fidelity": np.array([0.9, 0.7, 0.2, 0.5]), "motion": np.array([-0.30, -0.10, -0.12, -0.20])}
    assert pick_pair(scores, "fidelity", 0.0, None) == (0, 2)  # best vs worst, motion ignored
    assert pick_pair(scores, "fidelity", 0.0, 0.0) == (1, 2)  # widest pair whose winner does not lose motion
    assert pick_pair(scores, "fidelity", 0.0, 0.25) == (0, 2)  # tolerance wide enough to allow the trade
    assert pick_pair(scores, "motion", 0.0, None) == (1, 0)
    assert pick_pair(scores, "motion", 0.0, 0.0) == (1, 3)  # 1 beats 0 by 0.2 on motion but loses fidelity to it
    assert pick_pair(scores, "fidelity", 0.8, None) is None  # margin 0.7 does not pass 0.8
    assert pick_pair({"motion": np.array([0.1, 0.1])}, "motion", 0.0, 0.0) is None  # ties are no preference


# --- segment routing on outputs -------------------------------------------------------------------

def test_routed_sampler_uses_motion_above_and_fidelity_below_boundary(tpo_model):
    """Every call of the default-shaped routed sampler (2 + 3 guided steps: 10 NFE; the default spends 30): zeroing an adapter changes that call's output
    only in its own segment (σ > σ_b: motion; σ <= σ_b, σ_b itself included: fidelity)."""
    model = tpo_model.eval()
    _, cond = _inputs(batch=1)
    uncond = cond.drop({"pose", "audio", "face"})
    effect = []  # (sigma, |Δv| without motion, |Δv| without fidelity)

    def probe(x, sigma, c):
        v = model(x, sigma, c)
        deltas = []
        for adapter in ADAPTERS:
            with _zeroed(model, adapter):
                deltas.append(float((model(x, sigma, c) - v).abs().max()))
        effect.append((float(sigma[0]), *deltas))
        return v

    noise = torch.randn(1, 16, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = sample_segment_routed(probe, noise, cond, uncond, default_tpo_plan(BOUNDARY, motion_steps=2, fidelity_steps=3),
                                    lambda name: use_adapter(model, name))
    assert out.nfe == 10 == len(effect) and sum(seg.nfe for seg in default_tpo_plan(BOUNDARY)) == 30
    above = [(s, m, f) for s, m, f in effect if s > BOUNDARY]
    below = [(s, m, f) for s, m, f in effect if s <= BOUNDARY]
    assert len(above) == 4 and len(below) == 6 and any(s == BOUNDARY for s, _, _ in below)
    assert all(m > 1e-3 and f == 0.0 for _, m, f in above), above
    assert all(f > 1e-3 and m == 0.0 for _, m, f in below), below
    use_adapter(model, None)
    model.train()


# --- per-segment training -------------------------------------------------------------------------

def _batch(dimensions: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    x0, cond = _inputs(batch=len(dimensions), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return {"ref_latent": cond.ref_latent, "pose": ((cond.pose + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1),
            "audio_feats": cond.audio, "ref_face_latent": cond.face,
            "has_audio": torch.ones(len(dimensions), dtype=torch.bool),
            "has_ref_face": torch.ones(len(dimensions), dtype=torch.bool),
            "winner_latents": x0, "loser_latents": x0 + 0.3 * torch.randn(x0.shape, generator=gen),
            "is_motion": torch.tensor([d == "motion" for d in dimensions])}


def _lora_layer(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return next(m for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_each_adapter_trains_only_on_its_segment(tpo_model, tmp_path):
    model = tpo_model.train()
    cfg = TPOConfig(model=ModelConfig(pretrained_path=str(tmp_path)), tpo=TPOObjective(sigma_boundary=BOUNDARY))
    task = TPOTask(cfg, ModelCard(kind="teacher"))
    groups = task.param_groups(model)
    assert [g["name"] for g in groups] == list(ADAPTERS)
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert {id(p) for g in groups for p in g["params"]} == lora and sum(len(g["params"]) for g in groups) == len(lora)

    seen = []  # (sigma, active adapter or None when disabled, grad enabled)
    layer = _lora_layer(model)
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(
        (args[1].clone(), None if layer.disable_adapters else layer.active_adapters[0], torch.is_grad_enabled())))
    gen = torch.Generator().manual_seed(0)
    try:
        for dims in (["motion", "fidelity", "motion"], ["motion", "motion"], ["fidelity", "fidelity"]) * 4:
            model.zero_grad(set_to_none=True)
            loss, metrics = task.micro_step(model, _batch(dims), gen)
            loss.backward()
            for adapter in ADAPTERS:
                trained = adapter in dims
                grads = [p.grad for p in adapter_params(model, adapter)]
                # an adapter without pairs in the batch still gets (zero) gradients: DeepSpeed reduces
                # every trainable parameter on every rank, so all ranks must produce the same set
                assert all(g is not None for g in grads)
                assert all(g.abs().sum() > 0 for g in grads) if trained else all(g.abs().sum() == 0 for g in grads)
                assert (f"sigma_min_{adapter}" in metrics) == trained
            base = [p for n, p in model.named_parameters() if "lora_" not in n]
            assert all(p.grad is None for p in base)
    finally:
        hook.remove()
    policy = [(s, a) for s, a, g in seen if g]
    assert all(a is not None for s, a in policy) and all(a is None for s, a, g in seen if not g)  # reference: disabled, no grad
    motion = torch.cat([s for s, a in policy if a == "motion"])
    fidelity = torch.cat([s for s, a in policy if a == "fidelity"])
    assert motion.min() > BOUNDARY and motion.max() <= 1.0 and fidelity.min() >= 0.0 and fidelity.max() < BOUNDARY
    assert motion.numel() >= 6 and fidelity.numel() >= 6
    # the flags were never flipped by switching: both adapters still train
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


# --- Ray jobs -------------------------------------------------------------------------------------
# These use their own small shard set (schema of docs/design.md, a moving square per clip, latents
# drawn at random) and a random-weight tiny VAE folder instead of the session `tiny_data` fixture:
# the checked-in tiny VAE is not there yet (model/assets/tiny_vae), and preprocessing costs ~2 min.

def _clip_row(i: int, rng: np.random.Generator) -> dict:
    frames = np.full((8, 64, 64, 3), 40, np.uint8)
    for t in range(8):
        x = 8 + 4 * t + i
        frames[t, 20:36, x:x + 16] = (200, 120, 60)
    mask = np.zeros((8, 16, 16), np.float32)
    mask[:, 5:9, 2:14] = 1.0
    pose = np.zeros((8, 64, 64, 3), np.uint8)
    pose[:, 26:30, 10:50] = 255
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {"video_id": f"v{i // 2}", "clip_index": i % 2, "identity_id": f"id{i}", "split": "train",
            "frames": frames, "ref_frame": frames[0], "keypoints": np.zeros((8, 17, 3), np.float32), "pose": pose,
            "audio_feats": f32(8, 6, 32), "has_audio": True, "has_face": True, "has_ref_face": True,
            "face_boxes": np.tile(np.array([16, 16, 40, 40], np.float32), (8, 1)), "motion_mask": mask,
            "latents": f32(16, 8, 16, 16), "ref_latent": f32(16, 1, 16, 16), "ref_face_latent": f32(16, 1, 8, 8)}


@pytest.fixture(scope="module")
def small_shards(s3_server, tmp_path_factory):
    import ray.data
    from conftest import default_ray

    default_ray()
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    ray.data.from_items([_clip_row(i, rng) for i in range(8)]).repartition(2).write_parquet(str(root / "data"))
    Storage().write_json(str(root / "manifest.json"), {"shards": [f"data/{p.name}" for p in sorted((root / "data").glob("*.parquet"))]})
    return str(root)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[False, False], latents_mean=[0.0] * 16,
                     latents_std=[1.0] * 16).save_pretrained(str(folder))
    return str(folder)

@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory):
    """A tiny denoiser export folder (random init, 2 of the preset's 4 blocks: half the compute of every
    DPO step; the jobs only need the teacher's format and read the depth from its saved config)."""
    folder = tmp_path_factory.mktemp("teacher") / "export"
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(overrides={"num_layers": 2}))
    wake_zero_inits(model, scale=0.02)
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def test_pairs_job_writes_pairs_and_manifest_to_s3(small_shards, tiny_vae_dir, random_teacher, s3_bucket, s3_server):
    from artifacts.pairs import read_pairs
    from ray_jobs.preferences import PreferencesConfig, run

    output = f"{s3_bucket}/prefs"
    cfg = PreferencesConfig.model_validate({
        "data": small_shards, "output": output, "max_clips": 2,
        "model": {"pretrained_path": random_teacher, "vae_path": tiny_vae_dir},
        "sampling": {"num_candidates": 3, "steps": 2, "guidance": 1.0},
        "rewards": {"motion": "ray_jobs.preferences.rewards:gt_motion", "fidelity": "gt_fidelity"},  # resolved in the actor
        "storage": {"endpoint_url": s3_server.endpoint_url}, "actors": {"num_cpus": 0.5},
        "precision": "bf16"})  # the GPU default's code path, on CPU
    manifest = run(cfg)
    storage = Storage(cfg.storage)
    assert storage.read_json(f"{output}/manifest.json") == json.loads(json.dumps(manifest))
    assert 1 <= manifest["num_pairs"] <= 4 and set(manifest["pairs_by_dimension"]) <= {"motion", "fidelity"}
    assert all(storage.exists(f"{output}/{rel}") for rel in manifest["shards"])
    # the shards' raw-byte tensor encoding (artifacts.tables), not Ray's tensor extension type
    import pyarrow.parquet as pq

    from artifacts.tables import ENCODING, tensor_column_schema

    assert manifest["encoding"] == ENCODING
    fs, path = storage.arrow_path(f"{output}/{manifest['shards'][0]}")
    schema = tensor_column_schema(pq.read_schema(path, filesystem=fs))
    assert schema["winner_latents"] == (np.dtype("<f4"), (16, 8, 16, 16)) and schema["pose"][0] == np.uint8
    rows = read_pairs(output, storage).take_all()
    assert len(rows) == manifest["num_pairs"]
    for row in rows:
        assert row["winner_latents"].shape == row["loser_latents"].shape == (16, 8, 16, 16)
        assert not np.array_equal(row["winner_latents"], row["loser_latents"])
        assert row["margin"] > 0 and np.isclose(row["winner_reward"] - row["loser_reward"], row["margin"], atol=1e-5)
        assert row["ref_latent"].shape == (16, 1, 16, 16) and row["pose"].dtype == np.uint8
        assert row["ref_face_latent"].shape == (16, 1, 8, 8) and row["has_ref_face"]  # the reference's face only
    assert np.isfinite(rows[0]["winner_latents"]).all() and rows[0]["winner_latents"].std() > 0.1  # bf16 sampled


def _synthetic_pairs(shards: str, out: str) -> int:
    """Pairs with a known preference, written as the preferences job writes them: winner = the true latents;
    motion loser = the first latent frame frozen over time, fidelity loser = the true latents plus noise."""
    from artifacts.pairs import CONDITION_COLUMNS, pairs_manifest, write_pair_file
    from artifacts.shards import read_shards

    keys = ["video_id", "clip_index", "identity_id"]
    rng = np.random.default_rng(0)
    rows = []
    for clip in read_shards(shards, Storage(), split="train", columns=CONDITION_COLUMNS + keys + ["latents"]).take_all():
        truth = clip.pop("latents")
        frozen = np.repeat(truth[:, :1], truth.shape[1], axis=1)
        noisy = truth + 0.5 * rng.standard_normal(truth.shape).astype(np.float32)
        for dimension, loser in (("motion", frozen), ("fidelity", noisy)):
            rows.append({**clip, "dimension": dimension, "winner_latents": truth, "loser_latents": loser,
                         "margin": 1.0, "winner_reward": 1.0, "loser_reward": 0.0})
    files = [write_pair_file({k: np.stack([r[k] for r in part]) for k in part[0]}, out, Storage())
             for part in (rows[:len(rows) // 2], rows[len(rows) // 2:])]
    Storage().write_json(f"{out}/manifest.json", pairs_manifest(files, [r["dimension"] for r in rows], {}))
    return len(rows)


def test_two_worker_tpo_run_lifts_implicit_accuracy(small_shards, random_teacher, tmp_path):
    from ray_jobs.train_tpo import run

    pairs = str(tmp_path / "pairs")
    assert _synthetic_pairs(small_shards, pairs) >= 16
    cfg = TPOConfig.model_validate({
        "data": pairs, "steps": 30, "batch_size": 4, "model": {"pretrained_path": random_teacher},
        "optim": {"lr": 1e-3}, "tpo": {"beta": 500.0, "lora_rank": 4},
        "checkpoint": {"every_n_steps": 15}, "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"name": "tpo", "storage_path": str(tmp_path / "runs"), "fail_at_step": 20, "max_failures": 1}})
    result = run(cfg)
    assert result.metrics["step"] == 30
    # it failed at step 20 and resumed from step 15's checkpoint, which holds the adapters but not the frozen teacher
    assert (tmp_path / "runs" / "tpo" / "_injected_failure").exists()
    checkpoint = sorted((tmp_path / "runs" / "tpo").glob("checkpoint_*"))[0]
    saved = torch.load(checkpoint / "ds" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    assert saved and all("lora_" in name for name in saved)
    lines = [json.loads(ln) for ln in (tmp_path / "runs" / "tpo" / "metrics.jsonl").read_text().splitlines()]
    late = [ln[f"implicit_acc_{a}"] for ln in lines[-10:] for a in ADAPTERS if f"implicit_acc_{a}" in ln]
    print("implicit accuracy, last 10 steps:", np.mean(late), "first step:", lines[0])
    assert np.mean(late) > 0.5 + 0.15
    for ln in lines:
        assert ln.get("sigma_min_motion", 1.0) > BOUNDARY and ln.get("sigma_max_fidelity", 0.0) < BOUNDARY
    export = tmp_path / "runs" / "tpo" / "export"
    assert all((export / name / "pytorch_lora_weights.safetensors").is_file() for name in ADAPTERS)
    from artifacts.exports import load_export

    loaded = load_export(str(export), Storage())  # the teacher + both experts, from the card alone
    assert loaded.card.kind == "tpo" and loaded.card.base_model == random_teacher
    assert loaded.sampler.tpo_boundary == BOUNDARY and loaded.sampler.nfe == 30  # the teacher card's guidance 1.5: CFG in both
    teacher = loaded.model
    assert any(p.abs().max() > 0 for n, p in teacher.named_parameters() if "lora_B" in n)  # trained, not the zero init


def test_tpo_runs_in_bf16_to_its_export(small_shards, random_teacher, tmp_path):
    """bf16 on CPU (the GPU default's code path) to the final checkpoint and the export, written in the run's precision."""
    from safetensors.torch import load_file

    from ray_jobs.train_tpo import run

    pairs = str(tmp_path / "pairs")
    _synthetic_pairs(small_shards, pairs)
    cfg = TPOConfig.model_validate({
        "data": pairs, "steps": 1, "batch_size": 2, "model": {"pretrained_path": random_teacher},
        "tpo": {"lora_rank": 2}, "deepspeed": {"precision": "bf16"}, "checkpoint": {"every_n_steps": 1},
        "run": {"name": "tpo16", "storage_path": str(tmp_path / "runs")}, "scaling": {"num_workers": 1, "cpus_per_worker": 1}})
    result = run(cfg)
    assert result.metrics["step"] == 1 and result.checkpoint is not None and np.isfinite(result.metrics["loss"])
    for name in ADAPTERS:
        adapter = load_file(str(tmp_path / "runs" / "tpo16" / "export" / name / "pytorch_lora_weights.safetensors"))
        assert {v.dtype for v in adapter.values()} == {torch.bfloat16}
    assert any(v.float().abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # one step moved B off zero
