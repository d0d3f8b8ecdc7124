"""Loading model folders from anywhere: remote (``s3://``) ones come from the node's model cache.

`model/` reads local folders only (`model.presets.build_denoiser`, `model.vae.load_vae`,
`model.perception.load_perception`); these wrappers take the job's or server's `Storage` (its
endpoint, credentials, region), so a configured ``storage.endpoint_url`` is never silently dropped.
A remote folder is downloaded once per node into `core.model_cache` (keyed by its objects' ETags,
shared by every rank and replica on the node, kept after the load for the next one; its size is
capped by ``storage.model_cache_max_entries`` / ``model_cache_max_gb``), not once per load.
"""

from __future__ import annotations

import contextlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from core.model_cache import cached_folder
from core.storage import MANIFEST_NAME, Storage, StorageError
from model.denoiser import AnimationDenoiser
from model.perception import PuppetPerception
from model.presets import ModelConfig, build_denoiser
from model.vae import VAEConfig, VideoVAE

__all__ = ["local_folder", "load_denoiser", "load_vae", "load_perception"]


@contextmanager
def local_folder(path: str, storage: Storage, require_manifest: bool = False) -> Iterator[Path]:
    """``path`` itself when local; the node-local cached copy of a remote folder otherwise (kept on exit).

    ``require_manifest=False`` by default: a folder uploaded with a plain ``aws s3 sync`` (no
    ``_MANIFEST.json``) is a valid model folder too. The cache entry stays locked (shared) while the
    caller is inside, so a prune by another process cannot delete the files being read.
    """
    if not storage.is_s3(path):
        yield Path(path)
        return
    if require_manifest and not storage.exists(storage.join(path, MANIFEST_NAME)):
        raise StorageError(f"{path}: no {MANIFEST_NAME} (incomplete or not written by upload_dir)")
    with cached_folder(storage, path) as local:
        yield local


def load_denoiser(cfg: ModelConfig, storage: Storage) -> AnimationDenoiser:
    """`build_denoiser(cfg)` with ``cfg.pretrained_path`` and ``cfg.prompt_embedding`` local or remote."""
    with contextlib.ExitStack() as stack:
        update: dict[str, str] = {}
        if cfg.prompt_embedding is not None and storage.is_s3(cfg.prompt_embedding):
            local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="prompt-"))) / "prompt.safetensors"
            update["prompt_embedding"] = str(storage.download_file(cfg.prompt_embedding, local))
        if cfg.pretrained_path is not None:
            update["pretrained_path"] = str(stack.enter_context(local_folder(cfg.pretrained_path, storage)))
        return build_denoiser(cfg.model_copy(update=update))


def load_vae(path: str | None, storage: Storage, device: str | torch.device | None = None,
             config: VAEConfig | None = None) -> VideoVAE:
    """`model.vae.load_vae` for a local or remote folder (None = the tiny checked-in VAE)."""
    from model.vae import load_vae as load_local

    if path is None:
        return load_local(None, device=device, config=config)
    with local_folder(path, storage) as folder:
        return load_local(str(folder), device=device, config=config)


def load_perception(path: str | None, storage: Storage, device: str | torch.device = "cpu") -> PuppetPerception:
    """`model.perception.load_perception` for a local or remote folder (None = the checked-in fit)."""
    from model.perception import load_perception as load_local

    if path is None:
        return load_local(None, device)
    with local_folder(path, storage) as folder:
        return load_local(str(folder), device)
