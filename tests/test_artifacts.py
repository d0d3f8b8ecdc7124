"""Model exports carry their card: serving, evaluation and the next job read how to sample from it.

Real tiny denoisers saved with `artifacts.exports`, loaded back from the folder alone (and from the
moto S3 server), served by the real `AnimationEngine` with a config that names only the folder.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch

from artifacts.card import CARD_FILE, FrameGeometry, ModelCard, read_card
from artifacts.exports import TPO_ADAPTERS, export_adapters, export_denoiser, load_export
from core.storage import Storage
from model.denoiser import lora_config
from model.flow import inference_sigmas
from model.presets import ModelConfig, build_denoiser
from model.samplers import default_tpo_plan
from model.sampling import SamplerSpec


def _teacher(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_denoiser(ModelConfig()).eval()
    with torch.no_grad():  # wake the zero-initialised output layers so outputs depend on the weights
        for name, param in model.named_parameters():
            if not param.abs().any():
                param.normal_(0, 0.02)
    return model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def unusual_teacher(tmp_path_factory):
    """A teacher exported for shift 3, guidance 2.5, audio-only CFG drop and 48x48 frames (nothing a default says)."""
    folder = tmp_path_factory.mktemp("teacher") / "export"
    model = _teacher()
    spec = SamplerSpec(kind="euler_cfg", steps=3, guidance=2.5, shift=3.0, cfg_drop=["audio"])
    card = ModelCard(kind="teacher", model=ModelConfig(), frames=FrameGeometry(height=48, width=48), sampler=spec)
    export_denoiser(model, _weights(model), folder, card)
    return folder, model, spec


def _request(height: int, width: int, frames: int = 4, steps: int | None = None):
    from serving.inputs import AnimationRequest

    ref = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    audio = np.sin(np.arange(16000) / 7).astype(np.float32)
    return AnimationRequest(ref, audio, None, frames, 16.0, steps, seed=5)


def _record_sigmas(model: torch.nn.Module) -> list[tuple[float, int, tuple[str, ...]]]:
    """(sigma, batch size, active adapters) of every forward of ``model``."""
    calls: list[tuple[float, int, tuple[str, ...]]] = []

    def hook(module, args):
        active = tuple(module.active_adapters()) if getattr(module, "_hf_peft_config_loaded", False) else ()
        calls.append((float(args[1][0]), int(args[0].shape[0]), active))

    model.register_forward_pre_hook(hook)
    return calls


def test_teacher_export_is_served_with_its_cards_shift_guidance_and_frames(unusual_teacher):
    """No serving config names shift, guidance, steps or size: the engine samples as the card says."""
    from model.generate import generate
    from serving.config import ServeAppConfig
    from serving.engine import AnimationEngine

    folder, _, spec = unusual_teacher
    engine = AnimationEngine(ServeAppConfig(export=str(folder), warmup=False))
    assert engine.served.spec == spec and (engine.height, engine.width) == (48, 48) and engine.served.default_steps == 3
    calls = _record_sigmas(engine.model)
    request = _request(48, 48, steps=3)
    animation = engine.generate_batch([request])[0]
    # Euler on the shift-3 table, every step with CFG (a conditional and an unconditional pass): 2 NFE per step
    table = inference_sigmas(3, 3.0)[:-1].tolist()
    assert [c[0] for c in calls] == pytest.approx([s for s in table for _ in range(2)], abs=1e-6)
    assert animation.nfe == 6 and animation.frames.shape == (4, 48, 48, 3)
    cond = engine.conditions(request)
    direct = generate(engine.model, engine.vae, cond, 4, 48, 48, spec=spec, seed=5)
    default = generate(engine.model, engine.vae, cond, 4, 48, 48, spec=SamplerSpec(steps=3), seed=5)
    assert np.abs(direct.frames.numpy().astype(int) - animation.frames.astype(int)).max() <= 1
    assert np.abs(default.frames.numpy().astype(int) - animation.frames.astype(int)).max() > 1  # defaults differ


def test_tpo_export_is_served_on_its_segment_boundary(unusual_teacher, tmp_path):
    """A TPO export with boundary 0.6: motion adapter above it, fidelity below, from the card alone."""
    from serving.config import ServeAppConfig
    from serving.engine import AnimationEngine

    teacher_folder, base, _ = unusual_teacher
    teacher = copy.deepcopy(base)
    for name in TPO_ADAPTERS:
        teacher.add_adapter(lora_config(rank=2), adapter_name=name)
    with torch.no_grad():
        for name, param in teacher.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    plan = default_tpo_plan(0.6, motion_steps=2, fidelity_steps=3, motion_guidance=1.0, fidelity_guidance=1.0)
    card = ModelCard(kind="tpo", format="lora", base_model=str(teacher_folder), adapters=list(TPO_ADAPTERS),
                     frames=FrameGeometry(height=48, width=48),
                     sampler=SamplerSpec(kind="tpo", shift=1.0, tpo_boundary=0.6, tpo_plan=plan))
    export_adapters(teacher, _weights(teacher), tmp_path / "tpo", card, fused=False)
    engine = AnimationEngine(ServeAppConfig(export=str(tmp_path / "tpo"), warmup=False))
    assert engine.served.default_steps == 5
    calls = _record_sigmas(engine.model)
    animation = engine.generate_batch([_request(48, 48)])[0]
    assert animation.nfe == 5 and len(calls) == 5
    for sigma, batch, active in calls:  # guidance 1 in both segments: one pass per step, no unconditional one
        assert active == (("motion",) if sigma > 0.6 + 1e-6 else ("fidelity",)), (sigma, active)
    assert [c[0] for c in calls][2] == pytest.approx(0.6)  # the boundary itself is the fidelity expert's


def test_export_round_trips_through_s3_and_old_folders_get_an_inferred_card(unusual_teacher, tmp_path, s3_bucket,
                                                                            storage, caplog):
    folder, model, spec = unusual_teacher
    storage.upload_dir(folder, f"{s3_bucket}/exports/teacher")
    loaded = load_export(f"{s3_bucket}/exports/teacher", storage)
    assert loaded.card.sampler == spec and loaded.adapter_switch is None
    got = dict(loaded.model.named_parameters())
    assert all(torch.equal(p, got[n]) for n, p in model.named_parameters())

    legacy = tmp_path / "legacy_student"
    build_denoiser(ModelConfig()).save_pretrained(str(legacy))
    (legacy / "student.json").write_text(json.dumps({"edges": [0.0, 0.5, 1.0], "segments": 2, "format": "full",
                                                     "aux_head": True, "face_injection": True, "preset": "tiny"}))
    with caplog.at_level(logging.WARNING):
        card = read_card(legacy)
    assert card.inferred and card.kind == "student" and card.sampler.edges == [0.0, 0.5, 1.0]
    assert any(CARD_FILE in r.getMessage() for r in caplog.records)


def test_card_shift_reaches_the_evaluation_variant(unusual_teacher, tmp_path):
    """The evaluation job's row samples as the card says unless told otherwise."""
    from ray_jobs.evaluate import EvaluateConfig, model_variant

    folder, _, spec = unusual_teacher
    variant = model_variant(EvaluateConfig(model=str(folder)), Storage())
    assert variant.spec == spec and variant.name == "teacher"
    fewer = model_variant(EvaluateConfig(model=str(folder), steps=2, guidance=1.0), Storage())
    assert fewer.spec.steps == 2 and fewer.spec.guidance == 1.0 and fewer.spec.shift == 3.0


def test_exports_write_tensors_directly_sharded_in_the_given_dtype(tmp_path):
    """Exports are written from the weights themselves (no second model): a full folder in bf16 safetensors
    shards with diffusers' index loads back equal to the bf16 weights; an adapter file is byte-for-byte
    what diffusers' own ``save_lora_adapter`` writes (tensors and LoraConfig metadata)."""
    from safetensors import safe_open

    from artifacts.exports import write_lora_adapter

    model = _teacher()
    card = ModelCard(kind="teacher", model=ModelConfig(), frames=FrameGeometry(height=64, width=64),
                     sampler=SamplerSpec(kind="euler_cfg", steps=2))
    folder = tmp_path / "sharded"
    export_denoiser(model, _weights(model), folder, card, dtype=torch.bfloat16, max_shard_size="2MB")
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2 and set(index["weight_map"]) == set(model.state_dict())
    loaded = load_export(str(folder), Storage()).model
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16).float()), name

    model.add_adapter(lora_config(rank=2), adapter_name="motion")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    write_lora_adapter(_weights(model), model, "motion", tmp_path / "ours")
    copy.deepcopy(model).save_lora_adapter(str(tmp_path / "theirs"), adapter_name="motion")
    files = [safe_open(str(tmp_path / side / "pytorch_lora_weights.safetensors"), "pt") for side in ("ours", "theirs")]
    assert set(files[0].keys()) == set(files[1].keys()) and len(list(files[0].keys())) > 0
    assert all(torch.equal(files[0].get_tensor(k), files[1].get_tensor(k)) for k in files[0].keys())
    configs = [json.loads(f.metadata()["lora_adapter_metadata"]) for f in files]
    configs[1]["target_modules"] = sorted(configs[1]["target_modules"])  # theirs: a set's order; ours sorted
    assert configs[0] == configs[1] and configs[0]["r"] == 2
