"""Driver side of the training jobs: the TorchTrainer and the run's result (shards: `artifacts.shards`).

Each job calls `fit(cfg, train_fn, datasets)`; the worker side is `ray_jobs.training.loop`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ray.train import DataConfig

from artifacts.exports import ExportedRun
from core.storage import Storage
from ray_jobs.training.config import TrainJobConfig

__all__ = ["fit", "GroupLeaderDataConfig"]

log = logging.getLogger(__name__)


class GroupLeaderDataConfig(DataConfig):
    """Ray Train's `DataConfig`, but with sequence parallelism each dataset is split into one stream per
    data-parallel rank, read by its group's first worker (the others get the batches from it over the
    group, `loop._shared_in_group`), so no row goes to a rank that would not train on it."""

    def __init__(self, sequence_parallel: int = 1):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def configure(self, datasets: dict, world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict]:
        sp = self.sequence_parallel
        if sp == 1:
            return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
        output: list[dict] = [dict.fromkeys(datasets) for _ in range(world_size)]  # non-leaders read nothing
        leaders = list(range(0, world_size, sp))
        hints = [worker_node_ids[i] for i in leaders] if worker_node_ids else None
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self._resolve_execution_options(name)
            for leader, split in zip(leaders, dataset.streaming_split(len(leaders), equal=True, locality_hints=hints)):
                output[leader][name] = split
        return output


def fit(cfg: TrainJobConfig, train_fn: Callable[[dict], None], train_loop_config: dict, datasets: dict) -> ExportedRun:
    """Run ``train_fn`` on ``cfg.scaling`` workers; resume from ``{storage_path}/{run.name}`` if present.

    Returns the run's artifact: its export folder with the model card, final metrics, last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage = Storage(cfg.storage)
    fs, path = storage.arrow_path(cfg.run.storage_path)
    if not storage.is_s3(cfg.run.storage_path):
        fs = None  # Ray Train handles local paths itself (absolute path required)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
        ),
        datasets=datasets,
        dataset_config=GroupLeaderDataConfig(cfg.scaling.sequence_parallel),
    )
    result = trainer.fit()
    log.info("run %s finished: %s", cfg.run.name, result.metrics)
    return ExportedRun.of(result, storage.join(cfg.run.storage_path, cfg.run.name), storage)
