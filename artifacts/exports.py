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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from artifacts.card import ModelCard, read_card, write_card
from artifacts.models import load_denoiser, local_folder
from core.storage import Storage
from model.denoiser import use_adapter
from model.sampling import SamplerSpec

__all__ = ["TPO_ADAPTERS", "STUDENT_ADAPTER", "LoadedExport", "ExportedRun", "export_denoiser", "export_adapters", "export_student",
           "load_tpo_adapters", "load_export", "read_export_card"]

log = logging.getLogger(__name__)

TPO_ADAPTERS: tuple[str, ...] = ("motion", "fidelity")  # AlignHuman's two experts, motion early, fidelity late
STUDENT_ADAPTER = "student"
_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _fresh_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU fp32 deep copy of ``model`` (peft layers included) with ``weights`` loaded by name."""
    fresh = copy.deepcopy(model).cpu().float()
    missing = set(weights) - set(dict(fresh.named_parameters()))
    if missing:
        raise RuntimeError(f"export weights not in the model: {sorted(missing)[:5]}")
    fresh.load_state_dict(weights, strict=False)
    return fresh


def export_denoiser(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path, card: ModelCard) -> None:
    """A fresh CPU copy of ``model``'s class and config with ``weights`` loaded, saved diffusers-style, + its card."""
    fresh = type(model).from_config(model.config)
    missing, unexpected = fresh.load_state_dict(weights, strict=False)
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    if unexpected or (trainable & set(missing)):
        raise RuntimeError(f"export weights do not match the model: missing {sorted(set(missing) & trainable)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    fresh.save_pretrained(str(out_dir), safe_serialization=True)
    write_card(out_dir, card)


def export_adapters(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path, card: ModelCard,
                    fused: bool) -> None:
    """Each of ``card.adapters`` to ``out_dir/<name>`` (diffusers LoRA), optionally also fused into the base; + card."""
    fresh = _fresh_copy(model, weights)
    for name in card.adapters:
        fresh.save_lora_adapter(str(out_dir / name), adapter_name=name)
    write_card(out_dir, card)
    if not fused:
        return
    for name in card.adapters:
        expert = copy.deepcopy(fresh)
        use_adapter(expert, name)
        expert.fuse_lora(adapter_names=[name])
        expert.unload_lora()
        expert.save_pretrained(str(out_dir / f"fused_{name}"), safe_serialization=True)


def export_student(model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path, card: ModelCard) -> None:
    """Full: a diffusers folder; LoRA: the peft adapter under ``adapter/`` (base: ``card.base_model``); + card."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if card.format == "full":
        export_denoiser(model, weights, out_dir, card)
        return
    fresh = _fresh_copy(model, {n: w for n, w in weights.items() if "lora_" in n})
    fresh.save_lora_adapter(str(out_dir / "adapter"), adapter_name=STUDENT_ADAPTER)
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
