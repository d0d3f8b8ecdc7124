"""Driver side of the training jobs: the TorchTrainer and the run's result (shards: `artifacts.shards`).

Each job calls `fit(cfg, train_fn, datasets)`; the worker side is `ray_jobs.training.loop`.
"""

from __future__ import annotations

import logging
from typing import Callable

from artifacts.exports import ExportedRun
from core.storage import Storage
from ray_jobs.training.config import TrainJobConfig

__all__ = ["fit"]

log = logging.getLogger(__name__)


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
    )
    result = trainer.fit()
    log.info("run %s finished: %s", cfg.run.name, result.metrics)
    return ExportedRun.of(result, storage.join(cfg.run.storage_path, cfg.run.name), storage)
