"""The animation denoiser: diffusers' `WanTransformer3DModel` with our condition paths.

``model(x, sigma, cond, return_aux=False) -> v``: x (B, C, T_lat, h, w) noisy latents, sigma (B,)
in [0, 1] (Wan timestep = 1000 sigma), cond a `model.conditions.Conditions`; v the flow-matching
velocity (eps - x0) of x's shape. With ``return_aux=True`` (aux head on) it returns (v, x0_aux).

Why `WanTransformer3DModel` and not `WanAnimateTransformer3DModel`
-------------------------------------------------------------------
`AnimationDenoiser` subclasses `WanTransformer3DModel` and runs its blocks itself. Wan-Animate's
class hard-wires conditions we cannot feed: a StyleGAN-style motion encoder on 512 px face *pixels*,
pose as *VAE latents* of the pose video, CLIP image tokens, a 36-channel (2C + 4) input, and no
audio path; its forward cannot be hooked. We need pose from our own conv on skeleton pixels, face
from VAE latents (DanceLCM), per-frame audio, learned nulls and an aux head, on a CPU-sized tiny
config. We do borrow Wan-Animate's ideas and one of its modules:
pose is added to the patch tokens (its ``pose_patch_embedding``), and every per-frame cross-attention
(audio and face) is diffusers' `WanAnimateFaceBlockCrossAttention`, which reshapes tokens to
(B * T_lat, h * w, D) and attends to that frame's condition tokens only, injected after every
``*_every``-th block (Wan-Animate: every 5th). Subclassing keeps Wan's parameter names
(``blocks.N.attn1.to_q``...), so Wan checkpoints and Wan LoRA targets map one to one, and
`PeftAdapterMixin`/`ModelMixin` (LoRA, save/from_pretrained, gradient checkpointing) come for free.

Conditions
----------
* reference latent (B, C, 1, h, w): channel concat, written in its exactly equivalent additive form
  ``conv([x; ref]) = conv_x(x) + conv_ref(ref)`` — Wan's ``patch_embedding`` keeps its pretrained
  16-channel shape and ``ref_embedding`` (zero-init) adds the ref's patch tokens to every frame.
  Optionally (``ref_as_frame``) the ref latent is also prepended as an extra frame of tokens
  (Wan-Animate's T + 1 layout); its output is dropped.
* pose (B, 3, T, H, W) in [-1, 1]: `PoseEncoder`, strided convs down to the patch-token grid, then a
  temporal conv grouping frames to latent frames; last layer zero-init; added to the patch tokens.
* audio (B, T, W, M): each mel row -> a token (Linear + learned row position); frames grouped to
  latent frames; per-frame cross-attention (zero-init output).
* face (B, C, 1, hf, wf), the reference's face latent (or per latent frame): patchified -> per-frame
  cross-attention (zero-init output);
  the whole path exists only with ``face_injection=True``.
* motion frames (B, C, k, h, w), ``cond.motion``: clean latents of the previous chunk's last k latent
  frames (long-form continuation, `model.motion_frames`). They take the place of x's first k latent
  frames, so they sit in context at their own positions, and ``motion_embedding`` (zero-init; only with
  ``motion_frames`` > 0) marks their tokens as given. The output there is the exact velocity that carries
  x to them, (x - motion) / sigma: every sampler then ends on the prefix, and the flow-matching loss on
  those frames has no gradient (no loss on them). A sample whose keep mask is False, or ``motion`` None,
  has no prefix: its first frames are ordinary noisy frames, which is the model without the path.
* every condition has a learned null used where ``cond.keep_mask(name)`` is False.
Zero-init outputs mean a pretrained Wan loads and starts unchanged (up to the learned prompt).

Frames vs latent frames: with VAE temporal factor tf > 1 (real Wan: 4, 81 frames -> 21 latents) the
first video frame maps alone to latent frame 0 and then groups of tf frames to each next latent
frame (Wan VAE's causal layout). We replicate frame 0 tf - 1 times in front, so every latent frame
sees exactly tf frames of pose (temporal conv of stride tf) and tf * W audio tokens. tf = 1 (tiny
VAE) is the identity grouping.

Text: Wan's text cross-attention (attn2) is kept and fed ``num_context_tokens`` learned prompt
tokens of ``text_dim`` (umT5 is never run here); `set_context_tokens` (or ``ModelConfig.prompt_embedding``)
starts them from an encoded prompt of any length, which the saved config records.

Loading (see `load_transformer_weights` and `model.loading`, which reads one tensor at a time): every
tensor whose name and shape match is loaded (blocks, time/text embedders, patch embedding, norm/proj
out, scale-shift tables); a wider ``patch_embedding`` (Wan I2V / Wan-Animate, 36 input channels =
16 noisy + 4 mask + 16 image latent) loads its first ``in_channels`` channels (the noisy latent) and,
where the checkpoint has no ``ref_embedding`` of its own, its image-latent channels start
``ref_embedding`` (reported as derived); everything else of ours (pose/audio/face paths, nulls, prompt
tokens, aux head) is initialised as in ``__init__`` (`AnimationDenoiser.init_rule`) and listed in the
returned `LoadReport`; extra tensors of the source (Wan-Animate's motion/face encoders and face
adapters, I2V image embedder and add_k/add_v projections) are listed as unused.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan_animate import WanAnimateFaceBlockCrossAttention

from model.conditions import Conditions
from model.sequence_parallel import (SequenceParallel, UlyssesWanAttnProcessor, gather_frames, padded_frames,
                                     split_frames)

__all__ = ["AnimationDenoiser", "PoseEncoder", "LoadReport", "load_transformer_weights", "group_frames",
           "lora_config", "use_adapter", "LORA_TARGETS"]


def group_frames(frames: torch.Tensor, temporal_factor: int, dim: int = 1) -> torch.Tensor:
    """Per-frame (.., T, ..) -> (.., T_lat, tf, ..): frame 0 alone (replicated), then groups of tf (Wan VAE)."""
    if temporal_factor == 1:
        return frames.unsqueeze(dim + 1)
    num_frames = frames.shape[dim]
    if (num_frames - 1) % temporal_factor:
        raise ValueError(f"{num_frames} frames do not fit temporal factor {temporal_factor} (need 1 + k * {temporal_factor})")
    first = frames.narrow(dim, 0, 1)
    padded = torch.cat([first] * (temporal_factor - 1) + [frames], dim=dim)
    shape = list(padded.shape)
    shape[dim : dim + 1] = [shape[dim] // temporal_factor, temporal_factor]
    return padded.reshape(shape)


def _unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> torch.Tensor:
    """Tokens (B, T'h'w', C p_t p_h p_w) -> video (B, C, T' p_t, h' p_h, w' p_w), Wan's layout."""
    batch = tokens.shape[0]
    tokens = tokens.reshape(batch, *grid, *patch, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return tokens.flatten(6, 7).flatten(4, 5).flatten(2, 3)


class PoseEncoder(nn.Module):
    """Skeleton maps (B, 3, T, H, W) -> tokens grid (B, D, T_lat, H/down, W/down); last layer zero-init."""

    def __init__(self, channels: tuple[int, ...], out_dim: int, temporal_factor: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for ch in channels:  # each stage halves H and W, per frame
            layers += [nn.Conv3d(in_ch, ch, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.SiLU()]
            in_ch = ch
        self.spatial = nn.Sequential(*layers)
        self.temporal_factor = temporal_factor
        self.proj = nn.Conv3d(in_ch, out_dim, (temporal_factor, 1, 1), stride=(temporal_factor, 1, 1))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, pose: torch.Tensor) -> torch.Tensor:
        feats = self.spatial(pose)
        if self.temporal_factor > 1:  # frame 0 alone, then groups of tf (see group_frames)
            feats = torch.cat([feats[:, :, :1]] * (self.temporal_factor - 1) + [feats], dim=2)
        return self.proj(feats)


def _zero_out(attn: WanAnimateFaceBlockCrossAttention) -> WanAnimateFaceBlockCrossAttention:
    nn.init.zeros_(attn.to_out.weight)
    nn.init.zeros_(attn.to_out.bias)
    return attn


# The parameters __init__ initialises itself rather than through its module's ``reset_parameters``:
# zero-init paths (a pretrained Wan starts unchanged), learned nulls, prompt tokens, Wan's scale-shift
# tables. The loaders (`model.loading`) apply them to tensors a checkpoint lacks, on the meta device and
# under ZeRO-3 (where in-place inits of already partitioned submodules are lost); tests/test_loading.py
# checks them against __init__. Values: "zeros" or "normal:STD" ("dim" = 1 / sqrt(model dim)).
_INIT_RULES: tuple[tuple[str, str], ...] = (
    (r"ref_embedding\.(weight|bias)|pose_encoder\.proj\.(weight|bias)|(audio|face)_attn\.\d+\.to_out\.(weight|bias)"
     r"|null_(ref|pose|ref_frame)|motion_embedding", "zeros"),
    (r"null_(audio|face)|audio_pos", "normal:0.02"),
    (r"context_tokens", "normal:1"),
    (r"(blocks\.\d+\.)?scale_shift_table", "normal:dim"),
)


class AnimationDenoiser(WanTransformer3DModel):
    """Wan transformer + reference/pose/audio/face conditions, learned nulls and an optional aux head."""

    _cp_plan = None  # our forward differs from Wan's: sequence parallelism is `enable_sequence_parallel`
    _no_split_modules = ["WanTransformerBlock", "WanAnimateFaceBlockCrossAttention"]

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        # ---- ours ----
        vae_spatial_factor: int = 8,
        vae_temporal_factor: int = 4,
        num_context_tokens: int = 4,
        pose_channels: tuple[int, ...] = (32, 64, 128, 256),
        audio_mels: int = 32,
        audio_window: int = 6,
        audio_every: int = 5,
        face_injection: bool = True,
        face_every: int = 5,
        face_patch: int = 2,
        ref_as_frame: bool = False,
        aux_head: bool = False,
        motion_frames: int = 0,
    ) -> None:
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ValueError("image_dim/added_kv_proj_dim (Wan I2V CLIP path) are not supported: the ref enters as a latent")
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            rope_max_seq_len=rope_max_seq_len, pos_embed_seq_len=pos_embed_seq_len,
        )
        _check_geometry(patch_size, vae_spatial_factor, pose_channels, audio_every, face_every)
        dim = num_attention_heads * attention_head_dim
        self.context_tokens = nn.Parameter(torch.randn(num_context_tokens, text_dim))
        self.ref_embedding = nn.Conv3d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        nn.init.zeros_(self.ref_embedding.weight)
        nn.init.zeros_(self.ref_embedding.bias)
        self.pose_encoder = PoseEncoder(tuple(pose_channels), dim, vae_temporal_factor)
        self.audio_proj = nn.Linear(audio_mels, dim)
        self.audio_pos = nn.Parameter(torch.randn(vae_temporal_factor * audio_window, dim) * 0.02)
        self.audio_attn = nn.ModuleList(self._frame_attention() for _ in range(math.ceil(num_layers / audio_every)))
        self.null_ref = nn.Parameter(torch.zeros(dim))
        self.null_pose = nn.Parameter(torch.zeros(dim))
        self.null_audio = nn.Parameter(torch.randn(dim) * 0.02)
        if face_injection:
            self.face_embedding = nn.Conv3d(in_channels, dim, (1, face_patch, face_patch), stride=(1, face_patch, face_patch))
            self.face_attn = nn.ModuleList(self._frame_attention() for _ in range(math.ceil(num_layers / face_every)))
            self.null_face = nn.Parameter(torch.randn(dim) * 0.02)
        if ref_as_frame:
            self.null_ref_frame = nn.Parameter(torch.zeros(dim))
        if motion_frames:
            if motion_frames % patch_size[0]:
                raise ValueError(f"motion_frames={motion_frames} must be a multiple of the temporal patch {patch_size[0]}")
            self.motion_embedding = nn.Parameter(torch.zeros(dim))
        if aux_head:
            self.aux_norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
            self.aux_proj = nn.Linear(dim, out_channels * math.prod(patch_size))
        self._sequence_parallel: SequenceParallel | None = None

    def init_rule(self, name: str) -> Callable[[torch.Tensor], Any] | None:
        """The in-place init ``__init__`` gives parameter ``name`` beyond its module's defaults (see
        ``_INIT_RULES``), or None when ``reset_parameters`` of its module is all there is."""
        for pattern, kind in _INIT_RULES:
            if re.fullmatch(pattern, name):
                if kind == "zeros":
                    return nn.init.zeros_
                std = kind.removeprefix("normal:")
                dim = self.config.num_attention_heads * self.config.attention_head_dim
                return functools.partial(nn.init.normal_, mean=0.0, std=dim**-0.5 if std == "dim" else float(std))
        return None

    def enable_sequence_parallel(self, group: Any | None) -> None:
        """Split every forward's tokens by latent frames across the ranks of ``group`` (Ulysses, see
        `model.sequence_parallel`); every rank passes the same inputs and gets the whole output.
        ``None`` turns it off. The heads must divide by the group size (checked here)."""
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        sp = None if group is None else SequenceParallel.of(group)
        if sp is not None:
            sp.check_heads(self.config.num_attention_heads)
        for block in self.blocks:
            block.attn1.set_processor(WanAttnProcessor() if sp is None else UlyssesWanAttnProcessor(sp))
        self._sequence_parallel = sp

    @property
    def sequence_parallel_group(self) -> Any | None:
        """The process group tokens are split across (None = off)."""
        return None if self._sequence_parallel is None else self._sequence_parallel.group

    @contextlib.contextmanager
    def sequence_parallel_off(self) -> Iterator[None]:
        """Plain forwards inside (e.g. one rank sampling a validation clip alone); the group restored after."""
        group = self.sequence_parallel_group
        self.enable_sequence_parallel(None)
        try:
            yield
        finally:
            self.enable_sequence_parallel(group)

    def _frame_attention(self) -> WanAnimateFaceBlockCrossAttention:
        cfg = self.config
        head_dim = cfg.attention_head_dim
        return _zero_out(WanAnimateFaceBlockCrossAttention(
            dim=cfg.num_attention_heads * head_dim, heads=cfg.num_attention_heads, dim_head=head_dim,
            eps=cfg.eps, cross_attention_dim_head=head_dim))

    # ------------------------------------------------------------------ conditions -> tokens
    @staticmethod
    def _with_null(values: torch.Tensor, null: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Per sample: `values` where keep else the learned null (broadcast over all but batch)."""
        mask = keep.view(-1, *([1] * (values.ndim - 1)))
        return torch.where(mask, values, null.to(values.dtype).expand_as(values))

    def set_context_tokens(self, embeds: torch.Tensor) -> None:
        """Replace the learned prompt by an encoded one (N, text_dim), e.g. umT5 output for a real checkpoint.
        The config records N, so a saved folder reloads (``from_pretrained`` builds N tokens)."""
        if embeds.ndim != 2 or embeds.shape[1] != self.config.text_dim:
            raise ValueError(f"context tokens must be (N, {self.config.text_dim}), got {tuple(embeds.shape)}")
        self.context_tokens = nn.Parameter(embeds.detach().to(self.context_tokens))
        self.register_to_config(num_context_tokens=int(embeds.shape[0]))

    def _ref_tokens(self, cond: Conditions, batch: int, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        """(B, D, 1, h', w') ref contribution (or its null), broadcast over frames by the caller."""
        keep = cond.keep_mask("ref", like.device, batch)
        if cond.ref_latent is None:
            return self.null_ref.to(like.dtype).view(1, -1, 1, 1, 1).expand(batch, -1, 1, *grid[1:])
        self._check_shape("ref_latent", cond.ref_latent, (batch, self.config.in_channels, 1, *like.shape[-2:]))
        ref = self.ref_embedding(cond.ref_latent.to(like.dtype))
        return self._with_null(ref.permute(0, 2, 3, 4, 1), self.null_ref, keep).permute(0, 4, 1, 2, 3)

    def _pose_tokens(self, cond: Conditions, batch: int, grid: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        """(B, D, T', h', w') pose contribution (or its null)."""
        if cond.pose is None:
            return self.null_pose.to(like.dtype).view(1, -1, 1, 1, 1)
        pose = self.pose_encoder(cond.pose.to(like.dtype))
        if tuple(pose.shape[2:]) != grid:
            raise ValueError(f"pose {tuple(cond.pose.shape)} encodes to grid {tuple(pose.shape[2:])}, latents need {grid}")
        keep = cond.keep_mask("pose", like.device)
        return self._with_null(pose.permute(0, 2, 3, 4, 1), self.null_pose, keep).permute(0, 4, 1, 2, 3)

    def _audio_tokens(self, cond: Conditions, batch: int, num_latent: int, like: torch.Tensor) -> torch.Tensor:
        """(B, T_lat, tf * W, D) per-latent-frame audio tokens (or the null token)."""
        cfg = self.config
        if cond.audio is None:
            return self.null_audio.to(like.dtype).expand(batch, num_latent, 1, -1)
        audio = cond.audio.to(like.dtype)
        if audio.ndim != 4 or audio.shape[2:] != (cfg.audio_window, cfg.audio_mels):
            raise ValueError(f"audio must be (B, T, {cfg.audio_window}, {cfg.audio_mels}), got {tuple(audio.shape)}")
        grouped = group_frames(audio, cfg.vae_temporal_factor).flatten(2, 3)  # (B, T_lat, tf*W, M)
        if grouped.shape[1] != num_latent:
            raise ValueError(f"audio has {audio.shape[1]} frames -> {grouped.shape[1]} latent frames, latents have {num_latent}")
        tokens = self.audio_proj(grouped) + self.audio_pos.to(like.dtype)
        return self._with_null(tokens, self.null_audio, cond.keep_mask("audio", like.device))

    def _face_tokens(self, cond: Conditions, batch: int, num_latent: int, like: torch.Tensor) -> torch.Tensor | None:
        """(B, T_lat, N_face, D) per-latent-frame face tokens (or the null token); None without face path."""
        if not self.config.face_injection:
            return None
        if cond.face is None:
            return self.null_face.to(like.dtype).expand(batch, num_latent, 1, -1)
        if cond.face.ndim != 5 or cond.face.shape[2] not in (1, num_latent):
            raise ValueError(f"face must be (B, C, 1, hf, wf) (the reference's, broadcast) or (B, C, {num_latent}, "
                             f"hf, wf), got {tuple(cond.face.shape)}")
        tokens = self.face_embedding(cond.face.to(like.dtype)).flatten(3).permute(0, 2, 3, 1)  # (B, 1|T_lat, N, D)
        tokens = tokens.expand(-1, num_latent, -1, -1)
        return self._with_null(tokens, self.null_face, cond.keep_mask("face", like.device))

    @staticmethod
    def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(tensor.shape)}")

    # ------------------------------------------------------------------ forward
    def _embed(self, x: torch.Tensor, cond: Conditions) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch tokens + ref + pose, (B, S, D) with S = T_total h' w'; optional ref frame prepended."""
        batch = x.shape[0]
        tokens = self.patch_embedding(x)  # (B, D, T', h', w')
        grid = tuple(tokens.shape[2:])
        tokens = tokens + self._ref_tokens(cond, batch, grid, x) + self._pose_tokens(cond, batch, grid, x)
        if cond.motion is not None:  # mark the given frames' tokens
            frames = cond.motion.shape[2] // self.config.patch_size[0]
            keep = cond.keep_mask("motion", x.device).view(-1, 1, 1, 1, 1).to(tokens.dtype)
            marker = self.motion_embedding.to(tokens.dtype).view(1, -1, 1, 1, 1) * keep
            tokens = torch.cat([tokens[:, :, :frames] + marker, tokens[:, :, frames:]], dim=2)
        if self.config.ref_as_frame:
            tokens = torch.cat([self._ref_frame(cond, batch, grid, x), tokens], dim=2)
        return tokens.flatten(2).transpose(1, 2).contiguous(), grid

    def _ref_frame(self, cond: Conditions, batch: int, grid: tuple[int, int, int], x: torch.Tensor) -> torch.Tensor:
        """(B, D, 1, h', w') tokens of the ref latent as an extra leading frame (null where dropped)."""
        keep = cond.keep_mask("ref", x.device, batch)
        if cond.ref_latent is None:
            return self.null_ref_frame.to(x.dtype).view(1, -1, 1, 1, 1).expand(batch, -1, 1, *grid[1:])
        frame = self.patch_embedding(cond.ref_latent.to(x.dtype))
        return self._with_null(frame.permute(0, 2, 3, 4, 1), self.null_ref_frame, keep).permute(0, 4, 1, 2, 3)

    def _stage(self, index: int, hidden: torch.Tensor, context: torch.Tensor, temb_proj: torch.Tensor,
               rope: tuple[torch.Tensor, torch.Tensor], audio: torch.Tensor, face: torch.Tensor | None) -> torch.Tensor:
        """One Wan block, then (every *_every blocks) per-frame audio and face cross-attention."""
        cfg = self.config
        hidden = self.blocks[index](hidden, context, temb_proj, rope)
        if index % cfg.audio_every == 0:
            hidden = hidden + self.audio_attn[index // cfg.audio_every](hidden, audio)
        if face is not None and index % cfg.face_every == 0:
            hidden = hidden + self.face_attn[index // cfg.face_every](hidden, face)
        return hidden

    def _frame_tokens_with_ref(self, tokens: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """Prepend a null frame of condition tokens for the ref frame when ref_as_frame is on."""
        if not self.config.ref_as_frame:
            return tokens
        lead = null.to(tokens.dtype).expand(tokens.shape[0], 1, tokens.shape[2], -1)
        return torch.cat([lead, tokens], dim=1)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditions,
                return_aux: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity v (B, C, T_lat, h, w) for noisy latents x at noise level sigma (B,) in [0, 1].

        Inputs are cast to the model's dtype here (the one place: a bf16 model takes the fp32 latents and
        conditions of any caller) and the outputs come back in x's dtype, so samplers keep their own."""
        cfg = self.config
        in_dtype, raw_x = x.dtype, x
        x, cond = x.to(self.patch_embedding.weight.dtype), cond.to(None, self.patch_embedding.weight.dtype)
        patch = tuple(cfg.patch_size)
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, T, h, w), got {tuple(x.shape)}")
        if any(size % p for size, p in zip(x.shape[2:], patch)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by patch {patch}")
        if return_aux and not cfg.aux_head:
            raise ValueError("return_aux=True needs a model built with aux_head=True")
        batch = x.shape[0]
        if cond.keep_mask("ref", x.device, batch).shape[0] != batch:
            raise ValueError(f"conditions have batch {cond.batch_size}, x has {batch}")
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(batch)
        given = x if cond.motion is None else self._with_prefix(x, cond)
        hidden, grid = self._embed(given, cond)
        frames_total = grid[0] + int(cfg.ref_as_frame)
        sp = self._sequence_parallel
        rope_frames = frames_total if sp is None else padded_frames(frames_total, sp.size)  # global positions
        rope = self.rope(x[:, :, :1].expand(-1, -1, rope_frames * patch[0], -1, -1))
        context = self.context_tokens.to(x.dtype).expand(batch, -1, -1)
        temb, temb_proj, context, _ = self.condition_embedder(sigma * 1000.0, context)
        temb_proj = temb_proj.unflatten(1, (6, -1))
        audio = self._frame_tokens_with_ref(self._audio_tokens(cond, batch, grid[0], x), self.null_audio)
        face = self._face_tokens(cond, batch, grid[0], x)
        face = None if face is None else self._frame_tokens_with_ref(face, self.null_face)
        if sp is not None:
            hidden, rope, audio, face = self._local_frames(sp, hidden, rope, audio, face, frames_total, grid)
        for index in range(len(self.blocks)):
            stage = functools.partial(self._stage, index)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = self._gradient_checkpointing_func(stage, hidden, context, temb_proj, rope, audio, face)
            else:
                hidden = stage(hidden, context, temb_proj, rope, audio, face)
        out = self._output(hidden, temb, grid, frames_total, return_aux)
        v, aux = (out[0].to(in_dtype), out[1].to(in_dtype)) if return_aux else (out.to(in_dtype), None)
        if cond.motion is not None:
            v, aux = self._pin_prefix(v, aux, raw_x, sigma, cond)
        return (v, aux) if return_aux else v

    def _with_prefix(self, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
        """x with its first k latent frames replaced by ``cond.motion`` where the motion keep mask holds."""
        frames, limit = cond.motion.shape[2], self.config.motion_frames
        if not limit:
            raise ValueError("cond.motion needs a model built with motion_frames > 0 (ModelConfig.motion_frames)")
        self._check_shape("motion", cond.motion, (x.shape[0], x.shape[1], frames, *x.shape[3:]))
        if not 0 < frames <= limit or frames >= x.shape[2] or frames % self.config.patch_size[0]:
            raise ValueError(f"motion has {frames} latent frames: need 1..{limit} (motion_frames), fewer than x's "
                             f"{x.shape[2]}, a multiple of the temporal patch {self.config.patch_size[0]}")
        keep = cond.keep_mask("motion", x.device).view(-1, 1, 1, 1, 1)
        head = torch.where(keep, cond.motion.to(x.dtype), x[:, :, :frames])
        return torch.cat([head, x[:, :, frames:]], dim=2)

    @staticmethod
    def _pin_prefix(v: torch.Tensor, aux: torch.Tensor | None, x: torch.Tensor, sigma: torch.Tensor,
                    cond: Conditions) -> tuple[torch.Tensor, torch.Tensor | None]:
        """On the given frames: v = (x - motion) / sigma, the velocity whose x0 = x - sigma v is the prefix
        exactly (aux x0 = the prefix), computed in fp32 from the caller's x."""
        frames = cond.motion.shape[2]
        keep = cond.keep_mask("motion", x.device).view(-1, 1, 1, 1, 1)
        motion = cond.motion.to(device=x.device, dtype=torch.float32)
        scale = sigma.float().clamp_min(1e-6).view(-1, 1, 1, 1, 1)
        pinned = ((x[:, :, :frames].float() - motion) / scale).to(v.dtype)
        v = torch.cat([torch.where(keep, pinned, v[:, :, :frames]), v[:, :, frames:]], dim=2)
        if aux is not None:
            aux = torch.cat([torch.where(keep, motion.to(aux.dtype), aux[:, :, :frames]), aux[:, :, frames:]], dim=2)
        return v, aux

    def _local_frames(self, sp: SequenceParallel, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      audio: torch.Tensor, face: torch.Tensor | None, frames_total: int, grid: tuple[int, int, int]):
        """This rank's block of whole latent frames of the tokens (B, S, D), RoPE (of the padded clip) and
        per-frame condition tokens (B, T, N, D); the attention processors learn how many tokens are real."""
        per_frame = grid[1] * grid[2]
        hidden = split_frames(hidden.unflatten(1, (frames_total, per_frame)), 1, sp).flatten(1, 2)
        rope = tuple(r.unflatten(1, (-1, per_frame)).chunk(sp.size, dim=1)[sp.rank].flatten(1, 2) for r in rope)
        audio = split_frames(audio, 1, sp)
        face = None if face is None else split_frames(face, 1, sp)
        for block in self.blocks:
            block.attn1.processor.valid_tokens = frames_total * per_frame
        return hidden, rope, audio, face

    def _output(self, hidden: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int], frames_total: int,
                return_aux: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Output (and aux) head on the tokens held here, gathered over the SP group, ref frame dropped."""
        cfg = self.config
        patch = tuple(cfg.patch_size)
        local_grid = (hidden.shape[1] // (grid[1] * grid[2]), grid[1], grid[2])
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        out = (self.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        heads = [_unpatchify(self.proj_out(out), local_grid, patch)]
        if return_aux:
            heads.append(_unpatchify(self.aux_proj(self.aux_norm(hidden)), local_grid, patch))
        if self._sequence_parallel is not None:
            heads = [gather_frames(h, 2, frames_total * patch[0], self._sequence_parallel) for h in heads]
        if cfg.ref_as_frame:
            heads = [h[:, :, patch[0]:] for h in heads]
        return heads[0] if not return_aux else (heads[0], heads[1])


def _check_geometry(patch_size, vae_spatial_factor: int, pose_channels, audio_every: int, face_every: int) -> None:
    down = vae_spatial_factor * patch_size[1]
    if patch_size[1] != patch_size[2] or patch_size[0] != 1:
        raise ValueError(f"patch_size must be (1, p, p), got {tuple(patch_size)}")
    if 2 ** len(pose_channels) != down:
        raise ValueError(f"pose encoder halves H/W per stage: {len(pose_channels)} stages give "
                         f"{2 ** len(pose_channels)}x, tokens need vae_spatial_factor * patch = {down}x")
    if audio_every < 1 or face_every < 1:
        raise ValueError("audio_every and face_every must be >= 1")


# ---------------------------------------------------------------------- loading foreign checkpoints
@dataclass
class LoadReport:
    """What `load_transformer_weights` (or a `model.loading` build) did, by parameter name. ``derived``:
    tensors started from another checkpoint tensor or file (name -> where from), e.g. ``ref_embedding.weight``
    from a Wan I2V / Animate patch embedding's image-latent channels."""

    loaded: list[str]
    sliced: list[str]
    initialised: list[str]
    unused: list[str]
    derived: dict[str, str] = field(default_factory=dict)


def load_transformer_weights(model: AnimationDenoiser, folder: str | Path) -> LoadReport:
    """Load a Wan / Wan-Animate / AnimationDenoiser diffusers folder into the real `model` by name (see the
    module doc), one tensor at a time (`model.loading`: no dict of the whole checkpoint)."""
    from model.loading import SafetensorsSource, fill_model, parameter_shapes, plan_fills

    source = SafetensorsSource.folder(folder)
    fills, report = plan_fills(parameter_shapes(model), source, model.config.in_channels)
    fill_model(model, fills, source)
    return report


# ---------------------------------------------------------------------- LoRA (peft via diffusers' PeftAdapterMixin)
# Module-name suffixes peft matches. "attn" covers Wan's self- and text cross-attention (attn1, attn2)
# and our per-frame audio/face cross-attention q/k/v; "attn+ffn" adds the blocks' feed-forward.
LORA_TARGETS: dict[str, list[str]] = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn+ffn": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
}


def lora_config(rank: int = 8, alpha: float | None = None, targets: str = "attn", dropout: float = 0.0):
    """A peft `LoraConfig` for the denoiser (alpha defaults to rank, i.e. scale 1)."""
    from peft import LoraConfig

    if targets not in LORA_TARGETS:
        raise ValueError(f"targets must be one of {sorted(LORA_TARGETS)}, got {targets!r}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank),
                      target_modules=list(LORA_TARGETS[targets]), lora_dropout=dropout, init_lora_weights=True)


def use_adapter(model: AnimationDenoiser, name: str | None) -> None:
    """Activate one named LoRA adapter, or none (None = adapters disabled, the base model).

    peft's `set_adapter` / `disable_adapters` also flip ``requires_grad`` of adapter weights;
    this helper restores every LoRA parameter's ``requires_grad`` afterwards, so switching for
    inference (samplers' ``adapter_switch``) or for the DPO reference never changes what trains.
    """
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    flags = {n: p.requires_grad for n, p in lora_params.items()}
    if name is None:
        model.disable_adapters()
    else:
        known = set(getattr(model, "peft_config", {}) or {})
        if name not in known:
            raise KeyError(f"no adapter named {name!r}; the model has {sorted(known)}")
        model.enable_adapters()
        model.set_adapter(name)
    for n, p in lora_params.items():
        p.requires_grad_(flags[n])
