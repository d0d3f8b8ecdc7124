"""Model exports: written by the training jobs (teacher, TPO, student), loaded by everything after them.

Every export folder holds diffusers-format weights and its `artifacts.card.ModelCard`:
* teacher / full student: ``save_pretrained`` folder + ``model_card.json``;
* LoRA student: ``adapter/`` (peft LoRA over ``card.base_model``) + ``model_card.json``;
* TPO: ``motion/`` and ``fidelity/`` (peft LoRA over the teacher, ``card.base_model``), optionally
  ``fused_<name>/`` full folders, + ``model_card.json``.

`load_export(path, storage)` rebuilds the model from the folder and its card alone and hands back
the card's `SamplerSpec` and, for TPO, the adapter switch its sampler needs.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import save_torch_state_dict

from artifacts.card import ModelCard, read_card, write_card
from artifacts.models import load_denoiser, local_folder
from core.storage import Storage
from model.denoiser import use_adapter
from model.sampling import SamplerSpec

__all__ = ["TPO_ADAPTERS", "STUDENT_ADAPTER", "LoadedExport", "ExportedRun", "export_denoiser", "export_adapters", "export_student", "write_lora_adapter",
           "load_tpo_adapters", "load_export", "read_export_card"]

log = logging.getLogger(__name__)

TPO_ADAPTERS: tuple[str, ...] = ("motion", "fidelity")  # AlignHuman's two experts, motion early, fidelity late
STUDENT_ADAPTER = "student"
_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_SHARD_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' names, single file or -0000k-of-0000n + index
EXPORT_SHARD_SIZE = "5GB"


def _fresh_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU fp32 deep copy of ``model`` (peft layers included) with ``weights`` loaded by name (fused exports only)."""
    fresh = copy.deepcopy(model).cpu().float()
    missing = set(weights) - set(dict(fresh.named_parameters()))
    if missing:
        raise RuntimeError(f"export weights not in the model: {sorted(missing)[:5]}")
    fresh.load_state_dict(weights, strict=False)
    return fresh


def export_denoiser(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path, card: ModelCard,
                    dtype: torch.dtype | None = None, max_shard_size: str = EXPORT_SHARD_SIZE) -> None:
    """``weights`` (every trainable tensor) plus ``model``'s frozen ones, as a diffusers folder of safetensors
    shards in ``dtype`` (None: as given), with the model's config.json and the card.

    Written straight from the tensors (huggingface_hub's sharded writer, diffusers' file names) instead of
    ``save_pretrained`` on a fresh copy: at 14B a second model in fp32 on the exporting rank is ~56 GB."""
    state = _full_state(model, weights)
    if dtype is not None:
        state = {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_config(str(out_dir))
    save_torch_state_dict(state, str(out_dir), filename_pattern=_SHARD_PATTERN, max_shard_size=max_shard_size)
    write_card(out_dir, card)


def _full_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with ``weights`` in place of its trainable tensors (loud when they do not match)."""
    own = model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    unexpected, missing = set(weights) - set(own), trainable - set(weights)
    if unexpected or missing:
        raise RuntimeError(f"export weights do not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    frozen = {n: t for n, t in own.items() if n not in weights}
    empty = [n for n, t in frozen.items() if t.numel() == 0]  # a ZeRO-3 partition: not this rank's to write
    if empty:
        raise RuntimeError(f"frozen tensors are partitioned on this rank (ZeRO-3): {empty[:5]}")
    return {**{n: t.detach().cpu() for n, t in frozen.items()}, **weights}


def write_lora_adapter(weights: dict[str, torch.Tensor], model: torch.nn.Module, adapter: str, folder: Path,
                       dtype: torch.dtype | None = None) -> None:
    """Adapter ``adapter``'s tensors of ``weights`` (peft names) as the file diffusers' ``save_lora_adapter``
    writes (names without the adapter, its LoraConfig in the metadata), so ``load_lora_adapter`` reads it.

    Deliberately not ``save_lora_adapter`` itself: it reads the live (possibly ZeRO-3 partitioned) module
    and upcasts the whole model in place; ``weights`` are already the gathered (EMA) tensors."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors.torch import save_file

    marker = f".{adapter}."
    state = {n.replace(marker, "."): (t.to(dtype) if dtype is not None else t).contiguous()
             for n, t in weights.items() if "lora_" in n and marker in n}
    if not state:
        raise RuntimeError(f"no weights of adapter {adapter!r} to export")
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config[adapter].to_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / _LORA_WEIGHTS),
              metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})


def export_adapters(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path, card: ModelCard,
                    fused: bool, dtype: torch.dtype | None = None) -> None:
    """Each of ``card.adapters`` to ``out_dir/<name>`` (diffusers LoRA), optionally also fused into the base; + card."""
    for name in card.adapters:
        write_lora_adapter(weights, model, name, out_dir / name, dtype)
    write_card(out_dir, card)
    if not fused:
        return
    fresh = _fresh_copy(model, weights)  # fusing needs whole models: opt-in
    for name in card.adapters:
        expert = copy.deepcopy(fresh)
        use_adapter(expert, name)
        expert.fuse_lora(adapter_names=[name])
        expert.unload_lora()
        expert.save_pretrained(str(out_dir / f"fused_{name}"), safe_serialization=True)


def export_student(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path, card: ModelCard,
                   dtype: torch.dtype | None = None) -> None:
    """Full: a diffusers folder; LoRA: the peft adapter under ``adapter/`` (base: ``card.base_model``); + card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if card.format == "full":
        export_denoiser(model, weights, out_dir, card, dtype)
        return
    write_lora_adapter(weights, model, STUDENT_ADAPTER, out_dir / "adapter", dtype)
    write_card(out_dir, card)


def load_tpo_adapters(model: torch.nn.Module, folder: str | Path, adapters: tuple[str, ...] = TPO_ADAPTERS) -> None:
    """Load the TPO export's adapters (local ``folder``) into the teacher ``model``."""
    for name in adapters:
        model.load_lora_adapter(str(Path(folder) / name), adapter_name=name, prefix=None, weight_name=_LORA_WEIGHTS)


@dataclass(frozen=True)
class ExportedRun:
    """What a training job returns: its export folder and card, the final metrics and the last checkpoint."""

    export: str
    card: ModelCard
    metrics: dict
    checkpoint: str | None

    @classmethod
    def of(cls, result: object, run_uri: str, storage: Storage) -> "ExportedRun":
        """From Ray Train's ``Result`` of the run at ``run_uri`` (whose export is ``{run_uri}/export``)."""
        export = storage.join(run_uri, "export")
        checkpoint = getattr(result, "checkpoint", None)
        return cls(export=export, card=read_export_card(export, storage), metrics=dict(getattr(result, "metrics", {})),
                   checkpoint=None if checkpoint is None else str(checkpoint.path))


@dataclass
class LoadedExport:
    """An export rebuilt from its folder and card: the model (eval mode), the card, the sampler it was trained for."""

    model: torch.nn.Module
    card: ModelCard
    path: str

    @property
    def sampler(self) -> SamplerSpec:
        return self.card.sampler

    @property
    def adapter_switch(self) -> Callable[[str | None], None] | None:
        """The TPO sampler's LoRA switch (None for single-expert models)."""
        if self.card.kind != "tpo":
            return None
        return lambda name: use_adapter(self.model, name)


def read_export_card(path: str, storage: Storage) -> ModelCard:
    """The card of an export folder, local or remote (inferred for folders from before cards)."""
    with local_folder(path, storage) as folder:
        return read_card(folder)


def load_export(path: str, storage: Storage, device: str | torch.device = "cpu",
                base_model: str | None = None) -> LoadedExport:
    """Model + card of a teacher, TPO or student export folder (local or ``s3://``), in eval mode.

    ``base_model`` overrides the card's (a TPO folder from before cards does not name its teacher).
    """
    with local_folder(path, storage) as folder:
        card = read_card(folder)
        if base_model is not None:
            card = card.model_copy(update={"base_model": base_model})
        if card.kind == "tpo" or card.format == "lora":
            if card.base_model is None:
                raise ValueError(f"{path}: a {card.kind} LoRA export whose card names no base_model")
            model = load_denoiser(card.model_config_for(str(folder)), storage)
            if card.kind == "tpo":
                load_tpo_adapters(model, folder, tuple(card.adapters))
            else:
                model.load_lora_adapter(str(folder / "adapter"), adapter_name=STUDENT_ADAPTER, prefix=None,
                                        weight_name=_LORA_WEIGHTS)
                use_adapter(model, STUDENT_ADAPTER)
        else:
            model = load_denoiser(card.model_config_for(str(folder)), storage)
    return LoadedExport(model=model.to(device).eval(), card=card, path=path)
