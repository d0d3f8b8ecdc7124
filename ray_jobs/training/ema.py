"""Exponential moving average of the trainable weights, kept correctly under every ZeRO stage.

How the EMA is kept under ZeRO:
- stages 0-2 keep full parameters on every rank, so every rank holds an fp32 EMA copy of the
  trainable parameters (identical across ranks): rank 0 alone saves it (``ema.pt``) and every rank
  loads that one file on resume;
- stage 3 partitions parameters, so each rank keeps the EMA of its own partition only
  (`param.ds_tensor`): EMA memory stays sharded like the weights, and each rank saves and loads its
  own ``ema_rank{r}.pt``. Export swaps the EMA shards into the partitions, gathers a group of
  parameters at a time (`gathered_on_rank0`, a collective: every rank calls `full_state_dict`) onto
  rank 0's CPU and swaps the live shards back.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

__all__ = ["EMA", "warmup_decay", "gathered_on_rank0"]

GATHER_GROUP_NUMEL = 2**27  # parameters gathered together under ZeRO-3 (bounds the transient full tensors)


@torch.no_grad()
def gathered_on_rank0(named: list[tuple[str, torch.nn.Parameter]], dtype: torch.dtype, rank: int,
                      group_numel: int = GATHER_GROUP_NUMEL) -> dict[str, torch.Tensor]:
    """Full tensors of ZeRO-3 partitioned parameters on rank 0 (CPU, ``dtype``), {} elsewhere.

    A collective: every rank calls it with the same list. Parameters are gathered a group of about
    ``group_numel`` elements at a time, so no rank ever holds the whole model unpartitioned (rank 0 keeps
    the CPU copies it exports)."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    group: list[tuple[str, torch.nn.Parameter]] = []
    for index, (name, param) in enumerate(named):
        group.append((name, param))
        if sum(p.ds_numel for _, p in group) < group_numel and index + 1 < len(named):
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            if rank == 0:
                out.update({n: p.data.detach().to("cpu", dtype, copy=True) for n, p in group})
        group = []
    return out


def warmup_decay(decay: float, step: int) -> float:
    """The decay used at optimizer step ``step`` (1-based): min(decay, (1 + step) / (10 + step)).

    diffusers' `EMAModel` schedule without `use_ema_warmup`: early on the average follows the weights
    closely instead of holding on to the random init (a fixed 0.99 over a 260-step run kept ~7% of
    the init and cost 1.5 dB held-out against the raw weights).
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """EMA ``θ_ema ← d θ_ema + (1 - d) θ`` over the trainable parameters of ``module``.

    With ``warmup`` the decay ramps up as `warmup_decay`; without it every update uses ``decay``.
    """

    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.zero3 = zero_stage == 3
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.named}

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if self.zero3 else param.data

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """One EMA step after optimizer step ``step`` (1-based; needed for the warm-up schedule)."""
        if self.warmup and step is None:
            raise ValueError("EMA with warmup needs the optimizer step")
        decay = warmup_decay(self.decay, step) if self.warmup else self.decay
        for name, param in self.named:
            self.shadow[name].lerp_(self._local(param).float(), 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "zero3": self.zero3, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        if state["zero3"] != self.zero3 or state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA checkpoint does not match this model/ZeRO stage")
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)

    def file_name(self, rank: int) -> str:
        """Under ZeRO-3 each rank's shard (``ema_rank{r}.pt``); otherwise one file (``ema.pt``, identical on every rank)."""
        return f"ema_rank{rank}.pt" if self.zero3 else "ema.pt"

    def save(self, folder: str | Path, rank: int) -> None:
        """Rank ``rank``'s part into a checkpoint folder: its shard under ZeRO-3, else rank 0 writes the one copy."""
        if self.zero3 or rank == 0:
            torch.save(self.state_dict(), Path(folder) / self.file_name(rank))

    def load(self, folder: str | Path, rank: int) -> None:
        path = Path(folder) / self.file_name(rank)
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @torch.no_grad()
    def full_state_dict(self, dtype: torch.dtype = torch.float32, rank: int = 0) -> dict[str, torch.Tensor]:
        """Full EMA tensors by parameter name in ``dtype``; under ZeRO-3 a collective (call on every rank) that
        gathers a group of parameters at a time and leaves them on ``rank`` 0 only (others get {})."""
        if not self.zero3:
            return {n: t.to(dtype, copy=True) for n, t in self.shadow.items()}
        params = [p for _, p in self.named]
        live = [p.ds_tensor.data.clone() for p in params]
        for (name, param) in self.named:
            param.ds_tensor.data.copy_(self.shadow[name].to(param.ds_tensor.dtype))
        try:
            return gathered_on_rank0(self.named, dtype, rank)
        finally:
            for param, saved in zip(params, live):
                param.ds_tensor.data.copy_(saved)

    @contextlib.contextmanager
    def swapped_into(self, module: torch.nn.Module):
        """Temporarily load the EMA weights into ``module`` (a full, unpartitioned copy)."""
        state = self.full_state_dict()
        backup = {n: p.detach().clone() for n, p in module.named_parameters() if n in state}
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in state:
                    p.copy_(state[n].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])
