"""The model card: what an exported model needs to be used, written beside its weights by the job that trained it.

Like a diffusers pipeline folder's ``scheduler_config.json``, ``model_card.json`` sits in every
export folder (teacher, TPO, student) and says:
* ``kind`` (teacher | tpo | student) and ``format`` (full weights | LoRA over ``base_model``);
* ``model``: the `ModelConfig` it was built with: preset, switches, overrides, the VAE it was trained
  in (``model.vae_path``; None = the checked-in tiny VAE) and the audio feature geometry;
* ``frames``: the frame geometry of its training clips (height, width, fps, clip frames);
* ``sampler``: the `model.sampling.SamplerSpec` it was trained for (kind, steps or edges, shift,
  guidance, the conditions CFG's unconditional branch drops, the TPO boundary);
* ``adapters``: the TPO LoRA experts (sub-folders of the export).

Loading an export (`artifacts.exports.load_export`) gives the model, its VAE and its sampler from
the card alone; serving, evaluation and the next job read it and never restate it. A folder
written before cards existed gets one inferred from what it holds (with a warning).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from core.config import StrictConfig
from model.audio import ENCODER_FIELDS, AudioFeatureConfig
from model.presets import ModelConfig
from model.sampling import SamplerSpec

__all__ = ["CARD_FILE", "FrameGeometry", "DataCard", "ModelCard", "write_card", "read_card", "check_data_matches_model"]

log = logging.getLogger(__name__)

CARD_FILE = "model_card.json"
LEGACY_STUDENT_FILE = "student.json"  # what student exports carried before cards
LEGACY_TPO_FILE = "tpo.json"


class FrameGeometry(StrictConfig):
    """Pixel geometry of the clips a model was trained on."""

    height: int = Field(64, ge=1)
    width: int = Field(64, ge=1)
    fps: float = Field(16.0, gt=0.0)
    clip_frames: int = Field(8, ge=1, description="frames per training clip")


class DataCard(StrictConfig):
    """What a shards folder was made with (from its manifest): the facts a model must agree with."""

    uri: str
    vae_path: str | None = Field(None, description="the VAE that encoded the latents (None = the tiny checked-in one)")
    audio: AudioFeatureConfig = Field(default_factory=AudioFeatureConfig)
    frames: FrameGeometry = Field(default_factory=FrameGeometry)
    store_pixels: bool = Field(True, description="train clips carry their pixel columns (frames, pose maps, "
                               "face crops, raw audio); False: only held-out clips do, and readers draw the pose "
                               "maps from keypoints (manifests from before the field: True)")
    pose_conf_threshold: float = Field(0.3, ge=0, le=1, description="preprocessing's pose.render_conf_threshold: "
                                       "the maps drawn from keypoints on a worker must be the ones it would store")

    @classmethod
    def from_manifest(cls, uri: str, manifest: dict[str, Any]) -> "DataCard":
        """The preprocessing manifest's config -> DataCard (defaults where an older manifest lacks a field)."""
        config = manifest.get("config", {})
        frames = {k: config[k] for k in ("height", "width", "fps", "clip_frames") if k in config}
        audio = config.get("audio", {}).get("features", {})
        threshold = config.get("pose", {}).get("render_conf_threshold", 0.3)
        return cls(uri=uri, vae_path=config.get("vae", {}).get("path"), audio=AudioFeatureConfig(**audio),
                   frames=FrameGeometry(**frames), store_pixels=bool(manifest.get("store_pixels", True)),
                   pose_conf_threshold=threshold)


class ModelCard(StrictConfig):
    """Module doc. ``model.pretrained_path`` is not used (the folder itself, or ``base_model`` for LoRA)."""

    card_version: Literal[1] = 1
    kind: Literal["teacher", "tpo", "student"]
    format: Literal["full", "lora"] = "full"
    base_model: str | None = Field(None, description="lora/tpo: the folder the adapters go on")
    model: ModelConfig = Field(default_factory=ModelConfig)
    frames: FrameGeometry = Field(default_factory=FrameGeometry)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    adapters: list[str] = Field(default_factory=list, description="tpo: LoRA adapter sub-folders")
    inferred: bool = Field(False, description="True when read from a folder written before cards existed")

    def model_config_for(self, folder: str) -> ModelConfig:
        """The `ModelConfig` that rebuilds this export from ``folder`` (its own weights, or the base for LoRA)."""
        weights = self.base_model if self.format == "lora" or self.kind == "tpo" else folder
        return self.model.model_copy(update={"pretrained_path": weights, "gradient_checkpointing": False})


def write_card(folder: str | Path, card: ModelCard) -> Path:
    """``folder/model_card.json`` (pretty JSON, the card's full dump)."""
    path = Path(folder) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2))
    return path


def read_card(folder: str | Path) -> ModelCard:
    """The card of a local export folder; folders from before cards get one inferred, with a warning."""
    folder = Path(folder)
    if (folder / CARD_FILE).is_file():
        return ModelCard.model_validate_json((folder / CARD_FILE).read_text())
    card = _infer_card(folder)
    log.warning("%s has no %s (written before model cards): inferred %s; re-export to record how it samples",
                folder, CARD_FILE, card.model_dump(mode="json", include={"kind", "format", "sampler"}))
    return card


def _infer_card(folder: Path) -> ModelCard:
    """A card for an old export: student.json (student), tpo.json (TPO adapters), else a teacher folder."""
    if (folder / LEGACY_STUDENT_FILE).is_file():
        meta = json.loads((folder / LEGACY_STUDENT_FILE).read_text())
        model = ModelConfig(preset=meta["preset"], aux_head=False, face_injection=meta["face_injection"])
        return ModelCard(kind="student", format=meta["format"], base_model=meta.get("base_model"), model=model,
                         sampler=SamplerSpec(kind="consistency", edges=list(meta["edges"])), inferred=True)
    if (folder / LEGACY_TPO_FILE).is_file():
        adapters = json.loads((folder / LEGACY_TPO_FILE).read_text())["adapters"]
        return ModelCard(kind="tpo", format="lora", adapters=list(adapters), sampler=SamplerSpec(kind="tpo"),
                         inferred=True)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model export (no {CARD_FILE}, no config.json)")
    saved = json.loads((folder / "config.json").read_text())
    model = ModelConfig(face_injection=bool(saved.get("face_injection", True)), aux_head=False,
                        motion_frames=int(saved.get("motion_frames", 0)))
    return ModelCard(kind="teacher", model=model, sampler=SamplerSpec(kind="euler_cfg", steps=50, guidance=1.5),
                     inferred=True)


def check_data_matches_model(data: DataCard, model: ModelConfig, who: str) -> None:
    """Fail at start when shards were made with another VAE, audio encoder or audio geometry than the model
    uses (names both): the model would train on features it will never be served, or vice versa."""
    problems = []
    if _vae_id(data.vae_path) != _vae_id(model.vae_path):
        problems.append(f"VAE: shards {data.uri} were encoded with {data.vae_path or 'the tiny checked-in VAE'}, "
                        f"the model uses {model.vae_path or 'the tiny checked-in VAE'}")
    if not _same_audio_encoder(data.audio, model.audio):
        problems.append(f"audio encoder: shards {data.uri} were made with {_encoder_name(data.audio)}, "
                        f"the model uses {_encoder_name(model.audio)}")
    geometry = {"exclude": set(ENCODER_FIELDS)}
    if data.audio.model_dump(**geometry) != model.audio.model_dump(**geometry):
        problems.append(f"audio features: shards {data.uri} were made with {data.audio.model_dump(**geometry)}, "
                        f"the model uses {model.audio.model_dump(**geometry)}")
    if problems:
        raise ValueError(f"{who}: data and model disagree; " + "; ".join(problems))


def _same_audio_encoder(a: AudioFeatureConfig, b: AudioFeatureConfig) -> bool:
    """Same kind; for wav2vec2 the same content hash when both pin one, else the same folder and pin."""
    if a.encoder != b.encoder:
        return False
    if a.encoder == "logmel":
        return True
    if a.encoder_sha256 and b.encoder_sha256:  # content decides: a local copy of the s3 folder is the same encoder
        return a.encoder_sha256 == b.encoder_sha256
    return (_vae_id(a.encoder_path), a.encoder_sha256) == (_vae_id(b.encoder_path), b.encoder_sha256)


def _encoder_name(cfg: AudioFeatureConfig) -> str:
    if cfg.encoder == "logmel":
        return "logmel"
    return f"wav2vec2 {cfg.encoder_path} (sha256 {cfg.encoder_sha256 or 'not pinned'})"


def _vae_id(path: str | None) -> str | None:
    """A VAE or audio encoder folder comparable across spellings: None (tiny), the URI, or the resolved local path."""
    if path is None:
        return None
    return path.rstrip("/") if "://" in path else str(Path(path).resolve())
