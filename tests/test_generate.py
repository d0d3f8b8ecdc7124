"""generate(): the real tiny denoiser, real Conditions and the real VideoVAE wrapper, through all three sampler specs."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from model.conditions import Conditions
from model.denoiser import lora_config, use_adapter
from model.generate import generate, latent_shape
from model.presets import ModelConfig, build_denoiser
from model.samplers import SegmentPlan
from model.sampling import SamplerSpec
from model.vae import VideoVAE


@pytest.fixture(scope="module")
def setup():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig()).eval()
    model.add_adapter(lora_config(rank=2), adapter_name="motion")
    model.add_adapter(lora_config(rank=2), adapter_name="fidelity")
    # Random-weight tiny Wan VAE (spatial factor 4, temporal 1) behind the project's wrapper: decode is real.
    vae = VideoVAE(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                                    temperal_downsample=[False, False], latents_mean=[0.0] * 16, latents_std=[1.0] * 16))
    gen = torch.Generator().manual_seed(0)
    cond = Conditions(
        ref_latent=torch.randn(1, 16, 1, 16, 16, generator=gen),
        pose=torch.rand(1, 3, 8, 64, 64, generator=gen) * 2 - 1,
        audio=torch.randn(1, 8, 6, 32, generator=gen),
        face=torch.randn(1, 16, 8, 8, 8, generator=gen),
    )
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(float(args[1][0])))
    yield model, vae, cond, ["ref", "pose", "audio", "face"], calls
    torch.set_num_threads(previous)


def test_latent_shape_follows_vae_geometry(setup):
    _, vae, *_ = setup
    assert latent_shape(vae, 8, 64, 64) == (1, 16, 8, 16, 16)
    with pytest.raises(ValueError, match="spatial factor"):
        latent_shape(vae, 8, 62, 64)


def test_euler_cfg_frames_nfe_and_seed(setup):
    model, vae, cond, drop, calls = setup
    calls.clear()
    events = []
    spec = SamplerSpec(kind="euler_cfg", steps=3, guidance=2.0, cfg_drop=drop)
    out = generate(model, vae, cond, num_frames=8, spec=spec, seed=1, callback=events.append)
    assert out.frames.shape == (8, 64, 64, 3) and out.frames.dtype == torch.uint8
    assert out.nfe == 6 == len(calls) and out.seconds > 0 and events[-1].step == events[-1].total_steps == 3
    again = generate(model, vae, cond, num_frames=8, spec=spec, seed=1)
    other = generate(model, vae, cond, num_frames=8, spec=spec, seed=2)
    assert torch.equal(out.frames, again.frames) and not torch.equal(out.frames, other.frames)
    assert out.frames.float().std() > 0  # decoded pixels vary, not a constant image


def test_tpo_switches_real_adapters_and_spends_plan_nfe(setup):
    model, vae, cond, drop, calls = setup
    switched = []

    def switch(name):
        switched.append(name)
        use_adapter(model, name)

    calls.clear()
    out = generate(model, vae, cond, num_frames=8, spec=SamplerSpec(kind="tpo", cfg_drop=drop), adapter_switch=switch, seed=0)
    assert out.nfe == 30 == len(calls) and switched == ["motion", "fidelity"]
    plan = [SegmentPlan(name="motion", sigma_high=1.0, sigma_low=0.8, steps=1, guidance=1.0, adapter="motion"),
            SegmentPlan(name="fidelity", sigma_high=0.8, sigma_low=0.0, steps=2, guidance=3.0, adapter=None)]
    calls.clear()
    small = generate(model, vae, cond, num_frames=8, spec=SamplerSpec(kind="tpo", tpo_plan=plan), adapter_switch=switch)
    assert small.nfe == 5 == len(calls) and switched[-2:] == ["motion", None]
    with pytest.raises(ValueError, match="from its plan"):
        SamplerSpec(kind="tpo", steps=4)


def test_consistency_runs_k_nfe_on_the_edges_without_cfg(setup):
    model, vae, cond, _, calls = setup
    use_adapter(model, None)
    calls.clear()
    out = generate(model, vae, cond, num_frames=8, spec=SamplerSpec(kind="consistency", steps=4))
    assert out.nfe == 4 and calls == [1.0, 0.75, 0.5, 0.25]
    calls.clear()
    out = generate(model, vae, cond, num_frames=8, spec=SamplerSpec(kind="consistency", edges=[0.0, 0.6, 1.0]))
    assert out.nfe == 2 and calls == pytest.approx([1.0, 0.6]) and out.frames.shape == (8, 64, 64, 3)
    with pytest.raises(ValueError, match="never runs CFG"):
        SamplerSpec(kind="consistency", guidance=3.0)


def test_spec_shift_and_step_overrides_reach_the_model(setup):
    """The spec's shift sets the sigma table; with_steps respects what a student's edges fix."""
    from model.flow import inference_sigmas

    model, vae, cond, drop, calls = setup
    calls.clear()
    spec = SamplerSpec(kind="euler_cfg", steps=3, guidance=1.0, shift=3.0)
    out = generate(model, vae, cond, num_frames=8, spec=spec)
    assert out.nfe == 3 and calls == pytest.approx(inference_sigmas(3, 3.0)[:-1].tolist(), abs=1e-6)
    assert calls != pytest.approx(inference_sigmas(3, 1.0)[:-1].tolist(), abs=1e-3)
    assert spec.with_steps(7).steps == 7 and spec.with_steps(7).nfe == 7
    student = SamplerSpec(kind="consistency", edges=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="distilled for 2 steps"):
        student.with_steps(4)
    assert student.consistency_at(4).consistency_edges().tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError, match="unknown conditions"):
        SamplerSpec(cfg_drop=["pose", "lips"])
