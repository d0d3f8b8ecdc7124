"""Video VAE: diffusers' `AutoencoderKLWan` behind one small wrapper with the project's conventions.

Latents leave `encode` normalised per channel, ``(z - latents_mean) / latents_std``, exactly as the
diffusers Wan pipelines do before the transformer (and undo before decoding), so every later stage
sees roughly unit-variance latents whatever VAE is loaded.

* tiny default: a checked-in `AutoencoderKLWan` folder (`model/assets/tiny_vae/`, fitted to the
  synthetic puppet world by `ray_jobs.fit_vae`): z_dim 16, spatial factor 4, temporal factor 1.
* real presets: the Wan 2.1 / 2.2 VAE as a local diffusers folder (remote ones are copied down by
  `artifacts.models.load_vae`).

Where we deliberately do not call diffusers' own `decode`: `AutoencoderKLWan._decode` keeps the
whole decoded clip in one growing tensor on the model's device. `VideoVAE.iter_decode` runs the same
causal per-latent-frame loop (same feature cache, so the result is identical) but hands the pixels
out in chunks of latent frames, which `decode` can move to another device (``out_device="cpu"``) as
they come; long videos then need accelerator memory for one chunk only. Frames larger than the tile
size go through diffusers' own `tiled_decode` (spatial tiles, whole clip per tile) instead.

Frame-wise fast path: a VAE with temporal factor 1 whose causal convs have all-zero past-time taps
(the tiny one: `ray_jobs.fit_vae` keeps them zero) maps each frame on its own, so the causal loop
only repeats work. `VideoVAE` then folds time into the batch and runs every causal conv as a 2-D
conv with its current-frame tap: the same numbers up to float rounding (checked by a test), a
third of the conv FLOPs and no per-frame Python loop. Real Wan VAEs (temporal factor 4) never take it.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from pydantic import Field

from core.config import StrictConfig

__all__ = ["VAEConfig", "VideoVAE", "load_vae", "TINY_VAE_PATH", "frames_to_model_input", "video_to_uint8",
           "is_framewise", "past_time_taps_are_zero", "zero_past_time_taps", "framewise_conv_forward"]

TINY_VAE_PATH = Path(__file__).resolve().parent / "assets" / "tiny_vae"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class VAEConfig(StrictConfig):
    """Which VAE to load and how to run it."""

    path: str | None = Field(None, description="diffusers AutoencoderKLWan folder (local or s3://); None = tiny checked-in VAE")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="weights and compute dtype")
    sample_posterior: bool = Field(False, description="encode to a posterior sample instead of its mode (mode is deterministic)")
    decode_chunk_frames: int = Field(4, ge=1, description="latent frames decoded per chunk (bounds decode memory)")
    tiling: bool = Field(False, description="spatially tiled encode/decode for frames larger than the tile (diffusers enable_tiling)")
    tile_sample_size: int = Field(256, ge=16, description="tile edge in pixels when tiling")
    tile_sample_stride: int = Field(192, ge=8, description="tile stride in pixels when tiling (overlap = size - stride)")
    framewise_fast_path: bool = Field(True, description="frame-wise VAEs (temporal factor 1, zero past taps) run frames as one batch of 2-D convs")
    encode_chunk_frames: int = Field(32, ge=1, description="frames per batch on the frame-wise encode path (bounds encode memory)")


def _causal_convs(vae) -> list:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return [module for module in vae.modules() if isinstance(module, WanCausalConv3d)]


@torch.no_grad()
def zero_past_time_taps(vae) -> int:
    """Zero the past-frame taps of every causal conv with temporal kernel > 1; return how many convs."""
    count = 0
    for module in _causal_convs(vae):
        if module.kernel_size[0] > 1:
            module.weight[:, :, :-1].zero_()  # causal: the last temporal tap is the current frame
            count += 1
    return count


def past_time_taps_are_zero(vae) -> bool:
    """True when every causal conv's past-frame taps are exactly zero (each frame is mapped alone)."""
    return all(not module.weight[:, :, :-1].any() for module in _causal_convs(vae) if module.kernel_size[0] > 1)


def is_framewise(vae) -> bool:
    """True for an `AutoencoderKLWan` that maps every frame independently (no temporal factor, zero past taps)."""
    return (not any(vae.config.temperal_downsample) and vae.config.patch_size is None
            and past_time_taps_are_zero(vae))


def _conv2d_forward(conv) -> Callable:
    """`WanCausalConv3d.forward` for zero past taps: a 2-D conv per frame with the current-frame tap.

    `cache_x` (past frames from diffusers' feature cache) is ignored: it only ever meets the zero taps.
    """
    def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        flat = x.transpose(1, 2).reshape(batch * frames, channels, height, width)
        out = F.conv2d(flat, conv.weight[:, :, -1], conv.bias, stride=conv.stride[1:], padding=conv._padding[2])
        return out.reshape(batch, frames, *out.shape[1:]).transpose(1, 2)

    return forward


def _install_framewise_convs(vae) -> list:
    """Shadow every causal conv's `forward` with `_conv2d_forward` (instance attribute); return the convs."""
    patched = _causal_convs(vae)
    for module in patched:
        module.forward = _conv2d_forward(module)
    return patched


@contextmanager
def framewise_conv_forward(vae) -> Iterator[None]:
    """Run every causal conv as a 2-D conv while fitting a frame-wise VAE (about 3x cheaper).

    Exact for zero past taps: Wan's causally padded 3-D conv over one frame equals a 2-D conv with
    `weight[:, :, -1]`. Past taps get no gradient, so they stay zero. The patch is removed on exit.
    """
    patched = _install_framewise_convs(vae)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _fold_time(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, 1, H, W): every frame its own one-frame clip."""
    batch, channels, frames, height, width = x.shape
    return x.transpose(1, 2).reshape(batch * frames, channels, 1, height, width)


def _unfold_time(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, C, 1, H, W) -> (B, C, T, H, W), inverse of `_fold_time`."""
    _, channels, _, height, width = x.shape
    return x.reshape(batch, -1, channels, height, width).transpose(1, 2)


def frames_to_model_input(frames: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]; float (B, 3, T, H, W) passes checked."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if frames.ndim != 5:
        raise ValueError(f"frames must be 5-D: uint8 (B,T,H,W,3) or float (B,3,T,H,W); got shape {tuple(frames.shape)}")
    if frames.dtype == torch.uint8:
        if frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (B,T,H,W,3); got shape {tuple(frames.shape)}")
        return uint8_to_signed(frames.permute(0, 4, 1, 2, 3))
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or floating point; got {frames.dtype}")
    if frames.shape[1] != 3:
        raise ValueError(f"float frames must be (B,3,T,H,W); got shape {tuple(frames.shape)}")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < -1.001 or hi > 1.001:  # catches [0, 255] floats passed by mistake
        raise ValueError(f"float frames must lie in [-1, 1]; got range [{lo:.3f}, {hi:.3f}]")
    return frames


def uint8_to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any layout) -> float32 in [-1, 1] (0 -> -1, 255 -> 1): the one place this mapping lives."""
    return pixels.float().div(127.5).sub(1.0)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """float (B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3) on the CPU (rounded, clipped)."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be float (B,3,T,H,W); got shape {tuple(video.shape)}")
    pixels = ((video.detach().float().clamp(-1, 1) + 1.0) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().cpu()


class VideoVAE:
    """`AutoencoderKLWan` with normalised latents, shape checks and chunked decode.

    encode: frames uint8 (B, T, H, W, 3) or float (B, 3, T, H, W) -> latents (B, C, t, h, w)
    decode: latents (B, C, t, h, w) -> float (B, 3, T, H, W) in [-1, 1]
    with h = H / spatial_factor and t = 1 + (T - 1) / temporal_factor (Wan's causal first frame).
    """

    def __init__(self, vae: Any, config: VAEConfig | None = None) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.config = config or VAEConfig()
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float32)
        if mean.numel() != channels or std.numel() != channels:
            raise ValueError(f"latents_mean/std have {mean.numel()}/{std.numel()} entries, z_dim is {channels}")
        self._mean = mean.view(1, channels, 1, 1, 1)
        self._std = std.view(1, channels, 1, 1, 1)
        if self.config.tiling:
            vae.enable_tiling(self.config.tile_sample_size, self.config.tile_sample_size,
                              self.config.tile_sample_stride, self.config.tile_sample_stride)
        # Installed for good (not per call) so concurrent calls on one replica never race on the patch.
        self.framewise = bool(self.config.framewise_fast_path and is_framewise(vae))
        if self.framewise:
            _install_framewise_convs(vae)

    # geometry ---------------------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent cell: one 2x downsample per dim_mult stage after the first, times the patch size."""
        return 2 ** (len(self.vae.config.dim_mult) - 1) * (self.vae.config.patch_size or 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(bool(flag) for flag in self.vae.config.temperal_downsample)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def num_latent_frames(self, num_frames: int) -> int:
        """Latent frames for `num_frames` pixel frames; loud error when T is not 1 + k * temporal_factor."""
        factor = self.temporal_factor
        if num_frames < 1 or (num_frames - 1) % factor:
            raise ValueError(f"T={num_frames} frames do not fit temporal factor {factor}: need T = 1 + k*{factor}")
        return 1 + (num_frames - 1) // factor

    def to(self, device: str | torch.device | None = None) -> "VideoVAE":
        self.vae.to(device=device)
        return self

    # latents normalisation (diffusers Wan pipelines: (z - mean) * (1 / std)) ------------------
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw posterior latents (B, C, t, h, w) -> normalised latents, per channel."""
        return (z - self._mean.to(z.device, z.dtype)) / self._std.to(z.device, z.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) -> raw latents the decoder takes."""
        return latents * self._std.to(latents.device, latents.dtype) + self._mean.to(latents.device, latents.dtype)

    # encode / decode --------------------------------------------------------------------------
    def _check_pixels(self, x: torch.Tensor) -> None:
        _, _, num_frames, height, width = x.shape
        self.num_latent_frames(num_frames)
        factor = self.spatial_factor
        if height % factor or width % factor:
            raise ValueError(f"frame size {height}x{width} is not a multiple of the spatial factor {factor}")

    @torch.no_grad()
    def encode(self, frames: torch.Tensor | np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """Frames uint8 (B, T, H, W, 3) or float (B, 3, T, H, W) in [-1, 1] -> normalised latents (B, C, t, h, w)."""
        x = frames_to_model_input(frames)
        self._check_pixels(x)
        x = x.to(self.device, self.dtype)
        posterior = DiagonalGaussianDistribution(self._encode_moments(x))
        z = posterior.sample(generator=generator) if self.config.sample_posterior else posterior.mode()
        return self.normalize(z.float())

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder moments (B, 2C, t, h, w) for pixels (B, 3, T, H, W), causal chunk by chunk.

        Deliberately not `AutoencoderKLWan._encode`: it hard-codes chunks of 4 frames after the first,
        which silently drops trailing frames when the temporal factor is not 4 (T=8 with factor 1
        gives 5 latent frames). Same loop and feature cache, with chunks of `temporal_factor` frames,
        so for the real Wan VAE (factor 4) the result is identical.
        """
        vae = self.vae
        if vae.config.patch_size is not None or (vae.use_tiling and max(x.shape[-2:]) > vae.tile_sample_min_height):
            return vae._encode(x)
        if self.framewise:
            chunks = x.split(self.config.encode_chunk_frames, dim=2)
            return torch.cat([_unfold_time(vae.quant_conv(vae.encoder(_fold_time(c))), len(x)) for c in chunks], dim=2)
        factor = self.temporal_factor
        bounds = [(0, 1)] + [(1 + factor * i, 1 + factor * (i + 1)) for i in range((x.shape[2] - 1) // factor)]
        vae.clear_cache()
        try:
            chunks = []
            for start, stop in bounds:
                vae._enc_conv_idx = [0]
                chunks.append(vae.encoder(x[:, :, start:stop], feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
            return vae.quant_conv(torch.cat(chunks, dim=2))
        finally:
            vae.clear_cache()

    def _check_latents(self, latents: torch.Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B,{self.latent_channels},t,h,w); got shape {tuple(latents.shape)}")

    def _tiles_apply(self, z: torch.Tensor) -> bool:
        tile = self.vae.tile_sample_min_height // self.vae.spatial_compression_ratio
        return bool(self.vae.use_tiling) and max(z.shape[-2:]) > tile

    @torch.no_grad()
    def iter_decode(self, latents: torch.Tensor, chunk_frames: int | None = None) -> Iterator[torch.Tensor]:
        """Yield decoded pixel chunks float (B, 3, T_chunk, H, W) in [-1, 1], `chunk_frames` latent frames each.

        Same causal loop and feature cache as `AutoencoderKLWan._decode`, so the concatenated chunks
        equal a one-shot decode exactly.
        """
        self._check_latents(latents)
        vae = self.vae
        z = self.denormalize(latents.to(self.device, torch.float32)).to(self.dtype)
        if self._tiles_apply(z):
            yield vae.tiled_decode(z).sample
            return
        chunk = chunk_frames or self.config.decode_chunk_frames
        if self.framewise:
            for piece in z.split(chunk, dim=2):
                yield _unfold_time(vae.decoder(vae.post_quant_conv(_fold_time(piece))), len(z)).clamp(-1.0, 1.0)
            return
        vae.clear_cache()
        try:
            for start in range(0, z.shape[2], chunk):
                pieces = []
                for k in range(start, min(start + chunk, z.shape[2])):
                    vae._conv_idx = [0]  # diffusers resets the conv counter per latent frame
                    x = vae.post_quant_conv(z[:, :, k : k + 1])
                    pieces.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=k == 0))
                out = torch.cat(pieces, dim=2)
                if vae.config.patch_size is not None:
                    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                    out = unpatchify(out, patch_size=vae.config.patch_size)
                yield out.clamp(-1.0, 1.0)
        finally:
            vae.clear_cache()

    def decode(self, latents: torch.Tensor, chunk_frames: int | None = None,
               out_device: str | torch.device | None = None) -> torch.Tensor:
        """Normalised latents (B, C, t, h, w) -> float32 video (B, 3, T, H, W) in [-1, 1], decoded in time chunks."""
        target = torch.device(out_device) if out_device is not None else latents.device
        chunks = [piece.to(target, torch.float32) for piece in self.iter_decode(latents, chunk_frames)]
        return torch.cat(chunks, dim=2)

    @staticmethod
    def to_uint8(video: torch.Tensor) -> torch.Tensor:
        """float (B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3) on the CPU."""
        return video_to_uint8(video)


def _vae_folder(path: str) -> Path:
    """The local AutoencoderKLWan folder at `path` (remote ones: `artifacts.models.load_vae`)."""
    from model.presets import require_local

    local = require_local(path, "vae path")
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} is not a diffusers AutoencoderKLWan folder (no config.json)")
    return local


def load_vae(path: str | None = None, device: str | torch.device | None = None,
             config: VAEConfig | None = None) -> VideoVAE:
    """Load a local `AutoencoderKLWan` folder (None = the tiny checked-in VAE) as a `VideoVAE`.

    Remote folders: `artifacts.models.load_vae` copies them down and calls this.
    """
    from diffusers import AutoencoderKLWan

    config = config or VAEConfig()
    path = path if path is not None else config.path
    local = TINY_VAE_PATH if path is None else _vae_folder(str(path))
    vae = AutoencoderKLWan.from_pretrained(str(local), torch_dtype=_DTYPES[config.dtype])
    if device is not None:
        vae.to(device)
    return VideoVAE(vae, config)
