"""Driver side of the training jobs: shards as a Ray Dataset, the TorchTrainer, the run's result.

Each job calls `fit(cfg, train_fn, datasets)`; the worker side is `ray_jobs.training.loop`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from model.storage import Storage
from ray_jobs import shards as shard_tables
from ray_jobs.training.config import TrainJobConfig

__all__ = ["fit", "read_shards", "take_clip", "take_clips"]

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

    ds = shard_tables.read_dataset(paths, fs, wanted)
    if split is not None:
        ds = ds.filter(expr=col("split") == split)
        if wanted is not None and "split" not in columns:
            ds = ds.drop_columns(["split"])
    return ds


def take_clips(data_uri: str, storage: Storage, split: str = "heldout", limit: int = 1) -> list[dict[str, Any]]:
    """Up to ``limit`` clips of ``split`` (all columns, numpy), in shard order; train clips if none.

    Read with pyarrow directly, shard after shard, rather than `read_shards(...).take()`: a few rows
    do not need a Ray Data execution, which costs 5-13 s of start-up on a 2-core machine.
    """
    import pyarrow.parquet as pq
    import ray.data  # noqa: F401  (registers Ray's tensor types, which shards of older runs use)

    manifest = storage.read_json(storage.join(data_uri, "manifest.json"))
    fs, _ = storage.arrow_path(data_uri)
    for wanted in (split, "train"):
        rows: list[dict[str, Any]] = []
        for rel in manifest.get("shards", []):
            path = storage.arrow_path(storage.join(data_uri, rel))[1]
            table = pq.read_table(path, filesystem=fs, filters=[("split", "==", wanted)])
            rows += _table_rows(table.slice(0, limit - len(rows)))
            if len(rows) == limit:
                break
        if rows:
            return rows
    raise ValueError(f"no clips in {data_uri}")


def _table_rows(table) -> list[dict[str, Any]]:
    """Rows as dicts like Ray Data's `take()`: numpy arrays for tensor columns, Python scalars else."""
    columns = shard_tables.table_to_numpy(table)
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def take_clip(data_uri: str, storage: Storage, split: str = "heldout", index: int = 0) -> dict[str, Any]:
    """Clip number ``index`` of ``split`` (train when the data has no such split), for validation samples."""
    rows = take_clips(data_uri, storage, split, index + 1)
    if len(rows) <= index:
        raise ValueError(f"{data_uri} has only {len(rows)} clips of split {split!r} (wanted index {index})")
    return rows[index]


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
