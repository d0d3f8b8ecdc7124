"""Samplers: exact NFE counts, exactness on a linear flow, TPO routing and the consistency student's edges."""

import pytest
import torch

from model.flow import add_noise, inference_sigmas
from model.samplers import (
    SegmentPlan,
    default_tpo_plan,
    sample_consistency,
    sample_euler_cfg,
    sample_segment_routed,
    segment_edges,
    segment_index,
    consistency_target_edge,
    validate_segments,
)

torch.set_num_threads(1)

SHAPE = (2, 4, 3, 4, 4)


class LinearPathModel:
    """Exact velocity field (x - x0) / sigma of a point-mass data distribution at x0; records each call.

    On the straight path x_sigma = (1 - sigma) x0 + sigma eps it equals eps - x0, and from any x it
    points to x0, so every x0 estimate x - sigma v is exactly x0 (also after re-noising).
    """

    def __init__(self, x0, eps):
        self.x0, self.eps = x0, eps
        self.calls = []  # (sigma (B,), cond, active adapter)
        self.adapter = None

    def __call__(self, x, sigma, cond):
        assert sigma.shape == (x.shape[0],) and x.shape == self.x0.shape
        self.calls.append((sigma.clone(), cond, self.adapter))
        v = (x - self.x0) / sigma.view(-1, 1, 1, 1, 1)
        return v

    def switch(self, name):
        self.adapter = name


def _path(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


@pytest.mark.parametrize("guidance, nfe", [(5.0, 100), (1.0, 50)])
def test_euler_cfg_nfe_and_exact_endpoint(guidance, nfe):
    x0, eps = _path()
    model = LinearPathModel(x0, eps)
    result = sample_euler_cfg(model, eps.clone(), inference_sigmas(50, shift=3.0), "cond", "uncond", guidance)
    assert result.nfe == nfe == len(model.calls)
    assert torch.allclose(result.x, x0, atol=1e-5)


def test_euler_cfg_applies_guidance_formula():
    # Constant fields: v_c = eps - x0, v_u = v_c + 1, so the guided velocity is v_c - (w - 1) = v_c - 2
    # and over the total sigma span of 1 the endpoint moves by +2 from x0.
    x0, eps = _path(1)
    calls = []

    def model(x, sigma, cond):
        calls.append(cond)
        return eps - x0 + (1.0 if cond == "uncond" else 0.0)

    result = sample_euler_cfg(model, eps.clone(), inference_sigmas(4), "cond", "uncond", guidance=3.0)
    assert torch.allclose(result.x, x0 + 2.0, atol=1e-5)
    assert calls == ["cond", "uncond"] * 4 and result.nfe == 8


def test_euler_cfg_uncond_none_and_progress():
    x0, eps = _path(2)
    model = LinearPathModel(x0, eps)
    events = []
    result = sample_euler_cfg(model, eps.clone(), inference_sigmas(5), "cond", None, 1.0, callback=events.append)
    assert result.nfe == 5 and [e.step for e in events] == [1, 2, 3, 4, 5]
    assert all(e.total_steps == 5 for e in events) and events[-1].sigma_next == 0.0 and events[-1].nfe == 5
    with pytest.raises(ValueError, match="uncond"):
        sample_euler_cfg(model, eps.clone(), inference_sigmas(5), "cond", None, 4.0)
    with pytest.raises(ValueError, match="decreasing"):
        sample_euler_cfg(model, eps.clone(), torch.tensor([0.0, 1.0]), "cond", None, 1.0)


def test_default_tpo_plan_spends_30_nfe_and_routes_adapters():
    x0, eps = _path(3)
    model = LinearPathModel(x0, eps)
    plan = default_tpo_plan()
    assert sum(seg.nfe for seg in plan) == 30
    events = []
    result = sample_segment_routed(model, eps.clone(), "cond", "uncond", plan, model.switch, shift=3.0, callback=events.append)
    assert result.nfe == 30 == len(model.calls)
    assert torch.allclose(result.x, x0, atol=1e-5)
    boundary = plan[0].sigma_low
    # A segment evaluates at its upper edge and inside, never at its lower edge: sigma_b itself is
    # the fidelity segment's first point.
    for sigma, _, adapter in model.calls:
        expected = "motion" if sigma[0].item() > boundary else "fidelity"
        assert adapter == expected, (sigma[0].item(), adapter)
    motion_calls = [c for c in model.calls if c[2] == "motion"]
    assert len(motion_calls) == 2 * plan[0].steps and motion_calls[-1][0][0].item() > boundary
    assert [e.step for e in events] == list(range(1, 16)) and events[-1].nfe == 30
    assert events[4].segment == "motion" and events[5].segment == "fidelity"
    assert events[4].sigma_next == pytest.approx(boundary)


def test_segment_routed_custom_plan_three_segments_mixed_cfg():
    x0, eps = _path(4)
    model = LinearPathModel(x0, eps)
    switched = []
    plan = [
        SegmentPlan(name="a", sigma_high=1.0, sigma_low=0.9, steps=2, guidance=4.0, adapter="motion"),
        SegmentPlan(name="b", sigma_high=0.9, sigma_low=0.4, steps=3, guidance=1.0, adapter=None),
        SegmentPlan(name="c", sigma_high=0.4, sigma_low=0.0, steps=4, guidance=2.0, adapter="fidelity"),
    ]
    result = sample_segment_routed(model, eps.clone(), "cond", "uncond", plan, lambda n: (switched.append(n), model.switch(n)))
    assert result.nfe == 4 + 3 + 8 == sum(seg.nfe for seg in plan)
    assert switched == ["motion", None, "fidelity"]
    ranges = {"motion": (0.9, 1.0), None: (0.4, 0.9), "fidelity": (0.0, 0.4)}
    for sigma, _, adapter in model.calls:
        low, high = ranges[adapter]
        assert torch.tensor(low) < sigma[0] <= torch.tensor(high), (sigma[0].item(), adapter)
    assert torch.allclose(result.x, x0, atol=1e-5)


def test_segment_plans_are_validated_loudly():
    seg = dict(steps=2, guidance=1.0)
    with pytest.raises(ValueError, match="not contiguous"):
        validate_segments([SegmentPlan(name="a", sigma_high=1.0, sigma_low=0.8, **seg),
                           SegmentPlan(name="b", sigma_high=0.7, sigma_low=0.0, **seg)])
    with pytest.raises(ValueError, match="must start at sigma 1.0"):
        validate_segments([SegmentPlan(name="a", sigma_high=0.9, sigma_low=0.0, **seg)])
    with pytest.raises(ValueError, match="must end at sigma 0.0"):
        validate_segments([SegmentPlan(name="a", sigma_high=1.0, sigma_low=0.2, **seg)])
    with pytest.raises(ValueError, match="sigma_low"):
        SegmentPlan(name="a", sigma_high=0.5, sigma_low=0.6, **seg)
    with pytest.raises(ValueError, match="adapter_switch"):
        x0, eps = _path()
        sample_segment_routed(LinearPathModel(x0, eps), eps, "c", "u", default_tpo_plan(), None)


@pytest.mark.parametrize("edges", [4, 2, 1, [0.0, 0.1, 0.5, 1.0]])
def test_consistency_sampler_lands_on_edges_in_k_nfe(edges):
    x0, eps = _path(5)
    model = LinearPathModel(x0, eps)
    table = segment_edges(edges)
    events = []
    result = sample_consistency(model, eps.clone(), "cond", table, callback=events.append)
    k = table.shape[0] - 1
    assert result.nfe == k == len(model.calls) == len(events)
    called = torch.stack([sigma[0] for sigma, _, _ in model.calls])
    assert torch.equal(called, table.flip(0)[:-1])  # evaluated exactly at the upper edges, from 1 down
    assert [e.sigma_next for e in events] == table.flip(0)[1:].tolist()
    assert torch.allclose(result.x, x0, atol=1e-5)


def test_consistency_one_jump_from_inside_a_segment_hits_its_lower_edge():
    x0, eps = _path(6)
    model = LinearPathModel(x0, eps)
    edges = segment_edges(4)
    sigma = torch.tensor([0.6, 0.3])
    target = consistency_target_edge(sigma, edges)
    assert target.tolist() == [0.5, 0.25]
    x = add_noise(x0, eps, sigma)
    v = model(x, sigma, "cond")
    jumped = x + (target - sigma).view(-1, 1, 1, 1, 1) * v
    assert torch.allclose(jumped, add_noise(x0, eps, target), atol=1e-6)


def test_consistency_renoise_variant():
    x0, eps = _path(7)
    model = LinearPathModel(x0, eps)
    edges = segment_edges(4)
    deterministic = sample_consistency(model, eps.clone(), "cond", edges).x
    gamma0 = sample_consistency(model, eps.clone(), "cond", edges, renoise=0.0, generator=torch.Generator()).x
    assert torch.equal(deterministic, gamma0)
    # With the exact path every x0 estimate is x0, so even full re-noising ends on x0, via other intermediate points.
    full = sample_consistency(model, eps.clone(), "cond", edges, renoise=1.0, generator=torch.Generator().manual_seed(0))
    assert full.nfe == 4 and torch.allclose(full.x, x0, atol=1e-5)
    with pytest.raises(ValueError, match="generator"):
        sample_consistency(model, eps.clone(), "cond", edges, renoise=0.5)


def test_segment_edges_and_index():
    assert segment_edges(4).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    shifted = segment_edges(2, shift=3.0)
    assert shifted.tolist() == pytest.approx([0.0, 0.75, 1.0])
    edges = segment_edges([0.0, 0.2, 0.7, 1.0])
    sigma = torch.tensor([1.0, 0.7, 0.7001, 0.2, 0.1999, 1e-4])
    assert segment_index(sigma, edges).tolist() == [2, 1, 2, 0, 0, 0]
    for bad in ([0.0, 0.5, 0.5, 1.0], [0.1, 1.0], [0.0, 0.9], [0.0]):
        with pytest.raises(ValueError):
            segment_edges(bad)
    with pytest.raises(ValueError):
        segment_edges(0)
    with pytest.raises(ValueError):
        segment_index(torch.tensor([0.0]), edges)
