"""DeepSpeed engine set-up for a Ray Train worker: the JSON config from our typed section, and init.

We hand DeepSpeed a plain `torch.optim.AdamW` (and a LambdaLR warmup) instead of naming an optimizer in
the JSON: DeepSpeed's own Adam variants need compiled CUDA/CPU ops, which a CPU-only machine would
have to build first. ZeRO 1-3 accept a client optimizer with `zero_allow_untested_optimizer`.
"""

from __future__ import annotations

import copy
import math
import logging
from typing import Any, Iterable

import torch

from ray_jobs.training.config import DeepSpeedSection, OptimSection

__all__ = ["deepspeed_config", "resolve_precision", "initialize_engine", "deep_merge"]

log = logging.getLogger(__name__)


def resolve_precision(section: DeepSpeedSection, use_gpu: bool) -> str:
    """The section's precision as `model.precision.resolve_precision` reads it (auto = bf16 on GPU, fp32 on CPU)."""
    from model.precision import resolve_precision as resolve

    return resolve(section.precision, use_gpu)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in recursively (override wins)."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deepspeed_config(section: DeepSpeedSection, micro_batch: int, world_size: int, use_gpu: bool,
                     sequence_parallel: int = 1) -> dict[str, Any]:
    """Generate the DeepSpeed JSON from our config; `section.raw_override` is merged last.

    With ``sequence_parallel`` > 1 the ranks form a (data, sequence) mesh in DeepSpeed's Ulysses mode:
    consecutive ranks share a clip, the batch counts data-parallel ranks only, and gradients are
    reduced over both (see `model.sequence_parallel`)."""
    data_parallel = world_size // sequence_parallel
    precision = resolve_precision(section, use_gpu)
    zero: dict[str, Any] = {"stage": section.zero_stage}
    if section.zero_stage == 3:
        # Gather the full 16-bit weights on save so rank 0 can export a diffusers folder.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": section.gradient_accumulation_steps,
        "train_batch_size": micro_batch * section.gradient_accumulation_steps * data_parallel,
        "gradient_clipping": section.gradient_clipping,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if sequence_parallel > 1:
        config.update(sequence_parallel_size=sequence_parallel, data_parallel_size=data_parallel)
    return deep_merge(config, section.raw_override)


def lr_factor(optim: OptimSection, step: int, total_steps: int | None) -> float:
    """lr multiplier at scheduler step ``step`` (0-based): linear warmup, then constant or cosine."""
    warmup = max(optim.warmup_steps, 0)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if optim.schedule == "constant" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_adamw(params: Iterable[torch.nn.Parameter] | list[dict], optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over the trainable ``params`` (parameters, or param-group dicts as TrainTask.param_groups gives)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
    else:
        groups = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay)


def build_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], optim: OptimSection,
                    total_steps: int | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over ``params`` (parameters, or param-group dicts as TrainTask.param_groups may return) and
    a LambdaLR of `lr_factor` (the cosine schedule needs ``total_steps``)."""
    optimizer = build_adamw(params, optim)
    if optim.schedule == "cosine" and not total_steps:
        raise ValueError("optim.schedule='cosine' needs the job's total steps")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(optim, step, total_steps))
    return optimizer, scheduler


def initialize_engine(model: torch.nn.Module, param_groups: Iterable[torch.nn.Parameter] | list[dict],
                      optim: OptimSection, ds_config: dict[str, Any], total_steps: int | None = None):
    """``deepspeed.initialize`` with our optimizer; returns the engine (optimizer/scheduler inside)."""
    import deepspeed

    optimizer, scheduler = build_optimizer(param_groups, optim, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        dist_init_required=not torch.distributed.is_initialized(),
    )
    return engine
