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


# ------------------------------------------------------------------ latent-first shards (store_pixels)
def test_pixel_columns_of_rows_not_kept_are_nulls_that_cost_no_bytes(tmp_path):
    from artifacts.shards import _table_rows, shard_bytes

    rng = np.random.default_rng(1)
    columns = {**_columns(rng, 4), "pose": rng.integers(0, 256, (4, 3, 5, 4, 3), dtype=np.uint8)}
    assert shard_bytes(columns, "lz4") == shards.parquet_bytes(columns, "lz4")  # store_pixels: true is unchanged
    kept = np.array([True, False, False, True])
    path = tmp_path / "part.parquet"
    path.write_bytes(shard_bytes(columns, "none", kept))
    table = pq.read_table(path)
    assert [table.column(c).null_count for c in ("frames", "pose", "latents")] == [2, 2, 0]
    meta = pq.read_metadata(path).row_group(0)
    sizes = {meta.column(i).path_in_schema: meta.column(i).total_compressed_size for i in range(meta.num_columns)}
    assert sizes["frames"] < 2 * columns["frames"][0].nbytes + 100  # two stored values, uncompressed
    assert sizes["frames"] > 2 * columns["frames"][0].nbytes
    rows = _table_rows(table)
    assert np.array_equal(rows[3]["frames"], columns["frames"][3]) and np.array_equal(rows[0]["pose"], columns["pose"][0])
    assert "frames" not in rows[1] and "pose" not in rows[2]  # absent, not zeros
    assert np.array_equal(rows[1]["latents"], columns["latents"][1]) and rows[1]["video_id"] == "v1"


def test_read_columns_serves_pose_as_keypoints_and_the_cards_canvas_without_pixels():
    from artifacts.card import DataCard, FrameGeometry
    from artifacts.shards import read_columns
    from ray_jobs.training.teacher_objective import TRAIN_COLUMNS

    lean = DataCard(uri="s3://b/shards", store_pixels=False, pose_conf_threshold=0.4,
                    frames=FrameGeometry(height=480, width=832, clip_frames=81))
    read, constants = read_columns(lean, "train", TRAIN_COLUMNS)
    assert "pose" not in read and read.count("keypoints") == 1 and "latents" in read and "pose_height" not in read
    assert constants == {"pose_height": 480, "pose_width": 832, "pose_conf_threshold": 0.4}
    full = lean.model_copy(update={"store_pixels": True})
    assert read_columns(full, "train", TRAIN_COLUMNS) == ([c for c in TRAIN_COLUMNS if not c.startswith("pose_")], {})
    assert read_columns(lean, "heldout", ["frames", "pose"]) == (["frames", "pose"], {})  # held-out keeps pixels
    assert read_columns(lean, "train", ["latents"]) == (["latents"], {})
    with pytest.raises(ValueError, match=r"store_pixels: false.*\['audio', 'frames'\]"):
        read_columns(lean, "train", ["frames", "audio", "pose"])
    manifest = {"store_pixels": False, "config": {"height": 480, "width": 832, "pose": {"render_conf_threshold": 0.4}}}
    card = DataCard.from_manifest("u", manifest)
    assert (card.store_pixels, card.pose_conf_threshold, card.frames.width) == (False, 0.4, 832)
    assert DataCard.from_manifest("u", {"config": {}}).store_pixels  # manifests from before the option kept pixels


def test_conditions_draw_pose_from_keypoints_only_with_the_whole_canvas():
    import torch

    from model.conditions import Conditions
    from model.pose import render_pose_batch

    keypoints = np.zeros((2, 3, 17, 3), np.float32)
    keypoints[..., 0], keypoints[..., 1], keypoints[..., 2] = 10 + np.arange(17), 20, 1.0
    batch = {"ref_latent": torch.zeros(2, 1), "keypoints": torch.from_numpy(keypoints),
             "pose_height": torch.tensor([40, 40]), "pose_width": torch.tensor([48, 48]),
             "pose_conf_threshold": torch.tensor([0.3, 0.3], dtype=torch.float64)}
    drawn = Conditions.from_batch(batch).pose
    maps = render_pose_batch(keypoints, 40, 48, 0.3)
    assert drawn.shape == (2, 3, 3, 40, 48) and maps.any()
    assert torch.equal(drawn, Conditions.from_batch({"ref_latent": batch["ref_latent"],
                                                     "pose": torch.from_numpy(maps)}).pose)
    assert Conditions.from_batch({"ref_latent": batch["ref_latent"], "keypoints": batch["keypoints"]}).pose is None
    with pytest.raises(KeyError, match="pose_width"):
        Conditions.from_batch({k: v for k, v in batch.items() if k != "pose_width"})
    with pytest.raises(ValueError, match="one pose canvas"):
        Conditions.from_batch({**batch, "pose_height": torch.tensor([40, 32])})
