"""Preprocessed shards as an artifact: the manifest, the clips as a Ray Dataset or numpy rows, and the `DataCard`.

Written by `ray_jobs.preprocess` (``{data}/manifest.json`` listing Parquet shards in the tensor
encoding of `artifacts.tables`); read by every training job, preference generation and evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from artifacts import tables
from artifacts.card import DataCard
from core.storage import Storage

__all__ = ["MANIFEST_FILE", "PIXEL_COLUMNS", "read_manifest", "data_card", "shard_bytes", "read_columns",
           "read_shards", "take_clips", "take_clip"]

MANIFEST_FILE = "manifest.json"
# Columns only held-out clips carry when the data was preprocessed with `store_pixels: false`: in train
# rows they are Parquet nulls (no bytes; one nullable schema for every shard of the output).
PIXEL_COLUMNS: tuple[str, ...] = ("frames", "ref_frame", "pose", "audio", "face_crops", "ref_face_crop")


def read_manifest(data_uri: str, storage: Storage) -> dict[str, Any]:
    """``{data_uri}/manifest.json``; a clear error when the folder was never preprocessed."""
    manifest_uri = storage.join(data_uri, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no shard manifest at {manifest_uri}: run `python -m ray_jobs.preprocess` first")
    return storage.read_json(manifest_uri)


def data_card(data_uri: str, storage: Storage) -> DataCard:
    """What the shards at ``data_uri`` were made with (VAE, audio geometry, frame geometry)."""
    return DataCard.from_manifest(data_uri, read_manifest(data_uri, storage))


def shard_bytes(columns: dict[str, np.ndarray], compression: str, pixels_kept: np.ndarray | None = None) -> bytes:
    """One shard's Parquet bytes; with ``pixels_kept`` (B,) bool, PIXEL_COLUMNS are nullable and null where False.

    None (``store_pixels: true``) is `tables.parquet_bytes` itself, so such shards are byte for byte
    what they were before the option. Null values of a fixed-size-binary column take no bytes in
    Parquet (only definition levels), which is what makes a train clip ~200 MB lighter at 81x480x832.
    """
    if pixels_kept is None:
        return tables.parquet_bytes(columns, compression)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tables.table_from_columns(columns)
    validity = pa.py_buffer(np.packbits(np.asarray(pixels_kept, bool), bitorder="little"))
    for name in PIXEL_COLUMNS:
        if name in columns:
            index = table.schema.get_field_index(name)
            array = table.column(index).combine_chunks()
            nulls = pa.FixedSizeBinaryArray.from_buffers(array.type, len(array), [validity, array.buffers()[1]],
                                                         null_count=int(len(array) - np.count_nonzero(pixels_kept)))
            table = table.set_column(index, table.schema.field(index).with_nullable(True), nulls)
    sink = pa.BufferOutputStream()  # the write options of tables.parquet_bytes (see there why)
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    scalars = [f.name for f in table.schema if not pa.types.is_fixed_size_binary(f.type)]
    pq.write_table(table, sink, compression=compression, use_dictionary=strings, write_statistics=scalars)
    return sink.getvalue().to_pybytes()


def read_columns(card: DataCard, split: str | None, columns: list[str]) -> tuple[list[str], dict[str, float]]:
    """(columns to read from the Parquet, constant columns to add) for ``columns`` of ``split``.

    Shards with pixels serve ``pose`` as stored and have no render columns (dropped from the read).
    Without pixels, ``pose`` becomes its keypoints plus the canvas and threshold preprocessing drew
    with (`model.pose.POSE_RENDER_COLUMNS`), from which `Conditions.from_batch` renders the maps on
    the worker; any other pixel column of a train clip does not exist, which is an error here rather
    than garbage later.
    """
    from model.pose import POSE_RENDER_COLUMNS

    read = [c for c in columns if c not in POSE_RENDER_COLUMNS[1:]]
    if card.store_pixels or split == "heldout":
        return read, {}
    absent = sorted(set(read) & set(PIXEL_COLUMNS) - {"pose"})
    if absent:
        raise ValueError(f"{card.uri} was preprocessed with store_pixels: false: its {split or 'train'} clips have no "
                         f"{absent} (held-out clips do); read latents and keypoints, or re-preprocess with pixels")
    if "pose" not in read:
        return read, {}
    read = [c for c in read if c != "pose"] + ([] if "keypoints" in read else ["keypoints"])
    return read, {"pose_height": card.frames.height, "pose_width": card.frames.width,
                  "pose_conf_threshold": card.pose_conf_threshold}


def read_shards(data_uri: str, storage: Storage, split: str | None = "train", columns: list[str] | None = None):
    """The preprocessed clips as a Ray Dataset (Parquet through our pyarrow filesystem).

    ``columns`` may name ``pose`` and the render columns whether or not the shards store pose maps
    (`read_columns`): training jobs list both and get whichever the data has.
    """
    import ray.data

    manifest = read_manifest(data_uri, storage)
    shards = manifest.get("shards", [])
    if not shards:
        raise ValueError(f"{storage.join(data_uri, MANIFEST_FILE)} lists no shards (every input failed? see its errors)")
    fs, _ = storage.arrow_path(data_uri)
    paths = [storage.arrow_path(storage.join(data_uri, rel))[1] for rel in shards]
    constants: dict[str, float] = {}
    if columns is not None:
        columns, constants = read_columns(DataCard.from_manifest(data_uri, manifest), split, list(columns))
    wanted = None if columns is None else sorted(set(columns) | ({"split"} if split else set()))
    from ray.data.expressions import col, lit

    ds = tables.read_dataset(paths, fs, wanted)
    if split is not None:
        ds = ds.filter(expr=col("split") == split)
        if wanted is not None and "split" not in columns:
            ds = ds.drop_columns(["split"])
    return ds.with_columns({name: lit(value) for name, value in constants.items()}) if constants else ds


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
        if wanted != split and not DataCard.from_manifest(data_uri, manifest).store_pixels:
            raise ValueError(f"{data_uri} has no {split} clips, and its train clips carry no frames "
                             "(store_pixels: false): hold clips out (split.*) or preprocess with store_pixels: true")
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
    """Rows as dicts like Ray Data's `take()`: numpy arrays for tensor columns, Python scalars else.

    A null value (a pixel column of a train clip written with ``store_pixels: false``) is left out of
    its row, so reading it fails by name instead of handing over zeros.
    """
    columns = tables.table_to_numpy(table)
    valid = {name: np.asarray(table.column(name).is_valid()) for name in columns if table.column(name).null_count}
    return [{name: values[i] for name, values in columns.items() if name not in valid or valid[name][i]}
            for i in range(table.num_rows)]


def take_clip(data_uri: str, storage: Storage, split: str = "heldout", index: int = 0) -> dict[str, Any]:
    """Clip number ``index`` of ``split`` (train when the data has no such split), for validation samples."""
    rows = take_clips(data_uri, storage, split, index + 1)
    if len(rows) <= index:
        raise ValueError(f"{data_uri} has only {len(rows)} clips of split {split!r} (wanted index {index})")
    return rows[index]
