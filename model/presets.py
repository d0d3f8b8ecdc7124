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
* either way the model is built on the meta device and filled one tensor at a time (`model.loading`):
  no whole-checkpoint dict, peak ~ one model; inside `model.loading.zero3_build` (the training loop
  under ZeRO-3) it is built under ``deepspeed.zero.Init`` and filled partition by partition instead.
* prompt tokens: a folder's own ``context_tokens`` are kept, at their length (whatever its config says);
  otherwise ``prompt_embedding`` (a safetensors file of one (L, text_dim) umT5 output) starts them,
  with ``num_context_tokens`` = L; otherwise they are random.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from model.audio import AudioFeatureConfig
from core.config import StrictConfig
from model.denoiser import AnimationDenoiser, LoadReport
from model.loading import (SafetensorsSource, build_on_meta, build_partitioned, current_zero3_build, fill_model,
                           load_dtype, parameter_shapes, plan_fills)

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
_SWITCHES = ("face_injection", "aux_head", "ref_as_frame", "motion_frames")

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
    motion_frames: int = Field(0, ge=0, description="up to this many latent frames of the previous chunk can be given "
                               "as a clean prefix (long-form continuation, model.motion_frames); 0 = no such path, "
                               "or the loaded folder's own count. Its one tensor is zero-init, so a checkpoint "
                               "without it loads and samples as before")
    prompt_embedding: str | None = Field(None, description="safetensors file of one (L, text_dim) tensor (local; s3:// "
                                         "through artifacts.models.load_denoiser), an "
                                         "encoded prompt (umT5 output) the prompt tokens start from where the "
                                         "weights have none of their own (random init, a Wan folder)")
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

    @model_validator(mode="after")
    def _prompt_sets_its_length(self) -> "ModelConfig":
        if self.prompt_embedding is not None and "num_context_tokens" in self.overrides:
            raise ValueError("num_context_tokens is the length of prompt_embedding's tensor; do not also override it")
        return self


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
        # a folder trained with motion frames keeps them unless the config asks for another count
        kwargs["motion_frames"] = cfg.motion_frames or int(folder_config.get("motion_frames", 0))
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


def build_denoiser(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> AnimationDenoiser:
    """Random-init `cfg.preset`, or load the local folder `cfg.pretrained_path` (ours or Wan's; see module doc),
    in ``dtype`` (bf16 keeps the class's ``_keep_in_fp32_modules`` in fp32; under ZeRO-3 DeepSpeed's config decides).

    Remote folders are loaded by `artifacts.models.load_denoiser`, which copies them down first.
    """
    source, kwargs = _source_and_kwargs(cfg)
    zero = current_zero3_build()
    if zero is not None:
        model, report = build_partitioned(kwargs, source or SafetensorsSource({}), zero.config)
        zero.built.append(str(cfg.pretrained_path or cfg.preset))
    elif cfg.pretrained_path is None:
        model, report = AnimationDenoiser(**kwargs), None
        if source is not None:  # the prompt embedding
            fill_model(model, plan_fills(parameter_shapes(model), source, model.config.in_channels)[0], source)
        _cast(model, dtype)
    else:
        model, report = build_on_meta(kwargs, source, dtype)
    if report is not None and cfg.pretrained_path is not None:
        _log_report(cfg.pretrained_path, report)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _source_and_kwargs(cfg: ModelConfig) -> tuple[SafetensorsSource | None, dict[str, Any]]:
    """The tensors to load (folder and/or prompt embedding; None = none) and the `AnimationDenoiser` kwargs."""
    if cfg.pretrained_path is None:
        source, kwargs = None, preset_kwargs(cfg)
    else:
        folder = _model_folder(cfg.pretrained_path)
        kwargs = _kwargs_for_folder(cfg, json.loads((folder / "config.json").read_text()))
        source = SafetensorsSource.folder(folder)
    own = None if source is None else source.shape("context_tokens")
    if own is not None:  # the folder's own (trained) prompt, at its length: a stale config must not break it
        if own[0] != kwargs.get("num_context_tokens"):
            logger.info("%s: %d prompt tokens in the weights, %s in its config: using %d", cfg.pretrained_path,
                        own[0], kwargs.get("num_context_tokens"), own[0])
        if cfg.prompt_embedding is not None:
            logger.info("%s has its own prompt tokens: prompt_embedding %s not used", cfg.pretrained_path,
                        cfg.prompt_embedding)
        return source, {**kwargs, "num_context_tokens": own[0]}
    if cfg.prompt_embedding is None:
        return source, kwargs
    prompt = SafetensorsSource.single_tensor(require_local(cfg.prompt_embedding, "prompt_embedding"), "context_tokens")
    shape = prompt.shape("context_tokens")
    if len(shape) != 2 or shape[1] != kwargs["text_dim"]:
        raise ValueError(f"prompt_embedding {cfg.prompt_embedding} must be (L, text_dim={kwargs['text_dim']}), got {shape}")
    return (prompt if source is None else source.merged(prompt)), {**kwargs, "num_context_tokens": shape[0]}


def _cast(model: AnimationDenoiser, dtype: torch.dtype) -> None:
    """Parameters in ``dtype`` except what the class keeps in fp32 (`model.loading.load_dtype`)."""
    for name, param in model.named_parameters():
        param.data = param.data.to(load_dtype(model, name, dtype))


def _log_report(path: str, report: LoadReport) -> None:
    logger.info("loaded %s: %d tensors loaded, %d sliced %s, %d derived %s, %d initialised %s, %d unused %s", path,
                len(report.loaded), len(report.sliced), report.sliced, len(report.derived), report.derived,
                len(report.initialised), report.initialised[:20], len(report.unused), report.unused[:20])


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters())
