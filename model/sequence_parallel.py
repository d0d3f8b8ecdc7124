"""Ulysses sequence parallelism for `AnimationDenoiser`: one clip's tokens split across ranks.

DeepSpeed-Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for Enabling
Training of Extreme Long Sequence Transformer Models"): the ``sp`` ranks of a group each hold
``T_pad / sp`` whole latent frames of tokens (B, S / sp, D). Self-attention does an all-to-all from
sequence-split to head-split (B, S, H / sp, d), attends over the whole clip, and all-to-alls back;
everything else in a block (projections, norms, FFN, the per-frame audio/face cross-attention, the
text cross-attention) is token-local, so it runs on the local frames as it is.

What is ours and what is borrowed:

* The all-to-all and its autograd are DeepSpeed's `DistributedAttention` (maintained, used by
  Megatron-DeepSpeed and DeepSpeed's own Ulysses training; its backward is the reverse all-to-all).
  It talks through `deepspeed.comm`, so the process group must be set up by
  ``deepspeed.init_distributed`` (DeepSpeed's engine does it in training; `init_process_group` here
  for serving workers and tests).
* diffusers' own context-parallel plan (`_cp_plan` + `enable_parallelism`) splits at module
  boundaries of *Wan's* forward; ours runs the blocks itself with per-frame condition tokens and
  a reference frame, and its Ulysses attention backends need CUDA kernels (flash/cudnn), so it
  cannot run (or be tested) on CPU. `UlyssesWanAttnProcessor` is therefore our processor; it
  repeats WanAttnProcessor's math (projections, RMS norms across heads, RoPE) around the
  distributed attention.

Frames that do not divide by ``sp`` are padded at the end; padded keys are masked out of
attention, and padded outputs are dropped, so the result equals ``sp = 1`` (up to float
reassociation). RoPE positions are the global ones.

Gradients: `gather_frames`' backward returns each rank only its own frames' gradient (every rank
computes the same loss on the same gathered output), so each rank's parameter gradients are its
partial sums and the SP group's *sum* is the full gradient. That is what DeepSpeed's Ulysses mode
expects: with ``sequence_parallel_size`` set it all-reduces gradients over the data x sequence
group and divides by the data-parallel size only (`runtime/zero/stage_1_and_2.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SequenceParallel", "UlyssesWanAttnProcessor", "split_frames", "gather_frames", "padded_frames"]


@dataclass(frozen=True)
class SequenceParallel:
    """One Ulysses group: its process group, this rank's index in it, and its size."""

    group: Any  # torch.distributed.ProcessGroup
    rank: int
    size: int

    def __deepcopy__(self, memo: dict) -> "SequenceParallel":
        return self  # a process group cannot be copied; a copied model (EMA target, export) shares the group

    @classmethod
    def of(cls, group: Any) -> "SequenceParallel":
        import torch.distributed as dist

        return cls(group=group, rank=dist.get_rank(group), size=dist.get_world_size(group))

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.size:
            raise ValueError(f"sequence parallel degree {self.size} must divide the attention heads ({num_heads}): "
                             "Ulysses splits heads across the group")


def padded_frames(frames: int, size: int) -> int:
    """Frames rounded up to a multiple of the group size."""
    return math.ceil(frames / size) * size


def split_frames(x: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
    """This rank's contiguous block of ``x`` along the frame axis ``dim``, zero-padded to a multiple of sp."""
    frames = x.shape[dim]
    pad = padded_frames(frames, sp.size) - frames
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x.chunk(sp.size, dim=dim)[sp.rank]


class _GatherFrames(torch.autograd.Function):
    """All-gather along ``dim`` (equal chunks); backward keeps this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, dim: int, sp: SequenceParallel) -> torch.Tensor:
        import torch.distributed as dist

        ctx.dim, ctx.sp = dim, sp
        parts = [torch.empty_like(local) for _ in range(sp.size)]
        dist.all_gather(parts, local.contiguous(), group=sp.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.sp.size, dim=ctx.dim)[ctx.sp.rank].contiguous(), None, None


def gather_frames(local: torch.Tensor, dim: int, frames: int, sp: SequenceParallel) -> torch.Tensor:
    """The whole clip from every rank's block along ``dim``, padding removed (``frames`` real ones)."""
    return _GatherFrames.apply(local, dim, sp).narrow(dim, 0, frames)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE (as diffusers' WanAttnProcessor applies it); x (B, S, H, d)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos[..., 0::2] - x2 * sin[..., 1::2]
    out[..., 1::2] = x1 * sin[..., 1::2] + x2 * cos[..., 0::2]
    return out.type_as(x)


class UlyssesWanAttnProcessor:
    """Self-attention processor for a Wan block's ``attn1`` on sequence-split tokens.

    ``valid_tokens`` (set per forward by the denoiser) is the number of real tokens of the whole
    clip; keys beyond it (frame padding) are masked out.
    """

    def __init__(self, sp: SequenceParallel):
        from deepspeed.sequence.layer import DistributedAttention

        self.sp = sp
        self.valid_tokens: int | None = None
        # (B, S_local, H, d) in, all-to-all to (B, S, H / sp, d): scatter heads (2), gather sequence (1).
        self.attention = DistributedAttention(self._local_attention, sp.group, scatter_idx=2, gather_idx=1)

    def __deepcopy__(self, memo: dict) -> "UlyssesWanAttnProcessor":
        return self  # see SequenceParallel.__deepcopy__; valid_tokens is set by every forward

    def _local_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        """Plain SDPA over the whole clip for this rank's heads; (B, S, h, d) in and out."""
        mask = None
        if self.valid_tokens is not None and self.valid_tokens < k.shape[1]:
            mask = torch.arange(k.shape[1], device=k.device) < self.valid_tokens
            mask = mask.view(1, 1, 1, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("UlyssesWanAttnProcessor is for self-attention without a mask (a block's attn1)")
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = self.attention(query, key, value, 0).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
