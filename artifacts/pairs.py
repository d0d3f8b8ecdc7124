"""Preference pairs as an artifact: their columns, manifest and reader.

Written by `ray_jobs.preferences` (``{pairs}/data/*.parquet`` + ``{pairs}/manifest.json``: files,
counts per dimension, the job config), read by `ray_jobs.train_tpo`. Tensor columns are written by
Ray Data's ``write_parquet`` (Ray's tensor extension type), not yet in `artifacts.tables`' raw-byte
encoding that the shards use.
"""

from __future__ import annotations

from core.storage import Storage

__all__ = ["CONDITION_COLUMNS", "TRUTH_COLUMNS", "PAIR_COLUMNS", "PAIRS_MANIFEST", "read_pairs"]

PAIRS_MANIFEST = "manifest.json"

# Shard columns a pair carries forward (what the TPO step conditions on).
CONDITION_COLUMNS = ["ref_latent", "pose", "audio_feats", "ref_face_latent", "has_audio", "has_ref_face", "motion_mask"]
# Columns the rewards may read (ground truth for the gt_* rewards; conditions for the others).
TRUTH_COLUMNS = ["frames", "ref_frame", "face_boxes", "keypoints", "video_id", "clip_index", "identity_id"]
PAIR_COLUMNS = CONDITION_COLUMNS + ["video_id", "clip_index", "identity_id", "dimension", "margin",
                                    "winner_latents", "loser_latents", "winner_reward", "loser_reward"]


def read_pairs(uri: str, storage: Storage, columns: list[str] | None = None):
    """The pairs as a Ray Dataset (Parquet through `Storage.arrow_path`), from ``{uri}/manifest.json``."""
    import ray.data

    manifest_uri = storage.join(uri, PAIRS_MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no pairs manifest at {manifest_uri}: run `python -m ray_jobs.make_preferences` first")
    shards = storage.read_json(manifest_uri)["shards"]
    if not shards:
        raise ValueError(f"{manifest_uri} lists no pair files (every margin below threshold?)")
    fs, _ = storage.arrow_path(uri)
    return ray.data.read_parquet([storage.arrow_path(storage.join(uri, s))[1] for s in shards], filesystem=fs,
                                 columns=columns)
