"""Driver side of the training jobs: shards as a Ray Dataset, the TorchTrainer, the run's result.

Each job calls `fit(cfg, train_fn, datasets)`; the worker side is `ray_jobs.training.loop`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from model.storage import Storage
from ray_jobs.training.config import TrainJobConfig

__all__ = ["fit", "read_shards", "take_clip"]

log = logging.getLogger(__name__)


def read_shards(data_uri: str, storage: Storage, split: str | None = "train", columns: list[str] | None = None):
    """The preprocessed clips as a Ray Dataset (Parquet through our pyarrow filesystem)."""
    import ray.data

    manifest_uri = storage.join(data_uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no shard manifest at {manifest_uri}: run `python -m ray_jobs.preprocess` first")
    shards = storage.read_json(manifest_uri).get("shards", [])
    if not shards:
        raise ValueError(f"{manifest_uri} lists no shards (every input failed? see its errors)")
    fs, _ = storage.arrow_path(data_uri)
    paths = [storage.arrow_path(storage.join(data_uri, rel))[1] for rel in shards]
    wanted = None if columns is None else sorted(set(columns) | ({"split"} if split else set()))
    from ray.data.expressions import col

    ds = ray.data.read_parquet(paths, filesystem=fs)
    if wanted is not None:
        ds = ds.select_columns(wanted)
    if split is not None:
        ds = ds.filter(expr=col("split") == split)
        if wanted is not None and "split" not in columns:
            ds = ds.drop_columns(["split"])
    return ds


def take_clip(data_uri: str, storage: Storage, split: str = "heldout", index: int = 0) -> dict[str, Any]:
    """One clip (all columns, numpy) for validation samples; falls back to train when no held-out clips."""
    for wanted in (split, "train"):
        rows = read_shards(data_uri, storage, split=wanted).take(index + 1)
        if len(rows) > index:
            return dict(rows[index])
    raise ValueError(f"no clips in {data_uri}")


def fit(cfg: TrainJobConfig, train_fn: Callable[[dict], None], train_loop_config: dict, datasets: dict):
    """Run ``train_fn`` on ``cfg.scaling`` workers; resume from ``{storage_path}/{run.name}`` if present."""
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
    return result
