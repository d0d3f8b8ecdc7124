"""Loading the denoiser without a full copy per rank: safetensors read one tensor at a time.

Why: a 14B denoiser is ~57 GB in fp32. Building it on CPU and then reading the whole checkpoint into a
dict (the old way) held model + source (2x) in every Ray Train rank. Here:

* `SafetensorsSource` knows the names and shapes of a diffusers folder's tensors from the file headers
  (single file, or sharded with ``diffusion_pytorch_model.safetensors.index.json``) and reads one
  tensor, or one channel range of it, at a time with `safetensors.safe_open` (opened per read and copied
  once out of the mapping, so mapped file pages neither pile up in the process nor back its parameters).
* `plan_fills` decides, per model tensor, where its value comes from (`Fill`): loaded, sliced (the
  wider ``patch_embedding`` of Wan I2V / Wan-Animate: its first ``in_channels`` channels, the noisy
  latent), derived (``ref_embedding`` from the same checkpoint's image-latent channels, see
  `_derive_ref_embedding`), or initialised as ``__init__`` would. A shape mismatch is an error.
* Three ways to carry the plan out, all with the same `LoadReport`:
  `fill_model` (a real model, e.g. `load_transformer_weights`), `build_on_meta` (parameters built on
  the meta device with accelerate's ``init_empty_weights``, each materialised from its tensor: peak
  ~ one model + one tensor) and `build_partitioned` / `fill_partitioned` (built under
  ``deepspeed.zero.Init`` inside `zero3_build`: rank 0 reads each tensor and writes it into the
  gathered parameter, `deepspeed.zero.GatheredParameters` re-partitions it; a rank holds 1/world of the
  model + the largest tensor gathered (+ its file pages on rank 0): 0.60x the model per worker on two
  workers in tests/test_loading.py).

Tensors a checkpoint lacks get the value ``AnimationDenoiser.__init__`` gives them: their module's
``reset_parameters`` (torch's / diffusers' defaults) and then the model's own rules
(`AnimationDenoiser.init_rule`: zero-init paths, learned nulls, prompt tokens), which also repair what
``zero.Init`` loses (in-place inits of submodules already partitioned).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
import torch.nn as nn

from model.denoiser import AnimationDenoiser, LoadReport

__all__ = ["SafetensorsSource", "Fill", "plan_fills", "fill_model", "build_on_meta", "fill_partitioned",
           "build_partitioned", "zero3_build", "current_zero3_build", "ZeroBuild", "load_dtype", "parameter_shapes",
           "WAN_MASK_CHANNELS"]

INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
# Wan I2V / Wan-Animate patch_embedding input: [noisy latent C | mask 4 | image latent C] (diffusers'
# WanImageToVideoPipeline and WanAnimatePipeline concatenate latents, then mask + image latents).
WAN_MASK_CHANNELS = 4


class SafetensorsSource:
    """Tensor names and shapes of safetensors files (from their headers), and one-tensor reads."""

    def __init__(self, files: dict[str, tuple[Path, str]]):
        """``files``: model tensor name -> (file, key in that file)."""
        from safetensors import safe_open

        self._files = dict(files)
        self._shapes: dict[str, tuple[int, ...]] = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, (path, key) in self._files.items():
            by_file.setdefault(path, []).append((name, key))
        for path, entries in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name, key in entries:
                    self._shapes[name] = tuple(handle.get_slice(key).get_shape())

    @classmethod
    def folder(cls, folder: str | Path) -> "SafetensorsSource":
        """A diffusers model folder: single ``diffusion_pytorch_model.safetensors`` or sharded with an index."""
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            if not (folder / SINGLE_FILE).is_file():
                raise FileNotFoundError(f"{folder / SINGLE_FILE} missing (expected a diffusers safetensors folder)")
            with safe_open(str(folder / SINGLE_FILE), framework="pt") as handle:
                weight_map = {key: SINGLE_FILE for key in handle.keys()}
        missing = sorted({shard for shard in weight_map.values() if not (folder / shard).is_file()})
        if missing:
            raise FileNotFoundError(f"{folder}: shards {missing} named in {INDEX_FILE} are missing")
        return cls({name: (folder / shard, name) for name, shard in weight_map.items()})

    @classmethod
    def single_tensor(cls, path: str | Path, name: str) -> "SafetensorsSource":
        """A safetensors file holding exactly one tensor, read as model tensor ``name`` (e.g. a prompt embedding)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
        if len(keys) != 1:
            raise ValueError(f"{path} must hold exactly one tensor to be used as {name!r}; it holds {keys}")
        return cls({name: (Path(path), keys[0])})

    def merged(self, other: "SafetensorsSource") -> "SafetensorsSource":
        """This source with ``other``'s tensors added (``other`` wins on a shared name)."""
        merged = SafetensorsSource.__new__(SafetensorsSource)
        merged._files = {**self._files, **other._files}
        merged._shapes = {**self._shapes, **other._shapes}
        return merged

    def names(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...] | None:
        return self._shapes.get(name)

    def read(self, name: str, channels: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (only input channels ``[a, b)`` of dim 1 when given), possibly a view of the
        mmapped file: callers copy it into memory of their own (`Fill.copy_into`, `Fill.owned`) and drop it.

        Why never keep the view: parameters that stayed views would keep the file mapped for the life of
        the process, e.g. the temporary copy `artifacts.models.load_denoiser` deletes right after the load
        would hold its disk space (a 14B checkpoint: ~57 GB) until the worker exits."""
        from safetensors import safe_open

        path, key = self._files[name]
        with safe_open(str(path), framework="pt") as handle:
            if channels is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[:, channels[0]:channels[1]]


@dataclass(frozen=True)
class Fill:
    """Where one model tensor's value comes from: a source tensor (or its input channels [a, b)), or init."""

    kind: Literal["load", "slice", "derive", "init"]
    key: str | None = None
    channels: tuple[int, int] | None = None

    def _view(self, source: SafetensorsSource) -> torch.Tensor:
        if self.kind == "init":
            raise ValueError("an 'init' fill has no source tensor")
        return source.read(self.key, self.channels)

    def copy_into(self, target: torch.Tensor, source: SafetensorsSource) -> None:
        """Write the source value into ``target`` (cast to its dtype): one copy, straight from the file."""
        target.copy_(self._view(source))

    def owned(self, source: SafetensorsSource, dtype: torch.dtype) -> torch.Tensor:
        """The source value as a new tensor of ``dtype`` in memory of its own (one copy)."""
        return self._view(source).to(dtype, copy=True)


def plan_fills(shapes: dict[str, tuple[int, ...]], source: SafetensorsSource,
               in_channels: int) -> tuple[dict[str, Fill], LoadReport]:
    """Per model tensor (name -> shape) its `Fill`, and the `LoadReport`; a shape mismatch raises."""
    report = LoadReport([], [], [], sorted(set(source.names()) - set(shapes)))
    fills: dict[str, Fill] = {}
    for name, shape in shapes.items():
        found = source.shape(name)
        if found is None:
            fills[name] = Fill("init")
            report.initialised.append(name)
        elif found == tuple(shape):
            fills[name] = Fill("load", name)
            report.loaded.append(name)
        elif _is_wider_patch_embedding(name, found, tuple(shape)):
            fills[name] = Fill("slice", name, (0, shape[1]))  # the noisy-latent channels come first
            report.sliced.append(name)
        else:
            raise ValueError(f"{name}: checkpoint shape {found} != model shape {tuple(shape)}")
    _derive_ref_embedding(fills, report, shapes, source, in_channels)
    return fills, report


def _is_wider_patch_embedding(name: str, found: tuple[int, ...], target: tuple[int, ...]) -> bool:
    return (name == "patch_embedding.weight" and len(found) == len(target) == 5 and found[0] == target[0]
            and found[1] > target[1] and found[2:] == target[2:])


def _derive_ref_embedding(fills: dict[str, Fill], report: LoadReport, shapes: dict[str, tuple[int, ...]],
                          source: SafetensorsSource, in_channels: int) -> None:
    """``ref_embedding.weight`` from the image-latent channels of a Wan I2V / Animate patch embedding.

    Why: those checkpoints were trained to read the reference image's latent through exactly these
    weights (``conv([x; mask; image])``), and our ``ref_embedding`` is the additive form of that
    concat, so they are a better start than zero. Only when the checkpoint has no ``ref_embedding`` of
    its own, and its patch embedding is [C noisy | 4 mask | C image] wide; the bias stays zero (the
    patch embedding's bias already counts once), the mask channels are dropped."""
    name, wide = "ref_embedding.weight", source.shape("patch_embedding.weight")
    if name not in shapes or fills[name].kind != "init" or wide is None:
        return
    target = tuple(shapes[name])
    if wide[1] != 2 * in_channels + WAN_MASK_CHANNELS or (wide[0], *wide[2:]) != (target[0], *target[2:]):
        return
    channels = (wide[1] - in_channels, wide[1])
    fills[name] = Fill("derive", "patch_embedding.weight", channels)
    report.initialised.remove(name)
    report.derived[name] = f"patch_embedding.weight[:, {channels[0]}:{channels[1]}] (image-latent channels)"


def load_dtype(model: nn.Module, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor ``name`` gets in a model loaded in ``dtype``: fp32 for what the class keeps in fp32
    (``_keep_in_fp32_modules``, matched by name part as `model.precision.cast_model` does), else ``dtype``."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype != torch.float32 else set()
    return torch.float32 if keep & set(name.split(".")) else dtype


def _initialise(model: AnimationDenoiser, module: nn.Module, fresh: dict[str, str]) -> None:
    """Give ``module``'s own parameters named in ``fresh`` (leaf -> full name) their ``__init__`` values."""
    ruled = {leaf: name for leaf, name in fresh.items() if model.init_rule(name) is not None}
    defaults = sorted(set(fresh) - set(ruled))
    if defaults:
        reset = getattr(module, "reset_parameters", None)
        if reset is None:
            raise ValueError(f"{[fresh[leaf] for leaf in defaults]} are not in the checkpoint and neither "
                             f"{type(module).__name__}.reset_parameters nor an AnimationDenoiser init rule sets them")
        reset()
    with torch.no_grad():
        for leaf, name in ruled.items():
            model.init_rule(name)(getattr(module, leaf))


def fill_model(model: AnimationDenoiser, fills: dict[str, Fill], source: SafetensorsSource) -> None:
    """A real (materialised) model: copy each loaded / sliced / derived tensor in; initialised ones keep
    the values ``__init__`` gave them. One source tensor in memory at a time."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if fills[name].kind != "init":
                fills[name].copy_into(param, source)


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Full shapes by name of a real, meta or ZeRO-3-partitioned model (``ds_shape``); loud if the model has
    persistent buffers, which these loaders (parameters only) would skip."""
    params = dict(model.named_parameters())
    buffers = [k for k in model.state_dict(keep_vars=True) if k not in params]
    if buffers:
        raise ValueError(f"persistent buffers {buffers[:5]} are not handled by model.loading")
    return {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}


def build_on_meta(kwargs: dict[str, Any], source: SafetensorsSource,
                  dtype: torch.dtype = torch.float32) -> tuple[AnimationDenoiser, LoadReport]:
    """`AnimationDenoiser(**kwargs)` with parameters on the meta device, then each module's own parameters
    materialised in ``dtype`` (`load_dtype`) from the source or initialised: peak ~ the model + one tensor.
    Buffers (RoPE tables) are built for real (accelerate's ``init_empty_weights(include_buffers=False)``)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AnimationDenoiser(**kwargs)
    fills, report = plan_fills(parameter_shapes(model), source, model.config.in_channels)
    for prefix, module in model.named_modules():
        own = {leaf: f"{prefix}.{leaf}" if prefix else leaf for leaf, _ in module.named_parameters(recurse=False)}
        if own:
            _materialise_module(model, module, own, fills, source, dtype)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device after loading: {left[:10]}")
    return model, report


def _materialise_module(model: AnimationDenoiser, module: nn.Module, own: dict[str, str],
                        fills: dict[str, Fill], source: SafetensorsSource, dtype: torch.dtype) -> None:
    """One module's own parameters: fresh ones initialised in fp32 first (module-wide ``reset_parameters``),
    then every one replaced by its final tensor (read straight from disk for loaded ones: no extra copy)."""
    fresh = {leaf: name for leaf, name in own.items() if fills[name].kind == "init"}
    if fresh:
        for leaf in own:
            meta = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(torch.empty(meta.shape, dtype=torch.float32),
                                                    requires_grad=meta.requires_grad)
        _initialise(model, module, fresh)
    for leaf, name in own.items():
        current, target = module._parameters[leaf], load_dtype(model, name, dtype)
        value = current.data.to(target) if name in fresh.values() else fills[name].owned(source, target)
        module._parameters[leaf] = nn.Parameter(value, requires_grad=current.requires_grad)


def build_partitioned(kwargs: dict[str, Any], source: SafetensorsSource,
                      ds_config: dict[str, Any]) -> tuple[AnimationDenoiser, LoadReport]:
    """`AnimationDenoiser(**kwargs)` under ``deepspeed.zero.Init(config_dict_or_path=ds_config)`` (each module's
    parameters partitioned as soon as it is built), then filled partition by partition (`fill_partitioned`)."""
    import deepspeed

    if torch.distributed.is_initialized() and not deepspeed.comm.is_initialized():
        # Ray Train set up torch.distributed; zero.Init sizes its world through deepspeed.comm (as initialize does)
        deepspeed.init_distributed(dist_init_required=False)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AnimationDenoiser(**kwargs)
    fills, report = plan_fills(parameter_shapes(model), source, model.config.in_channels)
    fill_partitioned(model, fills, source)
    return model, report


def fill_partitioned(model: AnimationDenoiser, fills: dict[str, Fill], source: SafetensorsSource) -> None:
    """A model built under ``deepspeed.zero.Init``: per parameter, gather it, let rank 0 write its value
    (read from the source, or an ``__init__`` rule lost to partitioning) and re-partition (broadcast).
    Parameters with neither keep the module default drawn at construction (zero.Init broadcasts rank 0's)."""
    import deepspeed
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    for name, param in model.named_parameters():
        fill, rule = fills[name], model.init_rule(name)
        if fill.kind == "init" and rule is None:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if rank != 0:
                continue
            if fill.kind == "init":
                rule(param.data)
            else:
                fill.copy_into(param.data, source)


# ---------------------------------------------------------------------- ZeRO-3 builds
@dataclass
class ZeroBuild:
    """What `zero3_build` asks for (the DeepSpeed config) and what was built under it (for the caller's check)."""

    config: dict[str, Any]
    built: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Loud when nothing was built partitioned: every rank would then hold a full copy."""
        if not self.built:
            raise RuntimeError("ZeRO-3: no denoiser was built through model.presets.build_denoiser inside "
                               "zero3_build, so every rank would hold the full model")


_ZERO3: contextvars.ContextVar[ZeroBuild | None] = contextvars.ContextVar("zero3_build", default=None)


@contextlib.contextmanager
def zero3_build(ds_config: dict[str, Any]) -> Iterator[ZeroBuild]:
    """Inside, `model.presets.build_denoiser` constructs under ``deepspeed.zero.Init(config_dict_or_path=
    ds_config)`` and fills the partitions tensor by tensor (`fill_partitioned`). A context rather than an
    argument so a training job's ``build_model`` (any wrapper around build_denoiser) needs no change."""
    record = ZeroBuild(ds_config)
    token = _ZERO3.set(record)
    try:
        yield record
    finally:
        _ZERO3.reset(token)


def current_zero3_build() -> ZeroBuild | None:
    """The enclosing `zero3_build`'s record, or None."""
    return _ZERO3.get()
