"""Flow-matching math: noising, targets, Euler, shift (against diffusers), training and inference sigma tables."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from model.flow import (
    add_noise,
    cfg_velocity,
    euler_step,
    inference_sigmas,
    noise_from_velocity,
    sample_training_sigmas,
    shift_sigmas,
    unshift_sigmas,
    velocity_target,
    x0_from_velocity,
)

torch.set_num_threads(1)


def _pair(seed=0, shape=(3, 4, 2, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_add_noise_per_sample_and_endpoints():
    x0, eps = _pair()
    sigma = torch.tensor([0.0, 0.25, 1.0])
    x = add_noise(x0, eps, sigma)
    assert torch.equal(x[0], x0[0]) and torch.equal(x[2], eps[2])
    assert torch.allclose(x[1], 0.75 * x0[1] + 0.25 * eps[1])
    with pytest.raises(ValueError, match="sigma must be"):
        add_noise(x0, eps, torch.tensor([0.1, 0.2]))


def test_velocity_inverts_to_x0_and_noise():
    x0, eps = _pair(1)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x = add_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    assert torch.allclose(v, eps - x0)
    assert torch.allclose(x0_from_velocity(x, sigma, v), x0, atol=1e-6)
    assert torch.allclose(noise_from_velocity(x, sigma, v), eps, atol=1e-6)


def test_euler_step_follows_the_linear_path_exactly():
    x0, eps = _pair(2)
    v = velocity_target(x0, eps)
    x = add_noise(x0, eps, torch.full((3,), 0.8))
    stepped = euler_step(x, torch.full((3,), 0.8), 0.3, v)
    assert torch.allclose(stepped, add_noise(x0, eps, 0.3), atol=1e-6)


def test_cfg_velocity_per_sample_scale():
    v_c, v_u = _pair(3)
    out = cfg_velocity(v_c, v_u, torch.tensor([0.0, 1.0, 3.0]))
    assert torch.allclose(out[0], v_u[0]) and torch.allclose(out[1], v_c[1], atol=1e-6)
    assert torch.allclose(out[2], v_u[2] + 3.0 * (v_c[2] - v_u[2]), atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_shift_matches_diffusers_scheduler(shift):
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    shifted = FlowMatchEulerDiscreteScheduler(shift=shift).sigmas
    assert torch.allclose(shift_sigmas(plain, shift), shifted, atol=1e-6)
    assert torch.allclose(unshift_sigmas(shifted, shift), plain, atol=1e-6)
    assert shift_sigmas(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)


def test_inference_sigmas_exact_endpoints_and_diffusers_interior():
    sigmas = inference_sigmas(10, shift=3.0)
    assert sigmas.shape == (11,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    t = torch.linspace(1.0, 0.0, 11, dtype=torch.float64)
    assert torch.allclose(sigmas.double(), 3.0 * t / (1 + 2.0 * t), atol=1e-6)
    # Same interior values diffusers gives for the same unshifted grid.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=t[:-1].tolist())
    assert torch.allclose(sigmas, scheduler.sigmas, atol=1e-6)


def test_inference_sigmas_sub_intervals_meet_at_the_boundary():
    top = inference_sigmas(3, shift=3.0, low=0.875, high=1.0)
    bottom = inference_sigmas(7, shift=3.0, low=0.0, high=0.875)
    assert top[0] == 1.0 and top[-1] == bottom[0] == torch.tensor(0.875) and bottom[-1] == 0.0
    assert bool((top > 0.8749).all()) and bool((bottom[1:] < 0.875).all())
    with pytest.raises(ValueError):
        inference_sigmas(0)
    with pytest.raises(ValueError):
        inference_sigmas(4, low=0.5, high=0.5)


def test_training_sigmas_respect_half_open_interval():
    g = torch.Generator().manual_seed(0)
    for low, high, shift in [(0.875, 1.0, 1.0), (0.0, 0.875, 1.0), (0.3, 0.6, 3.0), (0.0, 0.875, 5.0)]:
        for mode in ("logit_normal", "uniform"):
            s = sample_training_sigmas(4096, g, mode=mode, shift=shift, low=low, high=high)
            assert s.shape == (4096,) and s.dtype == torch.float32
            assert bool((s >= low).all()) and bool((s < torch.tensor(high)).all()), (low, high, mode)
            # Restricted sampling should still cover the interval, not collapse onto one end.
            assert s.max() - s.min() > 0.5 * (high - low)


def test_training_sigmas_logit_normal_moments_and_reproducibility():
    s = sample_training_sigmas(50_000, torch.Generator().manual_seed(1), mean=0.5, std=0.7)
    logits = torch.logit(s.double())
    assert logits.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logits.std().item() == pytest.approx(0.7, abs=0.02)
    a = sample_training_sigmas(8, torch.Generator().manual_seed(7), shift=3.0, low=0.2)
    b = sample_training_sigmas(8, torch.Generator().manual_seed(7), shift=3.0, low=0.2)
    assert torch.equal(a, b)


def test_training_sigmas_restriction_is_the_conditional_density():
    # P(sigma < 0.5 | sigma in [0, 0.875)) under the standard logit-normal (shift 1) is Phi(0)/Phi(logit(.875)).
    s = sample_training_sigmas(50_000, torch.Generator().manual_seed(2), high=0.875)
    expected = 0.5 / (0.5 * (1 + math.erf(math.log(0.875 / 0.125) / math.sqrt(2))))
    assert (s < 0.5).double().mean().item() == pytest.approx(expected, abs=0.01)
    uniform = sample_training_sigmas(50_000, torch.Generator().manual_seed(3), mode="uniform", low=0.2, high=0.6)
    assert uniform.mean().item() == pytest.approx(0.4, abs=0.005)


def test_training_sigmas_reject_bad_arguments():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="mode"):
        sample_training_sigmas(4, g, mode="cosine")
    with pytest.raises(ValueError, match="low < high"):
        sample_training_sigmas(4, g, low=0.9, high=0.8)
