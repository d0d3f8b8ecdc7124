"""Preprocessed shards as an artifact: the manifest, the clips as a Ray Dataset or numpy rows, and the `DataCard`.

Written by `ray_jobs.preprocess` (``{data}/manifest.json`` listing Parquet shards in the tensor
encoding of `artifacts.tables`); read by every training job, preference generation and evaluation.
"""

from __future__ import annotations

from typing import Any

from artifacts import tables
from artifacts.card import DataCard
from core.storage import Storage

__all__ = ["MANIFEST_FILE", "read_manifest", "data_card", "read_shards", "take_clips", "take_clip"]

MANIFEST_FILE = "manifest.json"


def read_manifest(data_uri: str, storage: Storage) -> dict[str, Any]:
    """``{data_uri}/manifest.json``; a clear error when the folder was never preprocessed."""
    manifest_uri = storage.join(data_uri, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no shard manifest at {manifest_uri}: run `python -m ray_jobs.preprocess` first")
    return storage.read_json(manifest_uri)


def data_card(data_uri: str, storage: Storage) -> DataCard:
    """What the shards at ``data_uri`` were made with (VAE, audio geometry, frame geometry)."""
    return DataCard.from_manifest(data_uri, read_manifest(data_uri, storage))


def read_shards(data_uri: str, storage: Storage, split: str | None = "train", columns: list[str] | None = None):
    """The preprocessed clips as a Ray Dataset (Parquet through our pyarrow filesystem)."""
    import ray.data

    shards = read_manifest(data_uri, storage).get("shards", [])
    if not shards:
        raise ValueError(f"{storage.join(data_uri, MANIFEST_FILE)} lists no shards (every input failed? see its errors)")
    fs, _ = storage.arrow_path(data_uri)
    paths = [storage.arrow_path(storage.join(data_uri, rel))[1] for rel in shards]
    wanted = None if columns is None else sorted(set(columns) | ({"split"} if split else set()))
    from ray.data.expressions import col

    ds = tables.read_dataset(paths, fs, wanted)
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

    manifest = read_manifest(data_uri, storage)
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
    columns = tables.table_to_numpy(table)
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def take_clip(data_uri: str, storage: Storage, split: str = "heldout", index: int = 0) -> dict[str, Any]:
    """Clip number ``index`` of ``split`` (train when the data has no such split), for validation samples."""
    rows = take_clips(data_uri, storage, split, index + 1)
    if len(rows) <= index:
        raise ValueError(f"{data_uri} has only {len(rows)} clips of split {split!r} (wanted index {index})")
    return rows[index]
