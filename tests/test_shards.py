"""Shard tensor encoding: numpy columns -> Parquet (raw-bytes tensor columns) -> numpy, exactly."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from artifacts import tables as shards


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


def test_shards_of_older_runs_with_ray_tensor_columns_still_read(tmp_path):
    from ray.data.block import BlockAccessor  # also registers Ray's tensor types for the read below

    frames = np.random.default_rng(2).integers(0, 256, (3, 2, 4, 4, 3), dtype=np.uint8)
    old = BlockAccessor.batch_to_block({"frames": frames, "clip_index": np.arange(3)})
    pq.write_table(old, tmp_path / "old.parquet")
    back = shards.table_to_numpy(pq.read_table(tmp_path / "old.parquet"))
    np.testing.assert_array_equal(back["frames"], frames)
    assert back["clip_index"] == [0, 1, 2]


def test_an_output_never_mixes_tensor_encodings():
    from ray_jobs.preprocess import PreprocessConfig
    from ray_jobs.preprocess.job import check_encoding

    cfg = PreprocessConfig(input="in", output="out")
    check_encoding(cfg, {"runs": []})  # fresh output
    check_encoding(cfg, {"runs": [{"run": "run-0001"}], "shard_encoding": shards.ENCODING})
    with pytest.raises(ValueError, match="fresh output"):
        check_encoding(cfg, {"runs": [{"run": "run-0001"}]})  # written before the encoding was recorded
