"""Driver of the preprocessing job: list inputs, resume by manifest, build and run the Ray Data stream.

Output layout (local folder or s3:// prefix)::

    {output}/manifest.json                 written LAST by every run that did work
    {output}/run-0001/shards/part-*.parquet   clips of run 1 (schema: docs/design.md)
    {output}/run-0001/errors.parquet       error rows of run 1: source, video_id, clip_index, stage, reason

Readers take the shard list from the manifest (`manifest["shards"]`, paths relative to output);
shards of a run that crashed before its manifest update are never listed. Each run writes into a
new run folder, and an input whose size and mtime match its manifest entry is skipped, so re-runs
never duplicate clips.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import posixpath
import re
import time
from collections import Counter, defaultdict
from typing import Any

from core.storage import Storage, StorageNotFoundError
from artifacts import tables as shards
from artifacts.shards import PIXEL_COLUMNS
from ray_jobs.preprocess import udfs
from ray_jobs.preprocess.pose import check_pose_models
from ray_jobs.preprocess.config import VIDEO_EXTENSIONS, PreprocessConfig

__all__ = ["run", "list_inputs", "plan_inputs", "check_compatible", "check_encoding", "build_dataset", "MANIFEST_FILE"]

log = logging.getLogger("ray_jobs.preprocess")

MANIFEST_FILE = "manifest.json"
_RUN_DIR = re.compile(r"^run-(\d{4,})$")


def list_inputs(storage: Storage, root: str) -> list[dict[str, Any]]:
    """Every video under `root` with its sidecar URI ('' when absent), size and mtime (ns)."""
    import pyarrow.fs as pafs

    fs, base = storage.arrow_path(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=False))
    except (FileNotFoundError, OSError) as exc:
        raise StorageNotFoundError(f"input {root} cannot be listed: {exc}") from exc
    files = {info.path: info for info in infos if info.type == pafs.FileType.File}
    items = []
    for path, info in sorted(files.items()):
        stem, ext = posixpath.splitext(path)
        if ext.lower() not in VIDEO_EXTENSIONS:
            continue
        sidecar = stem + ".json"
        items.append({"source": _to_uri(root, base, path), "size": int(info.size),
                      "mtime": int(info.mtime_ns or 0),
                      "sidecar": _to_uri(root, base, sidecar) if sidecar in files else ""})
    return items


def _to_uri(root: str, base: str, path: str) -> str:
    """Arrow path back to a URI in the same spelling as `root` (s3://... or the local root given)."""
    return root.rstrip("/") + path[len(base.rstrip("/")):]


def read_manifest(storage: Storage, output: str) -> dict[str, Any]:
    """The output's manifest, or an empty one for a fresh output."""
    try:
        return storage.read_json(storage.join(output, MANIFEST_FILE))
    except StorageNotFoundError:
        return {"version": 1, "runs": [], "shards": [], "sources": {}, "counts": {}}


def plan_inputs(items: list[dict], manifest: dict, retry_failed: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """Split inputs into (pending, skipped, changed): done = same size+mtime in the manifest.

    A changed input whose clips are already in the shards is not re-run (that would duplicate its
    clips); it becomes an error row asking for a fresh output instead.
    """
    pending, skipped, changed = [], [], []
    for item in items:
        entry = manifest["sources"].get(item["source"])
        if entry is None or (retry_failed and entry["status"] == "failed"):
            pending.append(item)
        elif (entry["size"], entry["mtime"]) == (item["size"], item["mtime"]):
            skipped.append(item)
        elif entry["clips"] == 0:
            pending.append(item)
        else:
            changed.append(item)
    return pending, skipped, changed


# Fields that shape the shard columns: every run into one output must agree on them.
_SHARD_SHAPING = ("clip_frames", "stride", "fps", "width", "height", "fit", "latent_spatial_factor",
                  "motion_delta", "audio", "face", "vae.enabled", "vae.path")


def check_compatible(cfg: PreprocessConfig, manifest: dict) -> None:
    """Refuse to add shards of another geometry to an output (readers expect one fixed schema)."""
    if not manifest.get("config"):
        return
    new, old = cfg.model_dump(mode="json"), manifest["config"]
    for dotted in _SHARD_SHAPING:
        section, _, key = dotted.partition(".")
        before, after = old.get(section), new.get(section)
        if key:
            before, after = (before or {}).get(key), (after or {}).get(key)
        if before != after:
            raise ValueError(f"{cfg.output} holds shards made with {dotted}={before!r}; this run has {after!r}. "
                             "Use a fresh output for a different geometry.")
    stored = manifest.get("store_pixels", True)  # outputs from before the option kept every clip's pixels
    if manifest.get("runs") and stored != cfg.stores_pixels:
        raise ValueError(f"{cfg.output} holds shards written with store_pixels={stored}; this run resolves it to "
                         f"{cfg.stores_pixels}: one output keeps one shard schema. Use a fresh output.")
    if "split" in old and old["split"] != new["split"]:  # outputs from before split rules have none to compare
        raise ValueError(f"{cfg.output} holds clips split by split={old['split']!r}; this run has {new['split']!r}: "
                         "one output keeps one split rule (a video must not move between train and heldout)")


def check_encoding(cfg: PreprocessConfig, manifest: dict) -> None:
    """Refuse to add shards to an output whose shards use another tensor encoding (`artifacts.tables`)."""
    found = manifest.get("shard_encoding", "ray-tensor-extension")  # what runs before the field wrote
    if manifest["runs"] and found != shards.ENCODING:
        raise ValueError(f"{cfg.output} holds shards encoded as {found!r}; this version writes {shards.ENCODING!r} "
                         "and one output cannot mix them. Use a fresh output (its shards stay readable).")


def _next_run_name(storage: Storage, output: str, manifest: dict) -> str:
    """run-NNNN after every run in the manifest and every run folder present (crashed runs included)."""
    import pyarrow.fs as pafs

    fs, base = storage.arrow_path(output)
    numbers = [int(m.group(1)) for r in manifest["runs"] if (m := _RUN_DIR.match(r["run"]))]
    try:
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True)):
            if info.type == pafs.FileType.Directory and (m := _RUN_DIR.match(posixpath.basename(info.path))):
                numbers.append(int(m.group(1)))
    except OSError:
        pass  # an S3 prefix that does not exist yet lists as an error on some stores
    return f"run-{max(numbers, default=0) + 1:04d}"


def build_dataset(cfg: PreprocessConfig, pending: list[dict], shard_dir: str):
    """The streaming pipeline: inputs -> clips -> audio -> pose -> face -> motion -> [VAE] -> shards."""
    import ray

    # One task per `videos_per_task` inputs runs decode and every CPU stage (`udfs.process_videos`);
    # without the VAE it writes the shards too, so only summary rows leave the task.
    ds = ray.data.from_items(pending, override_num_blocks=max(1, len(pending)))
    if not cfg.vae.enabled:
        return ds.map_batches(udfs.process_videos, fn_kwargs={"cfg": cfg, "shard_dir": shard_dir},
                              batch_size=cfg.videos_per_task)
    ds = ds.map_batches(udfs.process_videos, fn_kwargs={"cfg": cfg}, batch_size=cfg.videos_per_task)
    ds = ds.map_batches(udfs.VaeEncoder, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.vae.batch_size,
                        compute=ray.data.ActorPoolStrategy(min_size=cfg.vae.min_actors, max_size=cfg.vae.max_actors),
                        num_cpus=cfg.vae.num_cpus, num_gpus=_vae_gpus(cfg))
    # After the VAE's actor pool rows are re-batched into full shards.
    return ds.map_batches(udfs.write_shard, fn_kwargs={"cfg": cfg, "shard_dir": shard_dir}, batch_size=cfg.shard_clips)


@contextlib.contextmanager
def _data_context(cfg: PreprocessConfig):
    """This job's Ray Data settings for the datasets built inside; the driver's previous ones restored after."""
    import ray

    ctx = ray.data.DataContext.get_current()
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = cfg.reserve_operator_resources
    try:
        yield
    finally:
        ctx.op_resource_reservation_enabled = saved


def _vae_gpus(cfg: PreprocessConfig) -> float:
    import ray

    if cfg.vae.num_gpus is not None:
        return cfg.vae.num_gpus
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _collect(ds) -> list[dict[str, Any]]:
    """Run the stream; log each source as its rows come back; return all summary rows."""
    rows: list[dict[str, Any]] = []
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        part = batch.to_pylist()
        rows.extend(part)
        done = Counter(r["source"] for r in part if not r["error_stage"])
        log.info("written: %s", ", ".join(f"{posixpath.basename(s)} +{n}" for s, n in done.items()) or "-")
    return rows


def _source_entries(rows: list[dict], items: list[dict], run_name: str) -> dict[str, dict]:
    """Manifest entry per processed source: status ok / partial / failed, clip count, errors, hash."""
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    entries = {}
    for item in items:
        got = by_source.get(item["source"], [])
        clips = sum(1 for r in got if not r["error_stage"])
        errors = [{"clip_index": r["clip_index"], "stage": r["error_stage"], "reason": r["error_reason"]}
                  for r in got if r["error_stage"]]
        if not got:
            errors = [{"clip_index": -1, "stage": "pipeline", "reason": "no row came back for this input"}]
        status = "failed" if clips == 0 else ("partial" if errors else "ok")
        sha = next((r["source_sha256"] for r in got if r["source_sha256"]), "")
        entries[item["source"]] = {"status": status, "size": item["size"], "mtime": item["mtime"],
                                   "sha256": sha, "sidecar": item["sidecar"], "clips": clips,
                                   "errors": errors, "run": run_name}
    return entries


def _write_errors(storage: Storage, uri: str, entries: dict, changed: list[dict], rows: list[dict]) -> int:
    """errors.parquet beside the shards: one row per (source, clip) failure; returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    video_ids = {r["source"]: r["video_id"] for r in rows}
    records = [{"source": src, "video_id": video_ids.get(src, posixpath.splitext(posixpath.basename(src))[0]),
                "clip_index": e["clip_index"], "stage": e["stage"], "reason": e["reason"]}
               for src, entry in entries.items() for e in entry["errors"]]
    records += [{"source": c["source"], "video_id": posixpath.splitext(posixpath.basename(c["source"]))[0],
                 "clip_index": -1, "stage": "resume",
                 "reason": "input changed since it was processed (size/mtime differ); its clips are already "
                           "in the shards, so it is not re-run: write to a fresh output to reprocess"}
                for c in changed]
    schema = pa.schema([("source", pa.string()), ("video_id", pa.string()), ("clip_index", pa.int64()),
                        ("stage", pa.string()), ("reason", pa.string())])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return len(records)


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Run the job on the Ray already initialised (see `main`); return and print the summary."""
    storage = Storage(cfg.storage)
    started = time.time()
    manifest = read_manifest(storage, cfg.output)
    check_compatible(cfg, manifest)
    items = list_inputs(storage, cfg.input)
    pending, skipped, changed = plan_inputs(items, manifest, cfg.retry_failed)
    log.info("%d inputs under %s: %d to process, %d already done, %d changed since done",
             len(items), cfg.input, len(pending), len(skipped), len(changed))
    if not pending and not changed:
        return _finish(cfg, {"run": None, "videos_ok": 0, "videos_failed": 0, "videos_partial": 0,
                             "videos_skipped": len(skipped), "clips_written": 0, "error_rows": 0, "shards": [],
                             "stage_seconds": {}})
    check_encoding(cfg, manifest)
    check_pose_models(cfg, storage)  # an empty model cache fails here, naming the command that fills it
    run_name = _next_run_name(storage, cfg.output, manifest)
    run_dir = storage.join(cfg.output, run_name)
    with _data_context(cfg):
        rows = _collect(build_dataset(cfg, pending, storage.join(run_dir, "shards"))) if pending else []
    entries = _source_entries(rows, pending, run_name)
    error_count = _write_errors(storage, storage.join(run_dir, "errors.parquet"), entries, changed, rows)
    written = sorted({posixpath.join(run_name, "shards", r["shard"]) for r in rows if r["shard"]})
    statuses = Counter(e["status"] for e in entries.values())
    summary = {"run": run_name, "videos_ok": statuses["ok"], "videos_failed": statuses["failed"] + len(changed),
               "videos_partial": statuses["partial"], "videos_skipped": len(skipped),
               "clips_written": sum(e["clips"] for e in entries.values()), "error_rows": error_count,
               "shards": written, "stage_seconds": _stage_seconds(rows)}
    _update_manifest(storage, cfg, manifest, entries, summary, started)
    return _finish(cfg, summary)


def _update_manifest(storage: Storage, cfg: PreprocessConfig, manifest: dict, entries: dict,
                     summary: dict, started: float) -> None:
    """Append this run and its sources to the manifest and write it LAST (after shards and errors)."""
    run_name = summary["run"]
    manifest["runs"].append({
        "run": run_name, "started": _iso(started), "finished": _iso(time.time()),
        "config": cfg.model_dump(mode="json"), "shards": summary["shards"],
        "errors": posixpath.join(run_name, "errors.parquet"),
        "counts": {k: v for k, v in summary.items() if k not in ("run", "shards", "stage_seconds")},
        "stage_seconds": summary["stage_seconds"]})
    manifest["sources"].update(entries)
    manifest["shards"] = sorted(set(manifest["shards"]) | set(summary["shards"]))
    manifest["config"] = cfg.model_dump(mode="json")
    manifest["shard_encoding"] = shards.ENCODING
    manifest["store_pixels"] = cfg.stores_pixels  # resolved (config.store_pixels may be None = auto)
    manifest["schema"] = _schema_doc(cfg)
    statuses = Counter(e["status"] for e in manifest["sources"].values())
    manifest["counts"] = {"videos": len(manifest["sources"]), **{f"videos_{k}": v for k, v in statuses.items()},
                          "clips": sum(e["clips"] for e in manifest["sources"].values()),
                          "shards": len(manifest["shards"])}
    storage.write_json(storage.join(cfg.output, MANIFEST_FILE), manifest)


def _schema_doc(cfg: PreprocessConfig) -> dict[str, str]:
    """Column -> 'dtype shape' of the shards, as in docs/design.md, with this config's sizes."""
    t, h, w, f = cfg.clip_frames, cfg.height, cfg.width, cfg.latent_spatial_factor
    feats = cfg.audio.features
    samples = round(t * feats.sample_rate / cfg.fps)
    doc = {"video_id": "string", "clip_index": "int64", "source": "string", "identity_id": "string",
           "split": "string", "start_frame": "int64", "fps": "float64",
           "frames": f"uint8 ({t}, {h}, {w}, 3)", "ref_frame": f"uint8 ({h}, {w}, 3)",
           "keypoints": f"float32 ({t}, 17, 3)", "pose": f"uint8 ({t}, {h}, {w}, 3)",
           "audio": f"float32 ({samples},)", "audio_feats": f"float32 ({t}, {feats.window}, {feats.n_mels})",
           "has_audio": "bool", "face_boxes": f"float32 ({t}, 4)",
           "face_crops": f"uint8 ({t}, {cfg.face.size}, {cfg.face.size}, 3)", "has_face": "bool",
           "ref_face_box": "float32 (4,)", "ref_face_crop": f"uint8 ({cfg.face.size}, {cfg.face.size}, 3)",
           "has_ref_face": "bool",
           "motion_mask": f"float32 ({t}, {h // f}, {w // f})", "mouth_openness": f"float32 ({t},)"}
    if cfg.vae.enabled:
        doc.update(latents="float32 (C, t, h, w)", ref_latent="float32 (C, 1, h, w)",
                   ref_face_latent="float32 (C, 1, hf, wf)")
    if not cfg.stores_pixels:
        doc.update({name: f"{doc[name]}, null in train rows (store_pixels: false)" for name in PIXEL_COLUMNS})
    return doc


def _stage_seconds(rows: list[dict]) -> dict[str, float]:
    """Task seconds per step summed over the run (`udfs.TIMING_PREFIX` columns), in pipeline order
    (decode, then the pose/face models on the detection stream when they ran, then the stages)."""
    totals: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(udfs.TIMING_PREFIX) and value is not None:
                step = key[len(udfs.TIMING_PREFIX):]
                totals[step] = totals.get(step, 0.0) + value
    order = ["decode", *udfs.MODEL_STEPS]
    steps = [s for s in order if s in totals] + [s for s in totals if s not in order]
    return {step: round(totals[step], 4) for step in steps
            if not (step in udfs.MODEL_STEPS and totals[step] == 0)}


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat(timespec="seconds")


def _finish(cfg: PreprocessConfig, summary: dict) -> dict:
    line = (f"preprocess {cfg.output}: videos ok {summary['videos_ok']}, failed {summary['videos_failed']}, "
            f"partial {summary['videos_partial']}, skipped {summary['videos_skipped']}; "
            f"clips written {summary['clips_written']}; error rows {summary['error_rows']}")
    steps = summary["stage_seconds"]
    if steps:  # where the workers' time went: the step to optimise first
        total = sum(steps.values()) or 1.0
        line += "\ntask time by step: " + ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in steps.items())
    log.info(line)
    print(line, flush=True)
    return summary
