"""Shard tensor encoding: numpy columns -> Parquet (raw-bytes tensor columns) -> numpy, exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_jobs import shards


def _columns(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    return {"video_id": np.array([f"v{i}" for i in range(rows)], dtype=object), "clip_index": np.arange(rows),
            "fps": np.full(rows, 12.5), "has_audio": np.arange(rows) % 2 == 0,
            "frames": rng.integers(0, 256, (rows, 3, 5, 4, 3), dtype=np.uint8),
            "mouth_openness": rng.normal(size=(rows, 3)).astype(np.float32),
            "latents": rng.normal(size=(rows, 2, 1, 2, 2)).astype(np.float64)}


def test_round_trip_through_parquet_keeps_values_dtypes_and_shapes(tmp_path):
    columns = _columns(np.random.default_rng(0), 6)
    path = tmp_path / "part.parquet"
    pq.write_table(shards.table_from_columns(columns), path, compression="lz4")
    schema = pq.read_schema(path)
    assert schema.field("frames").type == pa.binary(3 * 5 * 4 * 3)
    assert shards.tensor_column_schema(schema) == {"frames": (np.dtype(np.uint8), (3, 5, 4, 3)),
                                                   "mouth_openness": (np.dtype(np.float32), (3,)),
                                                   "latents": (np.dtype(np.float64), (2, 1, 2, 2))}
    assert shards.tensor_column_schema(schema, ["frames", "fps"]) == {"frames": (np.dtype(np.uint8), (3, 5, 4, 3))}
    table = pq.read_table(path)
    back = shards.table_to_numpy(table.slice(2, 3))  # a slice: the array offset must be honoured
    for name in ("frames", "mouth_openness", "latents"):
        assert back[name].dtype == columns[name].dtype
        np.testing.assert_array_equal(back[name], columns[name][2:5])
    assert back["video_id"] == ["v2", "v3", "v4"] and back["has_audio"] == [True, False, True]
    assert back["fps"] == [12.5] * 3


def test_non_contiguous_input_is_stored_in_c_order():
    frames = np.random.default_rng(1).integers(0, 256, (4, 2, 3, 3), dtype=np.uint8)
    table = shards.table_from_columns({"frames": frames[:, :, ::-1]})  # a reversed (non-contiguous) view
    np.testing.assert_array_equal(shards.table_to_numpy(table)["frames"], frames[:, :, ::-1])
