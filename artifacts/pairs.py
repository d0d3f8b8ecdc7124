"""Preference pairs as an artifact: their columns, encoding, files, manifest and reader.

Written by `ray_jobs.preferences` (``{pairs}/data/*.parquet`` + ``{pairs}/manifest.json``: files,
counts per dimension, encoding, the job config), read by `ray_jobs.train_tpo`. Tensor columns use
the shards' raw-byte encoding (`artifacts.tables`), so one reader serves both artifacts.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from artifacts import tables
from core.storage import Storage

__all__ = ["CONDITION_COLUMNS", "TRUTH_COLUMNS", "PAIR_COLUMNS", "PAIRS_MANIFEST", "write_pair_file", "pairs_manifest",
           "read_pairs"]

PAIRS_MANIFEST = "manifest.json"
PAIRS_DATA = "data"

# Shard columns a pair carries forward (what the TPO step conditions on).
CONDITION_COLUMNS = ["ref_latent", "pose", "audio_feats", "ref_face_latent", "has_audio", "has_ref_face", "motion_mask"]
# Columns the rewards may read (ground truth for the gt_* rewards; conditions for the others).
TRUTH_COLUMNS = ["frames", "ref_frame", "face_boxes", "keypoints", "video_id", "clip_index", "identity_id"]
PAIR_COLUMNS = CONDITION_COLUMNS + ["video_id", "clip_index", "identity_id", "dimension", "margin",
                                    "winner_latents", "loser_latents", "winner_reward", "loser_reward"]


def write_pair_file(pairs: dict[str, np.ndarray], uri: str, storage: Storage) -> str | None:
    """Write one Parquet file of pair rows (`PAIR_COLUMNS`) under ``{uri}/data``; its name, or None for no rows.

    The name hashes the (clip, dimension) keys, so a re-run writes the same file names.
    """
    if len(pairs["dimension"]) == 0:
        return None
    keys = "\n".join(f"{v}#{c}#{d}" for v, c, d in zip(pairs["video_id"], pairs["clip_index"], pairs["dimension"]))
    name = f"pairs-{hashlib.sha1(keys.encode()).hexdigest()[:16]}.parquet"
    columns = {k: np.asarray(pairs[k]) for k in PAIR_COLUMNS}
    storage.write_bytes(storage.join(uri, PAIRS_DATA, name), tables.parquet_bytes(columns))
    return name


def pairs_manifest(files: list[str], dimensions: list[str], config: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the pair files written (names relative to the pairs folder) and their dimensions."""
    counts: dict[str, int] = {}
    for dimension in dimensions:
        counts[dimension] = counts.get(dimension, 0) + 1
    return {"shards": [f"{PAIRS_DATA}/{f}" for f in sorted(files)], "num_pairs": len(dimensions),
            "pairs_by_dimension": counts, "columns": PAIR_COLUMNS, "encoding": tables.ENCODING, "config": config}


def read_pairs(uri: str, storage: Storage, columns: list[str] | None = None):
    """The pairs as a Ray Dataset (tensor columns as numpy in batches), from ``{uri}/manifest.json``."""
    manifest_uri = storage.join(uri, PAIRS_MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no pairs manifest at {manifest_uri}: run `python -m ray_jobs.make_preferences` first")
    manifest = storage.read_json(manifest_uri)
    if not manifest["shards"]:
        raise ValueError(f"{manifest_uri} lists no pair files (every margin below threshold?)")
    if manifest.get("encoding") != tables.ENCODING:
        raise ValueError(f"{manifest_uri}: pairs encoded as {manifest.get('encoding')!r}, this version reads "
                         f"{tables.ENCODING!r}; re-run `python -m ray_jobs.make_preferences`")
    fs, _ = storage.arrow_path(uri)
    return tables.read_dataset([storage.arrow_path(storage.join(uri, s))[1] for s in manifest["shards"]], fs, columns)
