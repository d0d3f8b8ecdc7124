"""The audio encoder from a local or ``s3://`` folder: what preprocessing and serving both construct.

`model.audio.AudioEncoder` reads local folders only (`model/` imports no storage); this wrapper takes
the job's or server's `Storage`, so a remote wav2vec2 folder comes from the node's model cache
(`artifacts.models.local_folder`: downloaded once per node, not once per worker). The log-mel
encoder needs no folder and passes straight through.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from core.storage import Storage, StorageConfig
from artifacts.models import local_folder
from model.audio import AudioEncoder, AudioFeatureConfig

__all__ = ["load_audio_encoder", "shared_audio_encoder"]


def load_audio_encoder(cfg: AudioFeatureConfig, storage: Storage, device: Any = "cpu") -> AudioEncoder:
    """`AudioEncoder(cfg)` with ``cfg.encoder_path`` local or remote (weights are in memory on return)."""
    if cfg.encoder == "logmel":
        return AudioEncoder(cfg, device=device)
    with local_folder(cfg.encoder_path, storage) as folder:
        return AudioEncoder(cfg, folder=folder, device=device)


def shared_audio_encoder(cfg: AudioFeatureConfig, storage: StorageConfig) -> AudioEncoder:
    """One CPU encoder per worker process and config: preprocessing batches reuse it instead of reloading."""
    return _cached_encoder(cfg.model_dump_json(), storage.model_dump_json())


@lru_cache(maxsize=2)
def _cached_encoder(cfg_json: str, storage_json: str) -> AudioEncoder:
    storage = Storage(StorageConfig.model_validate_json(storage_json))
    return load_audio_encoder(AudioFeatureConfig.model_validate_json(cfg_json), storage)
