"""One `precision` setting for every job and the server: what it means and how a model is cast to it.

``auto`` is bf16 on a GPU and fp32 on CPU (CPU bf16 matmuls are slow and lossy, but bf16 stays
selectable on CPU so the bf16 code paths are tested there). Training passes the resolved name to
DeepSpeed (`ray_jobs.training.engine`); inference code casts its model with `cast_model`, which keeps
the modules a diffusers class lists in ``_keep_in_fp32_modules`` (Wan: rope, time embedder,
scale-shift tables, norms) in fp32 as diffusers' own ``from_pretrained(torch_dtype=...)`` does. The
denoiser casts its inputs to its own dtype in one place (`AnimationDenoiser.forward`), so callers keep
their fp32 latents and conditions.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

__all__ = ["Precision", "resolve_precision", "precision_dtype", "cast_model"]

log = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_precision(precision: Precision, use_gpu: bool) -> Literal["fp32", "bf16"]:
    """'auto' -> bf16 on GPU, fp32 on CPU; an explicit choice is kept (bf16 on CPU logs a warning)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of auto, fp32, bf16; got {precision!r}")
    if precision == "bf16" and not use_gpu:
        log.warning("bf16 requested on CPU: it works but is slow; fp32 is the CPU default")
    return precision


def precision_dtype(precision: Precision, device: str | torch.device) -> torch.dtype:
    """The torch dtype ``precision`` resolves to on ``device``."""
    return _DTYPES[resolve_precision(precision, torch.device(device).type == "cuda")]


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` in ``dtype``, except the submodules its class keeps in fp32 (``_keep_in_fp32_modules``)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype != torch.float32 else set()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:  # per tensor (not model.to, which diffusers warns about for such models);
        if tensor.is_floating_point():  # by name part: Wan's scale_shift_table is a parameter, not a module
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    return model
