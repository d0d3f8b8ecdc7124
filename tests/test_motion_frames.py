"""Motion frames (long-form continuation): the prefix path in the denoiser, its training draw, the chunk plan
and `generate_long`, on the real tiny denoiser (random and the checked-in pretrained teacher) and a real
tiny Wan VAE."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from model.conditions import Conditions
from model.generate import ChunkDone, LongFormConfig, generate_long
from model.losses import flow_matching_loss
from model.motion_frames import (draw_prefix, match_colour, plan_chunks, prefix_pixel_frames, slice_conditions,
                                 training_prefix_frames)
from model.presets import ModelConfig, build_denoiser
from model.samplers import sample_consistency, sample_euler_cfg
from model.sampling import SamplerSpec
from model.vae import VideoVAE
from conftest import wake_zero_inits

K = 2  # motion latent frames


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cond(frames: int = 8, seed: int = 0) -> Conditions:
    gen = torch.Generator().manual_seed(seed)
    return Conditions(ref_latent=torch.randn(1, 16, 1, 16, 16, generator=gen),
                      pose=torch.rand(1, 3, frames, 64, 64, generator=gen) * 2 - 1,
                      audio=torch.randn(1, frames, 6, 32, generator=gen), face=torch.randn(1, 16, 1, 8, 8, generator=gen))


@pytest.fixture(scope="module")
def teachers():
    """The checked-in pretrained tiny teacher loaded without and with the motion path (an old checkpoint)."""
    old = build_denoiser(ModelConfig(pretrained_path="builtin:tiny_teacher")).eval()
    new = build_denoiser(ModelConfig(pretrained_path="builtin:tiny_teacher", motion_frames=K)).eval()
    return old, new


def test_an_old_checkpoint_loads_and_behaves_as_before_without_a_prefix(teachers):
    old, new = teachers
    assert new.config.motion_frames == K and not new.motion_embedding.any()  # zero-init, not in the checkpoint
    x, sigma, cond = torch.randn(2, 16, 8, 16, 16), torch.tensor([0.7, 0.3]), _cond().repeat(2)
    with torch.no_grad():
        before = old(x, sigma, cond)
        assert torch.equal(new(x, sigma, cond), before)
        given = Conditions(**{**cond.__dict__, "motion": torch.randn(2, 16, K, 16, 16),
                              "keep": {"motion": torch.tensor([False, False])}})
        assert torch.equal(new(x, sigma, given), before)  # kept by nobody: no prefix
    with pytest.raises(ValueError, match="motion_frames > 0"):
        old(x, sigma, given)
    assert training_prefix_frames(new, 0.5, "p") == K and training_prefix_frames(old, 0.0, "p") == 0
    with pytest.raises(ValueError, match=r"tpo.motion_prefix_prob > 0 needs a model built with model.motion_frames"):
        training_prefix_frames(old, 0.5, "tpo.motion_prefix_prob")  # a training job asked to draw prefixes


def test_the_prefix_is_pinned_exactly_in_every_sampler(teachers):
    """Output on the given frames = (x - motion) / sigma, so Euler+CFG and consistency sampling end on it."""
    _, model = teachers
    cond = _cond()
    motion = torch.randn(1, 16, K, 16, 16, generator=torch.Generator().manual_seed(5))
    given = Conditions(**{**cond.__dict__, "motion": motion})
    x = torch.randn(1, 16, 8, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        v = model(x, torch.tensor([0.4]), given)
        torch.testing.assert_close(v[:, :, :K], (x[:, :, :K] - motion) / 0.4, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(v[:, :, K:], model(x, torch.tensor([0.4]), cond)[:, :, K:])  # the rest sees it
        sigmas = torch.linspace(1, 0, 5)
        euler = sample_euler_cfg(model, x, sigmas, given, given.drop({"pose", "audio", "face"}), 2.0).x
        lcm = sample_consistency(model, x, given, torch.tensor([0.0, 0.5, 1.0])).x
    torch.testing.assert_close(euler[:, :, :K], motion, rtol=0, atol=1e-5)
    torch.testing.assert_close(lcm[:, :, :K], motion, rtol=0, atol=1e-5)


def test_training_draw_puts_no_loss_and_no_gradient_on_the_prefix():
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(motion_frames=K))
    wake_zero_inits(model)
    x0, noise = torch.randn(4, 16, 8, 16, 16), torch.randn(4, 16, 8, 16, 16)
    gen = torch.Generator().manual_seed(1)
    cond, weight = draw_prefix(_cond().repeat(4), x0, K, prob=0.5, generator=gen)
    keep = cond.keep_mask("motion")
    assert 0 < keep.sum() < 4 and torch.equal(cond.motion, x0[:, :, :K])
    assert (weight[keep, :, :K] == 0).all() and (weight[~keep] == 1).all() and (weight[:, :, K:] == 1).all()
    sigma = torch.full((4,), 0.6)
    v = model((1 - 0.6) * x0 + 0.6 * noise, sigma, cond)
    on_prefix = torch.zeros_like(weight)
    on_prefix[keep, :, :K] = 1
    assert flow_matching_loss(v, x0, noise, on_prefix).max() < 1e-9  # exact velocity: nothing to learn there
    flow_matching_loss(v, x0, noise, on_prefix).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    v = model((1 - 0.6) * x0 + 0.6 * noise, sigma, cond)
    flow_matching_loss(v, x0, noise, weight).sum().backward()
    assert model.motion_embedding.grad.abs().sum() > 0  # the marker learns through the other frames
    unchanged, no_weight = draw_prefix(cond, x0, K, prob=0.0)
    assert unchanged is cond and no_weight is None


def test_distillation_draw_puts_no_consistency_or_aux_loss_on_the_prefix():
    """Student, target and teacher all pin the prefix, so L_CD there is zero by construction and L_aux is
    weighted off it: weighting only the prefix 50x (the motion-mask path) changes neither term, weighting
    other frames does."""
    from ray_jobs.distill_lcm import DistillObjective, distill_losses

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(motion_frames=K, aux_head=True))
    wake_zero_inits(model)
    x0 = torch.randn(2, 16, 8, 16, 16)
    cond, prefix_weight = draw_prefix(_cond().repeat(2), x0, K, prob=1.0, noise_std=0.05,
                                      generator=torch.Generator().manual_seed(2))
    obj = DistillObjective(segments=2, teacher_cfg=False, motion_weight=50.0)
    edges, grid = obj.edge_tensor(), torch.linspace(0, 1, 11)

    def terms(frames: slice | None) -> dict[str, float]:
        mask = torch.zeros(2, 8, 16, 16)
        if frames is not None:
            mask[:, frames] = 1
        with torch.no_grad():
            _, out = distill_losses(model, model, model, x0, cond, None, edges, grid, obj,
                                    torch.Generator().manual_seed(3), mask, prefix_weight)
        return out

    plain, on_prefix, elsewhere = terms(None), terms(slice(0, K)), terms(slice(K, 8))
    for name in ("loss_cd", "loss_aux"):
        assert on_prefix[name] == pytest.approx(plain[name], rel=1e-4)
        assert elsewhere[name] > 2 * plain[name]


def test_tpo_pairs_share_the_winners_prefix_and_carry_no_preference_on_it():
    from ray_jobs.train_tpo import TPOObjective, dpo_errors, draw_pair_prefix

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(motion_frames=K)).eval()
    wake_zero_inits(model)
    x0_w, x0_l, noise = torch.randn(2, 16, 8, 16, 16), torch.randn(2, 16, 8, 16, 16), torch.randn(2, 16, 8, 16, 16)
    sigma, cond = torch.tensor([0.9, 0.95]), _cond().repeat(2)
    given, weight = draw_pair_prefix(model, cond, x0_w, TPOObjective(motion_prefix_prob=1.0),
                                     torch.Generator().manual_seed(1))
    assert torch.equal(given.motion, x0_w[:, :, :K]) and given.keep_mask("motion").all()
    loser_other_past = x0_l.clone()
    loser_other_past[:, :, :K] += 1.0
    with torch.no_grad():
        _, loser = dpo_errors(model, x0_w, x0_l, sigma, noise, given, weight)
        _, loser_moved = dpo_errors(model, x0_w, loser_other_past, sigma, noise, given, weight)
        _, loser_plain = dpo_errors(model, x0_w, x0_l, sigma, noise, cond)
        _, loser_plain_moved = dpo_errors(model, x0_w, loser_other_past, sigma, noise, cond)
    torch.testing.assert_close(loser_moved, loser)  # the loser's own first frames are replaced by the winner's
    assert not torch.allclose(loser_plain_moved, loser_plain)
    unchanged, no_weight = draw_pair_prefix(model, cond, x0_w, TPOObjective(), torch.Generator())
    assert unchanged is cond and no_weight is None


def test_chunk_plan_covers_every_frame_once():
    for frames, chunk, overlap in [(37, 8, 2), (8, 8, 2), (5, 8, 2), (81 * 6, 81, 5), (40, 8, 0)]:
        plan = plan_chunks(frames, chunk, overlap)
        spans = [plan.new_frames(i) for i in range(len(plan.starts))]
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and spans[-1][1] == frames
        assert all(s + plan.chunk_frames >= stop for s, (_, stop) in zip(plan.starts, spans))
    assert plan_chunks(37, 8, 2).starts == (0, 6, 12, 18, 24, 30)
    assert prefix_pixel_frames(2, 4) == 5 and prefix_pixel_frames(3, 1) == 3
    with pytest.raises(ValueError, match="chunk_frames / 2"):
        plan_chunks(20, 8, 5)


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return VideoVAE(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False, False], latents_mean=[0.0] * 16,
                                     latents_std=[1.0] * 16))


def test_long_video_has_exactly_its_frames_and_resumes_to_the_same_video(teachers, vae):
    _, model = teachers
    cond, spec = _cond(frames=20), SamplerSpec(kind="euler_cfg", steps=2, guidance=1.0)
    long = LongFormConfig(chunk_frames=8, motion_frames=K)
    chunks, events = [], []
    whole = generate_long(model, vae, cond, 20, long, spec=spec, seed=3, on_chunk=chunks.append, callback=events.append)
    assert whole.frames.shape == (20, 64, 64, 3) and [c.index for c in chunks] == [0, 1, 2]
    assert [c.first for c in chunks] == [0, 8, 14] and whole.nfe == 6
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6] and {e.total_steps for e in events} == {6}
    torch.testing.assert_close(chunks[1].latents[:, :, :K], chunks[0].latents[:, :, -K:], rtol=0, atol=1e-5)
    resumed = generate_long(model, vae, cond, 20, long, spec=spec, seed=3, resume=chunks[:2])
    assert torch.equal(resumed.frames, whole.frames) and resumed.nfe == 2  # only the last chunk sampled again
    apart = generate_long(model, vae, cond, 20, long.model_copy(update={"motion_frames": 0}), spec=spec, seed=3)
    assert apart.frames.shape == (20, 64, 64, 3) and not torch.equal(apart.frames[8:], whole.frames[8:])
    sliced = slice_conditions(cond, 16, 24)  # past the end: the last frame repeats
    assert torch.equal(sliced.pose[:, :, -1], cond.pose[:, :, -1]) and sliced.audio.shape[1] == 8


def test_colour_match_moves_a_cast_toward_the_reference():
    import cv2

    rng = np.random.default_rng(0)
    reference = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
    cast = np.clip(np.repeat(reference[None], 4, 0).astype(int) + [40, -10, -30], 0, 255).astype(np.uint8)
    lab = lambda img: cv2.cvtColor(img.reshape(-1, 32, 3), cv2.COLOR_RGB2LAB).reshape(-1, 3).mean(0)  # noqa: E731
    before = np.abs(lab(cast) - lab(reference)).sum()
    after = np.abs(lab(match_colour(cast, reference)) - lab(reference)).sum()
    assert after < 0.1 * before and np.array_equal(match_colour(cast, reference, 0.0), cast)
