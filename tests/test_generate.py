"""generate(): the real tiny denoiser, real Conditions and the real VideoVAE wrapper, through all three samplers."""

import pytest
import torch
from diffusers import AutoencoderKLWan

from model.conditions import Conditions
from model.denoiser import lora_config, use_adapter
from model.generate import generate, latent_shape
from model.presets import ModelConfig, build_denoiser
from model.samplers import SegmentPlan
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
    yield model, vae, cond, cond.drop({"ref", "pose", "audio", "face"}), calls
    torch.set_num_threads(previous)


def test_latent_shape_follows_vae_geometry(setup):
    _, vae, *_ = setup
    assert latent_shape(vae, 8, 64, 64) == (1, 16, 8, 16, 16)
    with pytest.raises(ValueError, match="spatial factor"):
        latent_shape(vae, 8, 62, 64)


def test_euler_cfg_frames_nfe_and_seed(setup):
    model, vae, cond, uncond, calls = setup
    calls.clear()
    events = []
    out = generate(model, vae, cond, uncond, num_frames=8, steps=3, guidance=2.0, seed=1, callback=events.append)
    assert out.frames.shape == (8, 64, 64, 3) and out.frames.dtype == torch.uint8
    assert out.nfe == 6 == len(calls) and out.seconds > 0 and events[-1].step == events[-1].total_steps == 3
    again = generate(model, vae, cond, uncond, num_frames=8, steps=3, guidance=2.0, seed=1)
    other = generate(model, vae, cond, uncond, num_frames=8, steps=3, guidance=2.0, seed=2)
    assert torch.equal(out.frames, again.frames) and not torch.equal(out.frames, other.frames)
    assert out.frames.float().std() > 0  # decoded pixels vary, not a constant image


def test_tpo_switches_real_adapters_and_spends_plan_nfe(setup):
    model, vae, cond, uncond, calls = setup
    switched = []

    def switch(name):
        switched.append(name)
        use_adapter(model, name)

    calls.clear()
    out = generate(model, vae, cond, uncond, num_frames=8, sampler="tpo", adapter_switch=switch, seed=0)
    assert out.nfe == 30 == len(calls) and switched == ["motion", "fidelity"]
    plan = [SegmentPlan(name="motion", sigma_high=1.0, sigma_low=0.8, steps=1, guidance=1.0, adapter="motion"),
            SegmentPlan(name="fidelity", sigma_high=0.8, sigma_low=0.0, steps=2, guidance=3.0, adapter=None)]
    calls.clear()
    small = generate(model, vae, cond, uncond, num_frames=8, sampler="tpo", tpo_plan=plan, adapter_switch=switch)
    assert small.nfe == 5 == len(calls) and switched[-2:] == ["motion", None]
    with pytest.raises(ValueError, match="tpo_plan"):
        generate(model, vae, cond, uncond, num_frames=8, sampler="tpo", steps=4, adapter_switch=switch)


def test_consistency_runs_k_nfe_on_the_edges_without_cfg(setup):
    model, vae, cond, uncond, calls = setup
    use_adapter(model, None)
    calls.clear()
    out = generate(model, vae, cond, None, num_frames=8, sampler="consistency", steps=4)
    assert out.nfe == 4 and calls == [1.0, 0.75, 0.5, 0.25]
    calls.clear()
    out = generate(model, vae, cond, None, num_frames=8, sampler="consistency", consistency_edges=[0.0, 0.6, 1.0])
    assert out.nfe == 2 and calls == pytest.approx([1.0, 0.6]) and out.frames.shape == (8, 64, 64, 3)
    with pytest.raises(ValueError, match="never runs CFG"):
        generate(model, vae, cond, uncond, num_frames=8, sampler="consistency", guidance=3.0)
