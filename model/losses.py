"""Per-sample training losses (B,): flow matching, pseudo-Huber, Diffusion-DPO and segmented consistency distillation.

Every loss returns one value per sample; the caller reduces (mean over the batch, across workers).
Math follows /work/shared/PAPERS.md. Tensors are latents (B, C, T, h, w) unless stated; per-element
weights broadcast against them (a (B,) weight is applied per sample).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.flow import euler_step, shift_sigmas, velocity_target
from model.samplers import segment_edges

__all__ = [
    "DPOOutput",
    "ConsistencyPair",
    "flow_matching_loss",
    "pseudo_huber",
    "diffusion_dpo_loss",
    "motion_weight_map",
    "consistency_function",
    "consistency_distillation_loss",
    "fine_solver_grid",
    "sample_consistency_pair",
]


def _weighted_mean(elementwise: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over all but the batch dim of weight * elementwise -> (B,); weight (B,) or broadcastable to elementwise."""
    if weight is not None:
        if weight.ndim == 1:
            if weight.shape[0] != elementwise.shape[0]:
                raise ValueError(f"per-sample weight {tuple(weight.shape)} does not match batch {elementwise.shape[0]}")
            weight = weight.view(-1, *([1] * (elementwise.ndim - 1)))
        try:
            broadcast = torch.broadcast_shapes(weight.shape, elementwise.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != elementwise.shape:
            raise ValueError(f"weight {tuple(weight.shape)} does not broadcast to {tuple(elementwise.shape)}")
        elementwise = weight * elementwise
    return elementwise.flatten(1).mean(dim=1)


def flow_matching_loss(
    v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Rectified-flow loss mean(w * (v_pred - (eps - x0))^2) per sample (B,); the per-sample error of Diffusion-DPO too."""
    if v_pred.shape != x0.shape:
        raise ValueError(f"v_pred {tuple(v_pred.shape)} and x0 {tuple(x0.shape)} differ in shape")
    return _weighted_mean((v_pred.float() - velocity_target(x0, noise).float()) ** 2, weight)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pseudo-Huber distance (B,): per-element mean of w * (sqrt((a - b)^2 + c^2) - c), as public LCM code computes it.

    Elementwise form (LCM/AnimateLCM training scripts, c ~ 1e-3), not iCT's whole-sample norm
    sqrt(||a - b||^2 + c^2) - c: it is zero iff a == b, ~ (a - b)^2 / (2c) for |a - b| << c and
    ~ |a - b| for large differences, so every element is scaled alike whatever the latent size.
    """
    if c <= 0:
        raise ValueError(f"pseudo-Huber c must be > 0, got {c}")
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} differ in shape")
    squared = (a.float() - b.float()) ** 2
    # sqrt(d^2 + c^2) - c rewritten as d^2 / (sqrt(d^2 + c^2) + c): same value, no cancellation when |d| << c.
    return _weighted_mean(squared / (torch.sqrt(squared + c * c) + c), weight)


class DPOOutput(NamedTuple):
    """Per-pair Diffusion-DPO loss, implicit accuracy (1, 0.5 on a tie, 0) and reward margin, each (B,)."""

    loss: torch.Tensor
    implicit_acc: torch.Tensor
    reward_margin: torch.Tensor


def diffusion_dpo_loss(
    err_w: torch.Tensor, err_l: torch.Tensor, err_w_ref: torch.Tensor, err_l_ref: torch.Tensor, beta: float
) -> DPOOutput:
    """Diffusion-DPO (Wallace et al. 2023, arXiv 2311.12908): L = -log sigmoid(-beta ((e_w - e_w^ref) - (e_l - e_l^ref))).

    Errors (B,) are per-sample mean squared velocity errors (`flow_matching_loss`) of the winner and
    loser under one shared sigma and noise; the reference errors are detached (the reference never
    gets gradient). reward_margin = -beta ((e_w - e_w^ref) - (e_l - e_l^ref)) is the implicit reward of
    the winner minus the loser; implicit_acc is 1 where it is > 0, 0.5 on a tie (as in the authors'
    code, so policy == reference reads 0.5), else 0. The authors' code scales by -beta/2 instead of
    -beta: their beta equals 2x ours. At policy == reference the loss is log 2 and its gradient is
    beta/2 (grad e_w - grad e_l), zero only for identical winner and loser.
    """
    if beta <= 0:
        raise ValueError(f"DPO beta must be > 0, got {beta}")
    errors = (err_w, err_l, err_w_ref, err_l_ref)
    if any(e.ndim != 1 or e.shape != err_w.shape for e in errors):
        raise ValueError(f"DPO errors must all be (B,), got {[tuple(e.shape) for e in errors]}")
    policy_gap = err_w - err_l
    reference_gap = (err_w_ref - err_l_ref).detach()
    reward_margin = -beta * (policy_gap - reference_gap)
    loss = -F.logsigmoid(reward_margin)
    with torch.no_grad():
        implicit_acc = (reward_margin > 0).float() + 0.5 * (reward_margin == 0).float()
    return DPOOutput(loss=loss, implicit_acc=implicit_acc, reward_margin=reward_margin.detach())


def motion_weight_map(motion_mask: torch.Tensor, motion_weight: float, like: torch.Tensor) -> torch.Tensor:
    """DanceLCM motion-focused weight (B, 1, T, h, w) = 1 + (w_motion - 1) * mask; mask (B, T, h, w) in [0, 1]."""
    expected = (like.shape[0], *like.shape[2:])
    if tuple(motion_mask.shape) != expected:
        raise ValueError(f"motion mask {tuple(motion_mask.shape)} must be (B, T, h, w) = {expected}")
    if motion_weight < 0:
        raise ValueError(f"motion weight must be >= 0, got {motion_weight}")
    return 1.0 + (motion_weight - 1.0) * motion_mask.to(device=like.device, dtype=torch.float32).unsqueeze(1)


def consistency_function(x: torch.Tensor, sigma: torch.Tensor, v: torch.Tensor, sigma_edge: torch.Tensor) -> torch.Tensor:
    """Phased consistency function (PCM/DanceLCM) f = x_sigma + (s_k - sigma) v; x, v (B, C, T, h, w), sigmas (B,)."""
    return euler_step(x, sigma, sigma_edge, v)


def consistency_distillation_loss(
    x_m: torch.Tensor,
    sigma_m: torch.Tensor,
    v_student: torch.Tensor,
    x_hat_n: torch.Tensor,
    sigma_n: torch.Tensor,
    v_target: torch.Tensor,
    sigma_edge: torch.Tensor,
    huber_c: float = 1e-3,
    motion_mask: torch.Tensor | None = None,
    motion_weight: float = 1.0,
) -> torch.Tensor:
    """Segmented consistency loss L_CD (DanceLCM) per sample (B,): d(f_theta(x_m, sigma_m), f_theta-(x_hat_n, sigma_n)).

    ``v_student`` is the student's velocity at (x_m, sigma_m); ``x_hat_n`` is one teacher CFG Euler step
    from x_m to sigma_n; ``v_target`` is the EMA target's velocity at (x_hat_n, sigma_n) (detached here);
    ``sigma_edge`` the segment's lower edge. d is `pseudo_huber`, up-weighted on the motion mask
    (B, T, h, w) by 1 + (motion_weight - 1) * mask when a mask is given.
    """
    if bool((sigma_n > sigma_m).any()) or bool((sigma_edge > sigma_n).any()):
        raise ValueError("need sigma_edge <= sigma_n <= sigma_m for every sample")
    f_student = consistency_function(x_m, sigma_m, v_student, sigma_edge)
    f_target = consistency_function(x_hat_n, sigma_n, v_target, sigma_edge).detach()
    weight = None if motion_mask is None else motion_weight_map(motion_mask, motion_weight, x_m)
    return pseudo_huber(f_student, f_target, huber_c, weight)


def fine_solver_grid(num_points: int, shift: float = 1.0) -> torch.Tensor:
    """Teacher solver grid (num_points + 1,) float32 ascending from 0 to 1: num_points nonzero points (LCM's 50-100 DDIM points).

    Evenly spaced in unshifted time, then shifted, so the grid is densest where inference tables are.
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    grid = shift_sigmas(torch.linspace(0.0, 1.0, num_points + 1, dtype=torch.float64), shift).to(torch.float32)
    grid[0], grid[-1] = 0.0, 1.0
    return grid


class ConsistencyPair(NamedTuple):
    """One distillation draw per sample, each (B,): segment k, sigma_m, sigma_n < sigma_m and the lower edge s_k <= sigma_n."""

    segment: torch.Tensor
    sigma_m: torch.Tensor
    sigma_n: torch.Tensor
    sigma_edge: torch.Tensor


def sample_consistency_pair(
    edges: torch.Tensor, grid: torch.Tensor, batch: int, generator: torch.Generator | None
) -> ConsistencyPair:
    """Draw (k, sigma_m, sigma_n, s_k) per sample: k uniform over segments, sigma_m uniform over grid points in (s_k, s_{k+1}].

    sigma_n is the next point below sigma_m on the grid with the edges merged in, so it never leaves
    the segment: at sigma_n == s_k the target is the teacher's x_hat itself (the boundary condition).
    """
    edges = segment_edges(edges.tolist())
    if grid.ndim != 1 or grid[0] != 0.0 or grid[-1] != 1.0:
        raise ValueError("grid must be 1-D, ascending from 0.0 to 1.0 (see fine_solver_grid)")
    # Merge the edges in; drop grid points within rounding of an edge so no pair is ~0 apart.
    grid = grid.to(torch.float32)
    near_edge = (grid[:, None] - edges[None, :]).abs().min(dim=1).values < 1e-6
    points = torch.unique(torch.cat([grid[~near_edge], edges]))  # sorted ascending
    num_segments = edges.shape[0] - 1
    segment = torch.randint(num_segments, (batch,), generator=generator)
    # Index range of grid points strictly above the lower edge and up to the upper edge.
    first = torch.searchsorted(points, edges[:-1], right=True)
    last = torch.searchsorted(points, edges[1:], right=True) - 1
    counts = last - first + 1
    offset = (torch.rand(batch, generator=generator, dtype=torch.float64) * counts[segment]).long()
    index_m = first[segment] + torch.minimum(offset, counts[segment] - 1)
    return ConsistencyPair(
        segment=segment, sigma_m=points[index_m], sigma_n=points[index_m - 1], sigma_edge=edges[segment]
    )
