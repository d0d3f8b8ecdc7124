"""Losses: flow matching, pseudo-Huber, Diffusion-DPO (through a tiny linear policy) and segmented consistency."""

import math

import pytest
import torch

from model.flow import add_noise, euler_step, velocity_target
from model.losses import (
    consistency_distillation_loss,
    diffusion_dpo_loss,
    fine_solver_grid,
    flow_matching_loss,
    motion_weight_map,
    pseudo_huber,
    sample_consistency_pair,
)
from model.samplers import segment_edges

torch.set_num_threads(1)

SHAPE = (3, 4, 2, 4, 4)


def _randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_flow_matching_loss_per_sample_and_weights():
    x0, eps = _randn(0), _randn(1)
    target = eps - x0
    assert torch.equal(flow_matching_loss(target, x0, eps), torch.zeros(3))
    v = target.clone()
    v[1] += 2.0
    loss = flow_matching_loss(v, x0, eps)
    assert torch.allclose(loss, torch.tensor([0.0, 4.0, 0.0]))
    assert torch.allclose(flow_matching_loss(v, x0, eps, weight=torch.tensor([1.0, 0.5, 1.0])), torch.tensor([0.0, 2.0, 0.0]))
    half = torch.zeros(SHAPE[1:]).index_fill_(0, torch.tensor([0, 1]), 1.0)  # channels 0-1 weighted, 2-3 not
    assert torch.allclose(flow_matching_loss(v, x0, eps, weight=half), torch.tensor([0.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="broadcast"):
        flow_matching_loss(v, x0, eps, weight=torch.ones(5, 1, 1))


def test_pseudo_huber_zero_iff_equal_and_limits():
    a = _randn(2)
    assert torch.equal(pseudo_huber(a, a.clone(), 1e-3), torch.zeros(3))
    b = a.clone()
    b[0, 0, 0, 0, 0] += 1e-3
    assert pseudo_huber(a, b, 1e-3)[0] > 0 and pseudo_huber(a, b, 1e-3)[1] == 0
    # Small differences: ~ mean((a - b)^2) / (2c).
    c, small = 1.0, 1e-3 * _randn(3)
    expected = (small**2).flatten(1).mean(1) / (2 * c)
    assert torch.allclose(pseudo_huber(a + small, a, c), expected, rtol=1e-3)
    # Large differences: ~ mean |a - b| - c.
    big = 100.0 * _randn(4)
    assert torch.allclose(pseudo_huber(a + big, a, 1e-3), big.abs().flatten(1).mean(1), rtol=1e-4)
    with pytest.raises(ValueError):
        pseudo_huber(a, a, 0.0)


class TinyPolicy(torch.nn.Module):
    """A linear 'velocity model' on flattened latents: enough to exercise DPO gradients end to end."""

    def __init__(self, dim, seed):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(0.1 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
            self.linear.bias.zero_()

    def forward(self, x):
        return self.linear(x.flatten(1)).view_as(x)


def _dpo_errors(policy, reference, x_w, x_l, eps, sigma):
    """Per-sample flow errors of winner and loser under one shared sigma and noise, policy and reference."""
    errs = []
    for net in (policy, reference):
        for x0 in (x_w, x_l):
            errs.append(flow_matching_loss(net(add_noise(x0, eps, sigma)), x0, eps))
    return errs  # e_w, e_l, e_w_ref, e_l_ref


def test_dpo_at_reference_loss_log2_and_gradients():
    shape, beta = (4, 2, 1, 2, 2), 50.0
    policy, reference = TinyPolicy(8, 0), TinyPolicy(8, 0)
    x_w, x_l, eps = _randn(5, shape), _randn(6, shape), _randn(7, shape)
    sigma = torch.full((4,), 0.6)
    e_w, e_l, e_w_ref, e_l_ref = _dpo_errors(policy, reference, x_w, x_l, eps, sigma)
    out = diffusion_dpo_loss(e_w, e_l, e_w_ref, e_l_ref, beta)
    assert torch.allclose(out.loss, torch.full((4,), math.log(2.0)))
    assert torch.equal(out.implicit_acc, torch.full((4,), 0.5)) and torch.equal(out.reward_margin, torch.zeros(4))
    # dL/de_w = beta/2, dL/de_l = -beta/2 at the reference; the reference gets no gradient.
    e_w_leaf, e_l_leaf = e_w.detach().requires_grad_(), e_l.detach().requires_grad_()
    e_ref = e_w_ref.detach().requires_grad_()
    diffusion_dpo_loss(e_w_leaf, e_l_leaf, e_ref, e_l_ref.detach(), beta).loss.sum().backward()
    assert torch.allclose(e_w_leaf.grad, torch.full((4,), beta / 2)) and torch.allclose(e_l_leaf.grad, torch.full((4,), -beta / 2))
    assert e_ref.grad is None or torch.equal(e_ref.grad, torch.zeros(4))
    # Through the policy: grad = beta/2 * grad(e_w - e_l); it vanishes when winner == loser.
    expected = torch.autograd.grad((beta / 2) * (e_w - e_l).sum(), policy.linear.weight, retain_graph=True)[0]
    assert expected.abs().max() > 0  # distinct winner and loser: the DPO gradient at the reference is not zero
    out.loss.sum().backward()
    assert torch.allclose(policy.linear.weight.grad, expected, rtol=1e-4, atol=1e-6)
    assert reference.linear.weight.grad is None
    policy.zero_grad()
    tie = _dpo_errors(policy, reference, x_w, x_w, eps, sigma)
    diffusion_dpo_loss(*tie, beta).loss.sum().backward()
    assert policy.linear.weight.grad.abs().max() == 0.0


def test_dpo_lowering_winner_error_lowers_loss_and_training_lifts_accuracy():
    shape, beta = (4, 2, 1, 2, 2), 50.0
    policy, reference = TinyPolicy(8, 1), TinyPolicy(8, 1)
    x_w, x_l, eps = _randn(8, shape), _randn(9, shape), _randn(10, shape)
    sigma = torch.full((4,), 0.5)
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = diffusion_dpo_loss(base, base + 0.1, base, base + 0.1, beta)
    better = diffusion_dpo_loss(base - 0.01, base + 0.1, base, base + 0.1, beta)
    worse_loser = diffusion_dpo_loss(base, base + 0.11, base, base + 0.1, beta)
    assert bool((better.loss < ref.loss).all()) and bool((worse_loser.loss < ref.loss).all())
    assert torch.equal(better.implicit_acc, torch.ones(4)) and torch.allclose(better.reward_margin, torch.full((4,), 0.5))
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    first = None
    for _ in range(20):
        out = diffusion_dpo_loss(*_dpo_errors(policy, reference, x_w, x_l, eps, sigma), beta)
        first = out.loss.mean().item() if first is None else first
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    final = diffusion_dpo_loss(*_dpo_errors(policy, reference, x_w, x_l, eps, sigma), beta)
    assert final.loss.mean().item() < first and final.implicit_acc.mean().item() == 1.0


def test_dpo_rejects_bad_shapes_and_beta():
    e = torch.ones(3)
    with pytest.raises(ValueError, match="beta"):
        diffusion_dpo_loss(e, e, e, e, 0.0)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        diffusion_dpo_loss(e, torch.ones(3, 1), e, e, 1.0)


def test_consistency_loss_zero_with_exact_velocity_field_and_positive_otherwise():
    x0, eps = _randn(11), _randn(12)
    edges = segment_edges(4)
    grid = fine_solver_grid(48)
    pair = sample_consistency_pair(edges, grid, 3, torch.Generator().manual_seed(0))
    v = velocity_target(x0, eps)  # the exact field on this straight path, for teacher, student and target alike
    x_m = add_noise(x0, eps, pair.sigma_m)
    x_hat_n = euler_step(x_m, pair.sigma_m, pair.sigma_n, v)
    loss = consistency_distillation_loss(x_m, pair.sigma_m, v, x_hat_n, pair.sigma_n, v, pair.sigma_edge)
    assert loss.shape == (3,) and loss.abs().max() < 1e-6
    wrong = consistency_distillation_loss(x_m, pair.sigma_m, v + 0.1, x_hat_n, pair.sigma_n, v, pair.sigma_edge)
    assert bool((wrong > 1e-3).all())
    # The target branch is detached: only the student's velocity receives gradient.
    v_s, v_t = (v + 0.1).requires_grad_(), v.clone().requires_grad_()
    consistency_distillation_loss(x_m, pair.sigma_m, v_s, x_hat_n, pair.sigma_n, v_t, pair.sigma_edge).sum().backward()
    assert v_s.grad.abs().sum() > 0 and v_t.grad is None


def test_consistency_motion_mask_upweights_only_masked_elements():
    x0, eps = _randn(13), _randn(14)
    sigma_m, sigma_n, edge = torch.full((3,), 0.6), torch.full((3,), 0.55), torch.full((3,), 0.5)
    v = velocity_target(x0, eps)
    x_m = add_noise(x0, eps, sigma_m)
    x_hat_n = euler_step(x_m, sigma_m, sigma_n, v)
    mask = torch.zeros(3, 2, 4, 4)
    mask[:, :, :2] = 1.0  # top half moves
    weight = motion_weight_map(mask, 5.0, x_m)
    assert weight.shape == (3, 1, 2, 4, 4) and weight.max() == 5.0 and weight.min() == 1.0
    off_mask, on_mask = v.clone(), v.clone()
    off_mask[:, :, :, 2:] += 1.0
    on_mask[:, :, :, :2] += 1.0
    args = dict(x_hat_n=x_hat_n, sigma_n=sigma_n, v_target=v, sigma_edge=edge, motion_mask=mask, motion_weight=5.0)
    loss_off = consistency_distillation_loss(x_m, sigma_m, off_mask, **args)
    loss_on = consistency_distillation_loss(x_m, sigma_m, on_mask, **args)
    assert torch.allclose(loss_on, 5.0 * loss_off, rtol=1e-5)
    plain = consistency_distillation_loss(x_m, sigma_m, on_mask, x_hat_n, sigma_n, v, edge)
    assert torch.allclose(loss_on, 5.0 * plain, rtol=1e-5)
    with pytest.raises(ValueError, match="motion mask"):
        motion_weight_map(mask[:, :1], 5.0, x_m)


def test_fine_grid_and_consistency_pairs_stay_in_their_segment():
    grid = fine_solver_grid(50, shift=3.0)
    assert grid.shape == (51,) and grid[0] == 0.0 and grid[-1] == 1.0 and bool((grid[1:] > grid[:-1]).all())
    edges = segment_edges([0.0, 0.1, 0.45, 1.0])  # not on the grid: they get merged in
    pair = sample_consistency_pair(edges, grid, 4000, torch.Generator().manual_seed(0))
    low, high = edges[pair.segment], edges[pair.segment + 1]
    assert bool((pair.sigma_edge == low).all())
    assert bool((low < pair.sigma_m).all()) and bool((pair.sigma_m <= high).all())
    assert bool((low <= pair.sigma_n).all()) and bool((pair.sigma_n < pair.sigma_m).all())
    points = torch.unique(torch.cat([grid, edges]))
    # sigma_n is exactly the next point below sigma_m.
    idx = torch.searchsorted(points, pair.sigma_m)
    assert torch.equal(points[idx - 1], pair.sigma_n)
    counts = torch.bincount(pair.segment, minlength=3)
    assert bool((counts > 1100).all())  # segments drawn uniformly
    assert bool((pair.sigma_n == low).any())  # the boundary condition is exercised
    same = sample_consistency_pair(edges, grid, 16, torch.Generator().manual_seed(5))
    again = sample_consistency_pair(edges, grid, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(same, again))
