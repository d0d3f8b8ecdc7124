"""Ulysses sequence parallelism in the denoiser: real processes over gloo, sp=2 against sp=1."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from model.conditions import Conditions
from model.presets import ModelConfig, build_denoiser

SP = 2


def _inputs(frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditions]:
    """Tiny-geometry latents and conditions with ``frames`` latent frames (tiny VAE: temporal factor 1)."""
    gen = torch.Generator().manual_seed(seed)
    cond = Conditions(ref_latent=torch.randn(2, 16, 1, 16, 16, generator=gen),
                      pose=torch.rand(2, 3, frames, 64, 64, generator=gen) * 2 - 1,
                      audio=torch.randn(2, frames, 6, 32, generator=gen),
                      face=torch.randn(2, 16, 1, 8, 8, generator=gen))
    return torch.randn(2, 16, frames, 16, 16, generator=gen), torch.tensor([0.3, 0.8]), cond


def _woken_model(**switches) -> torch.nn.Module:
    """The tiny denoiser with its zero-init condition paths given weights, so every path carries signal."""
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(aux_head=True, **switches))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("ref_embedding", "pose_encoder", "audio_attn", "face_attn")) and param.abs().max() == 0:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def _loss_and_grads(model, x, sigma, cond):
    model.zero_grad()
    velocity, aux = model(x, sigma, cond, return_aux=True)
    loss = (velocity ** 2).mean() + (aux ** 2).mean()  # every output element reaches the gradient
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return velocity.detach(), aux.detach(), grads


def _compare_worker(rank: int, init_file: str, frames: int, switches: dict) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=SP)
    deepspeed.init_distributed(dist_backend="gloo")
    model = _woken_model(**switches)
    x, sigma, cond = _inputs(frames)
    ref_v, ref_aux, ref_grads = _loss_and_grads(model, x, sigma, cond)
    model.enable_sequence_parallel(dist.group.WORLD)
    v, aux, grads = _loss_and_grads(model, x, sigma, cond)
    torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(aux, ref_aux, atol=1e-5, rtol=1e-4)
    # each rank holds its frames' share of every gradient; their sum is the whole clip's gradient
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    model.enable_sequence_parallel(None)  # off again: the plain forward
    torch.testing.assert_close(model(x, sigma, cond, return_aux=True)[0], ref_v, atol=1e-6, rtol=1e-5)
    dist.destroy_process_group()


@pytest.mark.parametrize("frames, switches", [
    (8, {}),                         # 8 latent frames: 4 per rank
    (7, {}),                         # 7 do not divide: one padded frame, masked out of attention
    (7, {"ref_as_frame": True}),     # the reference as a leading frame (8 token frames, rank 0 holds it)
], ids=["divides", "padded", "ref-frame"])
def test_sp2_forward_and_backward_equal_sp1(tmp_path, frames, switches):
    mp.spawn(_compare_worker, args=(str(tmp_path / "init"), frames, switches), nprocs=SP, join=True)


def _heads_worker(rank: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=SP)
    model = build_denoiser(ModelConfig(overrides={"num_attention_heads": 3, "attention_head_dim": 32}))
    with pytest.raises(ValueError, match="must divide the attention heads"):
        model.enable_sequence_parallel(dist.group.WORLD)
    dist.destroy_process_group()


def test_heads_that_do_not_divide_fail_at_start(tmp_path):
    mp.spawn(_heads_worker, args=(str(tmp_path / "init"),), nprocs=SP, join=True)
