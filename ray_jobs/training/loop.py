"""The Ray Train worker loop shared by the teacher, TPO and distillation jobs.

A job plugs in a `TrainTask` (build the model, pick trainable parameters, compute one micro-step's
loss, export weights); this module owns everything around it, identically for every job:

1. DeepSpeed engine from our typed config (ZeRO 1-3, bf16 on GPU / fp32 on CPU, accumulation);
2. resume from `ray.train.get_checkpoint()` (DeepSpeed state, EMA, task state, step, metrics so far);
   of a remote checkpoint each rank downloads only the shared files and its own shards;
3. batches from `ray.train.get_dataset_shard("train").iter_torch_batches(...)`, epoch after epoch
   (replayed from memory after the first epoch when the worker's rows are small);
4. per-step metrics (loss, lr, grad norm, samples/s, task metrics) through `ray.train.report` and
   into `{run}/metrics.jsonl` (rank 0);
5. every `checkpoint.every_n_steps`: each rank's DeepSpeed files (frozen parameters left out: a LoRA
   job's base is rebuilt from its folder), EMA (one file, or one shard a rank under ZeRO-3) and task
   state into one Ray Train checkpoint, plus (rank 0) `train_state.json`; rank 0 publishes the export
   (EMA weights in `checkpoint.export_precision`, safetensors shards) to `{run}/export/`, where the
   next job finds it by run name, never into the checkpoint;
6. failure injection for tests (`run.fail_at_step`), once per run thanks to a marker object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from core.storage import Storage
from ray_jobs.training.config import TrainJobConfig
from ray_jobs.training.ema import EMA, gathered_on_rank0
from ray_jobs.training.engine import deepspeed_config, initialize_engine, resolve_precision

__all__ = ["TrainTask", "run_worker_loop", "run_dir", "InjectedFailure", "files_for_rank", "export_dtype"]

log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """Raised by `run.fail_at_step` to test fault tolerance."""


class TrainTask(Protocol):
    """What a training job plugs into the shared loop."""

    ema_decay: float | None

    def build_model(self) -> torch.nn.Module: ...

    def param_groups(self, model: torch.nn.Module) -> list[dict] | list[torch.nn.Parameter]: ...

    def on_engine_ready(self, engine: Any, device: torch.device, dtype: torch.dtype) -> None: ...

    def micro_step(self, engine: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...

    def export(self, model: torch.nn.Module, weights: dict[str, torch.Tensor], out_dir: Path) -> None:
        """Rank 0: write the next job's artifact (diffusers folder / peft adapters) from ``weights``
        (full trainable weights by parameter name: the EMA when kept)."""

    def validate(self, model: torch.nn.Module, step: int, out_dir: Path) -> dict[str, float]: ...


@runtime_checkable
class StatefulTask(Protocol):
    """Optional part of a `TrainTask`: state that must survive a resume (saved per rank as
    task_rank{r}.pt in the checkpoint), e.g. distillation's EMA target network."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Worker:
    """One Ray Train worker's view of the run: what every loop step needs, typed."""

    cfg: TrainJobConfig
    task: TrainTask
    engine: Any  # deepspeed.DeepSpeedEngine
    ema: EMA | None
    rank: int
    world: int
    storage: Storage

    @property
    def sequence_parallel(self) -> int:
        return self.cfg.scaling.sequence_parallel

    @property
    def data_rank(self) -> int:
        """This worker's data-parallel index: the ranks of one sequence-parallel group share it (and their batches)."""
        return self.rank // self.sequence_parallel


def run_dir(cfg: TrainJobConfig) -> str:
    return Storage(cfg.storage).join(cfg.run.storage_path, cfg.run.name)


def _batches(batch_size: int, columns: list[str] | None, cache_mb: float,
             generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless stream of worker-local batches, epoch after epoch.

    The first epoch streams from `ray.train.get_dataset_shard("train")`. If this worker's rows fit
    in `cache_mb`, later epochs replay them from memory, reshuffled per epoch: every new epoch of a
    streaming split costs seconds of Ray Data start-up (measured ~6 s on 2 cores), which dominated
    small runs whose epochs are a few steps. Larger shards stream every epoch.
    """
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    cached: list[dict[str, torch.Tensor]] | None = []
    cached_bytes = 0
    full_batches = 0
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        batch = {k: v for k, v in batch.items() if columns is None or k in columns}
        if cached is not None:
            cached_bytes += sum(v.numel() * v.element_size() for v in batch.values())
            cached = cached if cached_bytes <= cache_mb * 2**20 else None
        if cached is not None:
            cached.append({k: v.clone() for k, v in batch.items()})  # safe from in-place use downstream
        if len(next(iter(batch.values()))) == batch_size:
            full_batches += 1
            yield batch
    if full_batches == 0:
        raise RuntimeError(f"worker's dataset shard has fewer than batch_size={batch_size} rows")
    if cached is not None:
        yield from _replay(cached, batch_size, generator)
    while True:
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True):
            yield {k: v for k, v in batch.items() if columns is None or k in columns}


def _shared_in_group(batches: Iterator[dict[str, torch.Tensor]] | None, group: Any,
                     leader: int) -> Iterator[dict[str, torch.Tensor]]:
    """The group leader's batches on every rank of a sequence-parallel group. Only the leader reads
    (``batches``; None elsewhere): `GroupLeaderDataConfig` gives the data shards to leaders only."""
    import torch.distributed as dist

    while True:
        batch = next(batches) if batches is not None else None
        header = [None if batch is None else {k: (v.dtype, tuple(v.shape)) for k, v in batch.items()}]
        dist.broadcast_object_list(header, src=leader, group=group)
        if batch is None:
            batch = {k: torch.empty(shape, dtype=dtype) for k, (dtype, shape) in header[0].items()}
        for name in sorted(batch):
            tensor = batch[name].contiguous()
            wire = tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor  # gloo has no bool
            dist.broadcast(wire, src=leader, group=group)
            batch[name] = tensor
        yield batch


def _replay(cached: list[dict[str, torch.Tensor]], batch_size: int,
            generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Endless epochs over in-memory rows, a fresh permutation per epoch, full batches only."""
    rows = {k: torch.cat([b[k] for b in cached]) for k in cached[0]}
    num_rows = len(next(iter(rows.values())))
    while True:
        order = torch.randperm(num_rows, generator=generator)
        for start in range(0, num_rows - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield {k: v[index] for k, v in rows.items()}


# A checkpoint file belongs to one rank when its name carries that rank: DeepSpeed's ZeRO shards
# (``zero_pp_rank_{r}_mp_rank_00_*``; ``mp_rank_00`` is the model-parallel index, always shared) and ours
# (``ema_rank{r}.pt``, ``task_rank{r}.pt``). Every other file is shared state.
_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|_rank)(\d+)[_.]")


def files_for_rank(names: list[str], rank: int) -> list[str]:
    """The checkpoint files (relative paths) rank ``rank`` reads on resume: shared ones and its own shards."""
    owners = {name: _RANK_IN_NAME.search(Path(name).name) for name in names}
    return sorted(n for n, match in owners.items() if match is None or int(match.group(1)) == rank)


@contextlib.contextmanager
def _checkpoint_folder(checkpoint: Any, rank: int) -> Iterator[tuple[str, list[str]]]:
    """(local folder, files fetched): the checkpoint as a folder private to this rank.

    Local checkpoints are read in place. Of a remote (S3) one, only what this rank reads is downloaded
    (`files_for_rank`) into a per-rank temporary folder: at 14B under ZeRO-3 the whole checkpoint is
    hundreds of GB, a rank's part 1/N of it. (Deliberately not `Checkpoint.as_directory()`: it downloads
    everything into one folder per node, and a rank arriving after another finished re-downloads into it
    while the other still reads, seen as a "corrupted" torch.load on resume.)
    """
    import pyarrow.fs

    fs = checkpoint.filesystem
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path, []
        return
    root = checkpoint.path.rstrip("/")
    listing = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    names = [info.path[len(root) + 1:] for info in listing if info.type == pyarrow.fs.FileType.File]
    wanted = files_for_rank(names, rank)
    with tempfile.TemporaryDirectory(prefix=f"resume-rank{rank}-") as folder:
        for name in wanted:
            Path(folder, name).parent.mkdir(parents=True, exist_ok=True)
            pyarrow.fs.copy_files(f"{root}/{name}", str(Path(folder, name)), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
        yield folder, wanted


def _resume(worker: Worker) -> tuple[int, list[str]]:
    """Load the latest Ray Train checkpoint into the engine, EMA and task; return (step, metrics lines).

    What this rank fetched of a remote checkpoint is recorded in ``{run}/resume/rank{r}.json``."""
    import ray.train

    engine, ema, rank, task = worker.engine, worker.ema, worker.rank, worker.task
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with _checkpoint_folder(checkpoint, rank) as (folder, fetched):
        engine.load_checkpoint(folder, tag="ds", load_module_strict=not _frozen_excluded(engine))
        if ema is not None:
            ema.load(folder, rank)
        task_state = Path(folder) / f"task_rank{rank}.pt"
        if task_state.exists() and isinstance(task, StatefulTask):
            task.load_state_dict(torch.load(task_state, map_location="cpu", weights_only=True))
        state = json.loads((Path(folder) / "train_state.json").read_text())
        lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
    if fetched:
        worker.storage.write_json(worker.storage.join(run_dir(worker.cfg), "resume", f"rank{rank}.json"),
                                  {"step": state["step"], "files": fetched})
    log.info("rank %d resumed at step %d (%d files fetched)", rank, state["step"], len(fetched))
    return int(state["step"]), [ln for ln in lines if json.loads(ln)["step"] <= state["step"]]


def _frozen_excluded(engine: Any) -> bool:
    """Whether checkpoints leave out frozen parameters: yes when any exist (a LoRA job's base model is
    rebuilt from its pretrained folder at start, so every checkpoint would otherwise carry a base copy)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def _maybe_inject_failure(cfg: TrainJobConfig, storage: Storage, step: int, rank: int, world: int) -> None:
    if cfg.run.fail_at_step != step or rank != min(1, world - 1):
        return
    marker = storage.join(run_dir(cfg), "_injected_failure")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"failed once at step {step}\n")
    raise InjectedFailure(f"injected failure at step {step} on rank {rank}")


def _save_checkpoint(worker: Worker, step: int, metrics: dict, lines: list[str]) -> None:
    """Every rank writes its DeepSpeed/EMA/task files into the checkpoint; rank 0 adds the shared state
    and publishes the export to ``{run}/export`` (outside the checkpoint: no model copy per checkpoint)."""
    import ray.train
    from ray.train import Checkpoint

    engine, ema, task, rank, storage, cfg = (worker.engine, worker.ema, worker.task, worker.rank, worker.storage,
                                             worker.cfg)
    weights = _export_weights(worker)  # collective under ZeRO-3; {} except on rank 0
    with tempfile.TemporaryDirectory(prefix="ckpt-") as folder:
        engine.save_checkpoint(folder, tag="ds", exclude_frozen_parameters=_frozen_excluded(engine))
        if ema is not None:
            ema.save(folder, rank)
        if isinstance(task, StatefulTask):  # optional task state, e.g. distillation's target network
            torch.save(task.state_dict(), Path(folder) / f"task_rank{rank}.pt")
        if rank == 0:
            Path(folder, "train_state.json").write_text(json.dumps({"step": step, "job": type(task).__name__}))
            Path(folder, "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
            _publish_export(worker, weights)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _publish_export(worker: Worker, weights: dict[str, torch.Tensor]) -> None:
    """Rank 0: the task's export of ``weights`` to ``{run}/export``, replacing the previous one."""
    with tempfile.TemporaryDirectory(prefix="export-") as export_dir:
        worker.task.export(_unwrapped(worker.engine), weights, Path(export_dir))
        worker.storage.upload_dir(export_dir, worker.storage.join(run_dir(worker.cfg), "export"))


def export_dtype(cfg: TrainJobConfig) -> torch.dtype:
    """The exported weights' dtype: ``checkpoint.export_precision``, auto = the run's precision."""
    chosen = cfg.checkpoint.export_precision
    name = resolve_precision(cfg.deepspeed, cfg.scaling.use_gpu) if chosen == "auto" else chosen
    return torch.bfloat16 if name == "bf16" else torch.float32


def _export_weights(worker: Worker) -> dict[str, torch.Tensor]:
    """Rank 0: the trainable weights to export in the export dtype, the EMA when kept, else the live ones
    (gathered a group at a time under ZeRO-3, a collective); other ranks: {}."""
    engine, ema, rank, dtype = worker.engine, worker.ema, worker.rank, export_dtype(worker.cfg)
    if ema is not None:
        return ema.full_state_dict(dtype, rank)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if worker.cfg.deepspeed.zero_stage == 3:
        return gathered_on_rank0(named, dtype, rank)
    return {n: p.detach().to("cpu", dtype, copy=True) for n, p in named} if rank == 0 else {}


def _unwrapped(engine: Any) -> torch.nn.Module:
    return engine.module


def _setup(cfg: TrainJobConfig, task: TrainTask) -> Worker:
    import ray.train

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (DeepSpeed also broadcasts)
    ds_cfg = deepspeed_config(cfg.deepspeed, cfg.batch_size, world, cfg.scaling.use_gpu, cfg.scaling.sequence_parallel)
    if cfg.deepspeed.zero_stage == 3:  # built under zero.Init, filled tensor by tensor: no rank holds a full copy
        from model.loading import zero3_build

        with zero3_build(ds_cfg) as built:
            model = task.build_model()
        built.check()
    else:
        model = task.build_model()
    engine = initialize_engine(model, task.param_groups(model), cfg.optim, ds_cfg, total_steps=cfg.steps)
    if cfg.scaling.sequence_parallel > 1:  # before the task's hook, so models it derives share the group
        engine.module.enable_sequence_parallel(engine.seq_parallel_group)
    dtype = torch.bfloat16 if resolve_precision(cfg.deepspeed, cfg.scaling.use_gpu) == "bf16" else torch.float32
    task.on_engine_ready(engine, engine.device, dtype)
    ema = (EMA(engine.module, task.ema_decay, cfg.deepspeed.zero_stage, warmup=getattr(task, "ema_warmup", True))
           if task.ema_decay is not None else None)
    return Worker(cfg=cfg, task=task, engine=engine, ema=ema, rank=rank, world=world, storage=Storage(cfg.storage))


def run_worker_loop(cfg: TrainJobConfig, task: TrainTask, columns: list[str] | None = None) -> None:
    """Body of `train_loop_per_worker` for every training job (see module docstring)."""
    import ray.train

    worker = _setup(cfg, task)
    engine, ema, rank, world, storage = worker.engine, worker.ema, worker.rank, worker.world, worker.storage
    start_step, lines = _resume(worker)
    # Seeded by the data-parallel index: the ranks of a sequence-parallel group draw the same noise.
    seed = cfg.run.seed * 1000 + worker.data_rank * 7919
    generator = torch.Generator()  # reseeded every step from (seed, step): a resumed run draws what an uninterrupted one does
    leader = worker.data_rank * worker.sequence_parallel  # the group's first rank reads its data shard
    batches = (_batches(cfg.batch_size, columns, cfg.run.cache_epochs_mb, torch.Generator().manual_seed(seed + start_step + 1))
               if rank == leader else None)
    if worker.sequence_parallel > 1:
        batches = _shared_in_group(batches, engine.seq_parallel_group, leader)
    metrics_uri = storage.join(run_dir(cfg), "metrics.jsonl")
    board = _TensorBoard(cfg, storage) if cfg.run.tensorboard and rank == 0 else None
    for step in range(start_step + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        generator.manual_seed(seed * 100_003 + step)
        step_metrics = _optimizer_step(engine, task, batches, generator, cfg.deepspeed.gradient_accumulation_steps)
        if ema is not None:
            ema.update(step)
        _maybe_inject_failure(cfg, storage, step, rank, world)
        seconds = time.perf_counter() - t0
        samples = cfg.batch_size * cfg.deepspeed.gradient_accumulation_steps * world // worker.sequence_parallel
        metrics = {"step": step, "lr": engine.get_lr()[0], "grad_norm": _grad_norm(engine),
                   "samples_per_s": samples / seconds, "step_time_s": seconds, "time": time.time(),
                   "peak_rss_mb": _peak_rss_mb(), "sequence_parallel": _split_degree(engine), **step_metrics}
        checkpointing = step % cfg.checkpoint.every_n_steps == 0 or step == cfg.steps
        if checkpointing:
            _maybe_validate(worker, step, metrics)  # first, so val_* land in metrics.jsonl too
        lines.append(json.dumps(metrics))
        if board is not None:
            board.log(metrics, publish=checkpointing)
        # ray.train.report is a barrier through the controller (~1-2 s on a small machine), so the
        # per-step metrics are kept in metrics.jsonl and reported to Ray Train every N steps only.
        if rank == 0 and (checkpointing or step % cfg.run.report_every_n_steps == 0):
            storage.write_text(metrics_uri, "".join(ln + "\n" for ln in lines))
        if checkpointing:
            _save_checkpoint(worker, step, metrics, lines)
        elif step % cfg.run.report_every_n_steps == 0:
            ray.train.report(metrics)


def _optimizer_step(engine: Any, task: TrainTask, batches: Iterator, generator: torch.Generator, accum: int) -> dict:
    """``accum`` micro-steps; DeepSpeed steps the optimizer at the accumulation boundary."""
    totals: dict[str, float] = {}
    for _ in range(accum):
        loss, metrics = task.micro_step(engine, next(batches), generator)
        engine.backward(loss)
        engine.step()
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value / accum
    return totals


def _split_degree(engine: Any) -> int:
    """How many ranks the model's tokens are split over (the size of its sequence-parallel group; 1 = none)."""
    import torch.distributed as dist

    group = getattr(engine.module, "sequence_parallel_group", None)
    return 1 if group is None else dist.get_world_size(group)


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _grad_norm(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _maybe_validate(worker: Worker, step: int, metrics: dict) -> None:
    """Rank 0 writes a validation sample (with the EMA weights when kept) at checkpoint steps."""
    cfg, task, rank, ema, engine, storage = (worker.cfg, worker.task, worker.rank, worker.ema, worker.engine,
                                             worker.storage)
    every = cfg.checkpoint.validate_every_n_steps
    if not ((every and step % every == 0) or step == cfg.steps):
        return
    if cfg.deepspeed.zero_stage == 3:
        return  # a ZeRO-3 module cannot run on one rank alone; the exported folder is the check
    if rank != 0:
        return
    with tempfile.TemporaryDirectory(prefix="val-") as folder:
        model = _unwrapped(engine)
        swap = ema.swapped_into(model) if ema is not None else _null_context(model)
        alone = model.sequence_parallel_off() if worker.sequence_parallel > 1 else _null_context(model)
        with swap, alone:  # rank 0 samples alone: no group to split tokens with
            values = task.validate(model, step, Path(folder))
        if any(Path(folder).iterdir()):
            storage.upload_dir(folder, storage.join(run_dir(cfg), "validation", f"step_{step:06d}"))
    metrics.update({f"val_{k}": v for k, v in values.items()})


class _TensorBoard:
    """Optional TensorBoard scalars (tensorboardX, rank 0), published to {run}/tensorboard at checkpoints."""

    def __init__(self, cfg: TrainJobConfig, storage: Storage):
        from tensorboardX import SummaryWriter

        self.local = tempfile.mkdtemp(prefix="tb-")
        self.writer = SummaryWriter(self.local)
        self.storage, self.uri = storage, storage.join(run_dir(cfg), "tensorboard")

    def log(self, metrics: dict, publish: bool) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, metrics["step"])
        if publish:
            self.writer.flush()
            self.storage.upload_dir(self.local, self.uri)


class _null_context:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False
