"""Rectified-flow math as Wan trains it: noising, velocity targets, Euler steps, timestep shift, sigma tables.

Notation (docs/design.md, /work/shared/PAPERS.md): clean latents x0 (B, C, T, H, W), noise eps ~ N(0, I),
sigma in [0, 1] with sigma = 1 pure noise. x_sigma = (1 - sigma) x0 + sigma eps; the network predicts the
velocity v = eps - x0, so x0 = x_sigma - sigma v and an Euler step is x' = x + (sigma' - sigma) v.

Everything here is a pure function. Per-sample sigmas are (B,) tensors broadcast over the remaining
dimensions; a Python float or 0-d tensor is also accepted where a whole batch shares one sigma.

Where we use diffusers and where we deliberately don't:
- `shift_sigmas` is the same formula as `FlowMatchEulerDiscreteScheduler(shift=s)` (tests check it).
- `inference_sigmas` builds its table through `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`
  (which applies the shift and appends the terminal) but chooses the unshifted grid itself, because
  the scheduler's default grid is linspace(1, 1/num_train_timesteps, N) followed by an appended 0, i.e.
  N model calls of which the last only moves sigma from ~1e-3 to 0, and it cannot build a table for a
  sub-interval [low, high] (TPO segments). Ours is N evenly spaced steps in unshifted time from
  exactly `high` to exactly `low`.
- `sample_training_sigmas` draws the same logit-normal density as diffusers'
  `compute_density_for_timestep_sampling("logit_normal")` (SD3), then applies the shift, but samples
  it by inverse CDF so it can be restricted exactly to [low, high) (TPO segments) without rejection
  loops, with a fixed number of random draws per call (reproducible with a generator).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

__all__ = [
    "add_noise",
    "velocity_target",
    "x0_from_velocity",
    "noise_from_velocity",
    "euler_step",
    "cfg_velocity",
    "shift_sigmas",
    "unshift_sigmas",
    "sample_training_sigmas",
    "inference_sigmas",
]

SigmaLike = torch.Tensor | float


def _per_sample(sigma: SigmaLike, ref: torch.Tensor) -> torch.Tensor:
    """Reshape sigma (B,) or scalar to (B, 1, ..., 1) matching ``ref`` (B, ...); loud on a batch mismatch."""
    if not isinstance(sigma, torch.Tensor):
        return torch.tensor(float(sigma), dtype=ref.dtype, device=ref.device)
    sigma = sigma.to(device=ref.device, dtype=ref.dtype)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] != ref.shape[0]:
        raise ValueError(f"sigma must be a scalar or (B,) with B={ref.shape[0]}, got shape {tuple(sigma.shape)}")
    return sigma.view(-1, *([1] * (ref.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """Rectified-flow forward process x_sigma = (1 - sigma) x0 + sigma eps; x0, noise (B, C, T, H, W), sigma (B,)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow-matching regression target v = eps - x0 (d x_sigma / d sigma); (B, C, T, H, W)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    return noise - x0


def x0_from_velocity(x: torch.Tensor, sigma: SigmaLike, v: torch.Tensor) -> torch.Tensor:
    """Clean estimate x0 = x_sigma - sigma v; x, v (B, C, T, H, W), sigma (B,)."""
    return x - _per_sample(sigma, x) * v


def noise_from_velocity(x: torch.Tensor, sigma: SigmaLike, v: torch.Tensor) -> torch.Tensor:
    """Noise estimate eps = x_sigma + (1 - sigma) v; x, v (B, C, T, H, W), sigma (B,)."""
    return x + (1.0 - _per_sample(sigma, x)) * v


def euler_step(x: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike, v: torch.Tensor) -> torch.Tensor:
    """Euler ODE step x' = x + (sigma_next - sigma) v; x, v (B, C, T, H, W), sigmas (B,) or scalars."""
    return x + (_per_sample(sigma_next, x) - _per_sample(sigma, x)) * v


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, guidance: SigmaLike) -> torch.Tensor:
    """Classifier-free guidance v = v_u + w (v_c - v_u) (Ho & Salimans 2022); v (B, C, T, H, W), w scalar or (B,)."""
    return v_uncond + _per_sample(guidance, v_cond) * (v_cond - v_uncond)


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/Wan timestep shift sigma' = s sigma / (1 + (s - 1) sigma); any shape, same as diffusers' scheduler."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def unshift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Inverse of `shift_sigmas`: sigma = sigma' / (s - (s - 1) sigma'); any shape."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return sigma / (shift - (shift - 1.0) * sigma)


def _check_interval(low: float, high: float) -> None:
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")


def sample_training_sigmas(
    batch: int,
    generator: torch.Generator | None,
    mode: Literal["logit_normal", "uniform"] = "logit_normal",
    shift: float = 1.0,
    mean: float = 0.0,
    std: float = 1.0,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training sigmas (B,): shift(sigmoid(N(mean, std))) (SD3 logit-normal) or shift(U(0,1)), restricted to [low, high).

    The restriction is exact: the density is the unrestricted one conditioned on [low, high) (inverse
    CDF on the truncated interval), so the motion/fidelity segments of TPO see the same relative
    weighting of sigmas as full-range training. Randomness comes only from ``generator``.
    """
    _check_interval(low, high)
    if batch < 1 or std <= 0:
        raise ValueError(f"need batch >= 1 and std > 0, got batch={batch}, std={std}")
    # Bounds in the unshifted variable t, where the base density lives (float64 for the CDF tails).
    t_bounds = unshift_sigmas(torch.tensor([low, high], dtype=torch.float64), shift)
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if mode == "uniform":
        t = t_bounds[0] + u * (t_bounds[1] - t_bounds[0])
    elif mode == "logit_normal":
        z_bounds = (torch.logit(t_bounds) - mean) / std  # logit(0) = -inf, logit(1) = +inf: fine for ndtr
        cdf_lo, cdf_hi = torch.special.ndtr(z_bounds)
        t = torch.sigmoid(mean + std * torch.special.ndtri(cdf_lo + u * (cdf_hi - cdf_lo)))
    else:
        raise ValueError(f"mode must be 'logit_normal' or 'uniform', got {mode!r}")
    sigma = shift_sigmas(t, shift).to(torch.float32)
    # Rounding to float32 can land exactly on `high`; keep the interval half-open as promised.
    below_high = torch.nextafter(torch.tensor(high, dtype=torch.float32), torch.tensor(-1.0))
    return sigma.clamp(min=low, max=below_high.item()).to(device)


def inference_sigmas(num_steps: int, shift: float = 1.0, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Descending sigma table (N+1,) float32 from exactly ``high`` to exactly ``low``, evenly spaced in unshifted time.

    Built with diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`, which shifts the
    grid and appends the terminal 0; we pass our own unshifted grid (see the module docstring for why)
    and set the endpoints exactly so that segment tables meet at their shared boundary.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    _check_interval(low, high)
    t_bounds = unshift_sigmas(torch.tensor([high, low], dtype=torch.float64), shift)
    grid = torch.linspace(t_bounds[0].item(), t_bounds[1].item(), num_steps + 1, dtype=torch.float64)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=grid[:-1].tolist(), device="cpu")
    sigmas = scheduler.sigmas.to(torch.float32).clone()
    if sigmas.shape != (num_steps + 1,):
        raise RuntimeError(f"diffusers returned {tuple(sigmas.shape)} sigmas for {num_steps} steps")
    sigmas[0], sigmas[-1] = high, low  # exact endpoints (the scheduler appends 0 and rounds the shift)
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigma table not strictly decreasing for {num_steps} steps in [{low}, {high}]: {sigmas}")
    return sigmas
