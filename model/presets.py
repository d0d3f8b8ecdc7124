"""Model presets, the `model:` config section every job reuses, and `build_denoiser`.

A preset is a table of `AnimationDenoiser.__init__` kwargs: Wan's transformer dims plus our
extra-module dims. ``tiny`` is only a config of the same class (no second code path).

* ``tiny``: ~2M parameters, dim 128 (4 heads x 32), 4 blocks, audio/face cross-attention after every
  block; tiny VAE geometry (spatial 4, temporal 1, latents (16, 8, 16, 16), 512 tokens per clip).
* ``wan-1.3b``: Wan2.1-T2V-1.3B transformer dims (dim 1536, 30 blocks, ffn 8960, text 4096);
  Wan VAE geometry (spatial 8, temporal 4); cross-attention every 5th block (Wan-Animate's cadence).
* ``wan-animate-14b``: Wan2.2-Animate-14B transformer dims (dim 5120, 40 blocks, ffn 13824). Its CLIP
  image path (image_dim 1280, added_kv_proj_dim 5120) is deliberately off: the reference enters
  as a latent (see `model.denoiser`), so those checkpoint tensors are reported unused.

Loading (`build_denoiser` with ``pretrained_path``, a local folder; ``s3://`` ones go through
`artifacts.models.load_denoiser`; a pipeline folder with a ``transformer/`` subfolder works too):
* an `AnimationDenoiser` folder (our `save_pretrained`): its saved config is used, except the
  switches ``face_injection``, ``aux_head``, ``ref_as_frame`` which come from this config (so a
  teacher folder can seed a student with an aux head); weights load by name, new modules initialise.
* a `WanTransformer3DModel` / `WanAnimateTransformer3DModel` folder: the preset table is used and
  its Wan dims must equal the folder's (loud error otherwise); weights load by name as
  `model.denoiser.load_transformer_weights` documents, and the report is logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from model.audio import AudioFeatureConfig
from core.config import StrictConfig
from model.denoiser import AnimationDenoiser, LoadReport, load_transformer_weights

__all__ = ["ModelConfig", "PRESETS", "preset_kwargs", "build_denoiser", "count_parameters", "VAE_GEOMETRY", "require_local"]

logger = logging.getLogger(__name__)

_WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256,
        vae_spatial_factor=4, vae_temporal_factor=1, num_context_tokens=4, pose_channels=(16, 32, 64),
        audio_every=1, face_every=1, face_patch=2,
    ),
    "wan-1.3b": dict(
        **_WAN_1_3B, vae_spatial_factor=8, vae_temporal_factor=4, num_context_tokens=16,
        pose_channels=(32, 64, 128, 256), audio_every=5, face_every=5, face_patch=2,
    ),
    "wan-animate-14b": dict(
        **{**_WAN_1_3B, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
        vae_spatial_factor=8, vae_temporal_factor=4, num_context_tokens=16,
        pose_channels=(32, 64, 128, 256), audio_every=5, face_every=5, face_patch=2,
    ),
}

# Wan dims that must agree between a preset and a foreign Wan folder's config.json.
_WAN_DIMS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
             "freq_dim", "ffn_dim", "num_layers", "patch_size")
# Our switches: taken from ModelConfig even when loading one of our own folders.
_SWITCHES = ("face_injection", "aux_head", "ref_as_frame")

# Checked-in models (tiny VAE, pretrained tiny teacher, ...), named in configs as ``builtin:NAME``.
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"

VAE_GEOMETRY: dict[str, tuple[int, int]] = {
    name: (kw["vae_spatial_factor"], kw["vae_temporal_factor"]) for name, kw in PRESETS.items()}


class ModelConfig(StrictConfig):
    """The `model:` section of every job config: which denoiser, which weights, which switches."""

    preset: Literal["tiny", "wan-1.3b", "wan-animate-14b"] = Field("tiny", description="dims table, see PRESETS")
    pretrained_path: str | None = Field(None, description="diffusers folder (ours or Wan's), local or s3://, or "
                                        "builtin:tiny_teacher (model/assets); None = random init")
    vae_path: str | None = Field(None, description="AutoencoderKLWan folder, local or s3://; None = checked-in tiny VAE")
    face_injection: bool = Field(True, description="face-latent cross-attention path (DanceLCM); False removes it")
    aux_head: bool = Field(False, description="light head predicting clean latents (DanceLCM L_aux)")
    ref_as_frame: bool = Field(False, description="also prepend the ref latent as an extra token frame (Wan-Animate)")
    gradient_checkpointing: bool = Field(False, description="recompute each block in backward (memory for compute)")
    audio: AudioFeatureConfig = Field(default_factory=AudioFeatureConfig,
                                      description="audio feature geometry; preprocessing and serving compute features with it")
    overrides: dict[str, Any] = Field(default_factory=dict,
                                      description="extra AnimationDenoiser kwargs over the preset table, e.g. {num_layers: 2}")

    @field_validator("pretrained_path")
    @classmethod
    def _builtin_asset(cls, value: str | None) -> str | None:
        """``builtin:NAME`` -> the absolute path of the checked-in folder model/assets/NAME (any cwd, any worker)."""
        if value is None or not value.startswith(BUILTIN_PREFIX):
            return value
        folder = ASSETS_DIR / value.removeprefix(BUILTIN_PREFIX)
        if not (folder / "config.json").is_file():
            known = sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())
            raise ValueError(f"no built-in model {value!r}; known: {[BUILTIN_PREFIX + k for k in known]}")
        return str(folder)

    @field_validator("overrides")
    @classmethod
    def _known_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        import inspect

        known = set(inspect.signature(AnimationDenoiser.__init__).parameters) - {"self"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown denoiser kwargs {sorted(unknown)}; known: {sorted(known)}")
        clashing = set(value) & (set(_SWITCHES) | {"audio_mels", "audio_window"})
        if clashing:
            raise ValueError(f"{sorted(clashing)} are set by their own fields (switches / audio), not overrides")
        return value


def preset_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """`AnimationDenoiser` kwargs for `cfg`: preset table, switches, audio geometry, then overrides."""
    kwargs = dict(PRESETS[cfg.preset])
    kwargs.update({name: getattr(cfg, name) for name in _SWITCHES})
    kwargs.update(audio_mels=cfg.audio.n_mels, audio_window=cfg.audio.window)
    kwargs.update(cfg.overrides)
    return kwargs


def require_local(path: str, what: str) -> Path:
    """``path`` as a local Path; a remote URI is an error naming the loader that fetches it (model/ reads no storage)."""
    if "://" in str(path):
        raise ValueError(f"{what} {path!r} is remote: model/ reads local folders only; load it through "
                         "artifacts.models (which copies it down with the job's storage settings)")
    return Path(path)


def _model_folder(path: str) -> Path:
    """The diffusers model folder at local `path` (a pipeline folder's ``transformer/`` too)."""
    local = require_local(path, "pretrained_path")
    if (local / "transformer" / "config.json").is_file():
        local = local / "transformer"  # a whole pipeline folder
    if not (local / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model folder (no config.json)")
    return local


def _kwargs_for_folder(cfg: ModelConfig, folder_config: dict[str, Any]) -> dict[str, Any]:
    """Our saved config (switches from cfg) or, for a Wan folder, the preset after a dims check."""
    class_name = folder_config.get("_class_name")
    if class_name == AnimationDenoiser.__name__:
        kwargs = {k: v for k, v in folder_config.items() if not k.startswith("_")}
        kwargs.update({name: getattr(cfg, name) for name in _SWITCHES})
        audio = {"audio_mels": cfg.audio.n_mels, "audio_window": cfg.audio.window}
        if any(kwargs.get(k) != v for k, v in audio.items()):
            raise ValueError(f"folder was trained with audio {[kwargs.get(k) for k in audio]} "
                             f"(mels, window), config asks {list(audio.values())}")
        return kwargs
    if class_name not in ("WanTransformer3DModel", "WanAnimateTransformer3DModel"):
        raise ValueError(f"cannot load a {class_name!r} folder as the animation denoiser")
    kwargs = preset_kwargs(cfg)
    mismatched = {k: (kwargs[k], folder_config[k]) for k in _WAN_DIMS
                  if k in folder_config and k != "in_channels" and _norm(folder_config[k]) != _norm(kwargs[k])}
    if mismatched:
        raise ValueError(f"preset {cfg.preset!r} does not match the {class_name} folder: {mismatched} (preset, folder)")
    return kwargs


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def build_denoiser(cfg: ModelConfig) -> AnimationDenoiser:
    """Random-init `cfg.preset`, or load the local folder `cfg.pretrained_path` (ours or Wan's; see module doc).

    Remote folders are loaded by `artifacts.models.load_denoiser`, which copies them down first.
    """
    if cfg.pretrained_path is None:
        model = AnimationDenoiser(**preset_kwargs(cfg))
    else:
        folder = _model_folder(cfg.pretrained_path)
        folder_config = json.loads((folder / "config.json").read_text())
        model = AnimationDenoiser(**_kwargs_for_folder(cfg, folder_config))
        report = load_transformer_weights(model, folder)
        _log_report(cfg.pretrained_path, report)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _log_report(path: str, report: LoadReport) -> None:
    logger.info("loaded %s: %d tensors loaded, %d sliced %s, %d initialised %s, %d unused %s", path,
                len(report.loaded), len(report.sliced), report.sliced, len(report.initialised),
                report.initialised[:20], len(report.unused), report.unused[:20])


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())
