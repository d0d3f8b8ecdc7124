"""Node-local cache of remote (``s3://``) model folders: downloaded once per node, shared by its ranks.

Why: 8 ranks on a node each loading a 14B model (~60 GB) used to download it 8 times into temporary
folders that were deleted after the load. Now the first process on the node downloads it; the others
wait for that download and read the same files; the next job on the node reuses them.

Layout under the cache root (`StorageConfig.model_cache_dir`, default
``<system temp dir>/human-animation-model-cache``; it must be on a node-local disk, as ``flock``
is not reliable on network filesystems):

    entries/<key>/entry.json        uri, endpoint, the listing (path -> ETag, size), bytes; its mtime = last use
    entries/<key>/<folder name>/... the files, what loaders read (the folder keeps its remote name)
    locks/<key>.lock                 the entry's lock (empty; never deleted, see `_lock_file`)

Key: sha256 of the endpoint, the URI and every object's (path, ETag, size) from one listing, so a
changed object (new ETag) is a new entry and a stale one is never read. Folders without
``_MANIFEST.json`` (a plain ``aws s3 sync``) are cached as listed; with a manifest its files must be
present with their sizes before, and match their sha256 after, the download.

Concurrency (``fcntl.flock``, released by the kernel when a process dies, so a crashed download
leaves no stale lock): readers hold the entry lock shared while they use the entry; the downloader
holds it exclusive, downloads into ``entries/.tmp-<key>-*`` and renames that into place (atomic), so
an entry that exists is complete. After the download the listing is read again: an object that
changed meanwhile fails the load loudly instead of caching other bytes under the old key.

Pruning: after each download, least recently used entries beyond `model_cache_max_entries` (and
`model_cache_max_gb` when set) are deleted; entries in use (lock held shared) are skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from core.storage import MANIFEST_NAME, Storage, StorageConfig, StorageError, StorageNotFoundError, sha256_file

__all__ = ["cache_root", "entry_key", "cached_folder", "prune", "ENTRY_FILE"]

ENTRY_FILE = "entry.json"
_DEFAULT_DIR = "human-animation-model-cache"
_ATTEMPTS = 3  # an entry pruned between our check and our shared lock is downloaded again


def cache_root(cfg: StorageConfig) -> Path:
    """The configured cache folder, or the default under the system temp dir (resolved now, not at import)."""
    return Path(cfg.model_cache_dir) if cfg.model_cache_dir else Path(tempfile.gettempdir()) / _DEFAULT_DIR


def entry_key(uri: str, endpoint: str | None, objects: dict[str, dict[str, Any]]) -> str:
    """Hex id of a folder's content: endpoint + URI + every (path, ETag, size); any change gives a new key."""
    listing = sorted((rel, obj["etag"], int(obj["size"])) for rel, obj in objects.items())
    blob = json.dumps({"endpoint": endpoint, "uri": uri.rstrip("/"), "objects": listing})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@contextlib.contextmanager
def _lock_file(root: Path, key: str) -> Iterator[int]:
    """An open fd on ``locks/<key>.lock``. Lock files are never unlinked: a process that opened the old
    inode and one that created a new file at the same path would otherwise both 'hold' the lock."""
    (root / "locks").mkdir(parents=True, exist_ok=True)
    fd = os.open(root / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield fd
    finally:
        os.close(fd)  # releases any flock held on it


@contextlib.contextmanager
def cached_folder(storage: Storage, uri: str) -> Iterator[Path]:
    """A local folder with the content of ``s3://`` folder ``uri``, from the node's cache (downloaded once).

    The entry is locked shared while the caller uses it, so a concurrent prune never deletes it.
    """
    text = os.fspath(uri).rstrip("/")
    objects = _listing(storage, text)
    if not objects:
        raise StorageNotFoundError(f"model cache: {text} holds no objects (no such folder)")
    root = cache_root(storage.cfg)
    key = entry_key(text, storage.resolved_endpoint(), objects)
    entry = root / "entries" / key
    with _lock_file(root, key) as fd:
        for _ in range(_ATTEMPTS):
            downloaded = False
            if not entry.is_dir():
                fcntl.flock(fd, fcntl.LOCK_EX)  # one downloader per key on this node; the others wait here
                if not entry.is_dir():
                    _download_entry(storage, text, objects, entry)
                    downloaded = True
            fcntl.flock(fd, fcntl.LOCK_SH)  # converts an exclusive lock; from here no prune can delete it
            if entry.is_dir():
                break
        else:
            raise StorageError(f"model cache: {entry} kept disappearing (pruned by another process?)")
        os.utime(entry / ENTRY_FILE)  # last use, for pruning
        if downloaded:
            _prune_after_download(storage.cfg, root, keep=entry)
        yield entry / _folder_name(text)


def _listing(storage: Storage, uri: str) -> dict[str, dict[str, Any]]:
    """The folder's objects; zero-byte ``dir/`` markers some tools write are not files."""
    return {rel: obj for rel, obj in storage.object_versions(uri).items() if rel and not rel.endswith("/")}


def _folder_name(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) or "root"


def _download_entry(storage: Storage, uri: str, objects: dict[str, dict[str, Any]], entry: Path) -> None:
    """Download ``objects`` into a temp sibling of ``entry``, check them, write entry.json, rename into place."""
    manifest = _checked_manifest(storage, uri, objects)
    total = sum(int(o["size"]) for o in objects.values())
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(entry)
    free = shutil.disk_usage(entry.parent).free
    if free < total:
        raise StorageError(f"model cache: {uri} needs {total / 1e9:.1f} GB, {entry.parent} has {free / 1e9:.1f} GB "
                           "free (set storage.model_cache_dir to a larger node-local disk or lower the cache caps)")
    staging = entry.parent / f".tmp-{entry.name}-{uuid.uuid4().hex[:12]}"
    try:
        folder = staging / _folder_name(uri)
        for rel in sorted(objects):
            storage.download_file(storage.join(uri, rel), folder / rel)
        _check_download(storage, uri, objects, folder, manifest)
        meta = {"uri": uri, "endpoint": storage.resolved_endpoint(), "objects": objects, "bytes": total,
                "manifest": manifest is not None, "downloaded_at": time.time(),
                "downloaded_by": {"host": socket.gethostname(), "pid": os.getpid()}}
        (staging / ENTRY_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        os.rename(staging, entry)  # atomic: an entry that exists is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _checked_manifest(storage: Storage, uri: str, objects: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The folder's manifest when it has one, after checking its files are listed with their sizes."""
    if MANIFEST_NAME not in objects:
        return None  # a folder written by a plain sync: its listing is all we know
    manifest = storage.read_manifest(uri)
    bad = [e["path"] for e in manifest["files"] if objects.get(e["path"], {}).get("size") != e["size"]]
    if bad:
        raise StorageError(f"model cache: {uri}: files listed in {MANIFEST_NAME} are missing or truncated: {bad[:5]}")
    return manifest


def _check_download(storage: Storage, uri: str, objects: dict[str, dict[str, Any]], folder: Path,
                    manifest: dict[str, Any] | None) -> None:
    """Loud errors for bytes that are not the listed content: a re-listing that differs, a sha256 mismatch."""
    if _listing(storage, uri) != objects:
        raise StorageError(f"model cache: {uri} changed while it was downloaded; load it again")
    for entry in (manifest or {}).get("files", []):
        if sha256_file(folder / entry["path"]) != entry["sha256"]:
            raise StorageError(f"model cache: {uri}: {entry['path']} does not match its sha256 in {MANIFEST_NAME}")


def _remove_stale_staging(entry: Path) -> None:
    """Temp folders of this key's crashed downloads (we hold the key's exclusive lock: none is live)."""
    for stale in entry.parent.glob(f".tmp-{entry.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _prune_after_download(cfg: StorageConfig, root: Path, keep: Path) -> None:
    max_bytes = None if cfg.model_cache_max_gb is None else int(cfg.model_cache_max_gb * 1e9)
    prune(root, cfg.model_cache_max_entries, max_bytes, keep=keep)


def _entries_by_last_use(root: Path) -> list[tuple[Path, int]]:
    """(entry, bytes) of every complete entry, most recently used first."""
    found = []
    for entry in (root / "entries").glob("*"):
        meta = entry / ENTRY_FILE
        if entry.name.startswith(".") or not meta.is_file():
            continue
        found.append((meta.stat().st_mtime, entry, int(json.loads(meta.read_text()).get("bytes", 0))))
    return [(entry, size) for _, entry, size in sorted(found, key=lambda item: item[0], reverse=True)]


def prune(root: Path, max_entries: int, max_bytes: int | None = None, keep: Path | None = None) -> list[Path]:
    """Delete least recently used entries until at most ``max_entries`` (and ``max_bytes``) remain.

    ``keep`` is never deleted; nor is an entry in use (its lock is held shared). Returns what was deleted.
    """
    for trash in (root / "entries").glob(".trash-*"):  # left by a prune that was killed mid-delete
        shutil.rmtree(trash, ignore_errors=True)
    entries = _entries_by_last_use(root)
    count, total = len(entries), sum(size for _, size in entries)
    deleted = []
    for entry, size in reversed(entries):  # oldest first
        over = count > max_entries or (max_bytes is not None and total > max_bytes)
        if not over:
            break
        if entry != keep and _delete_if_unused(root, entry):
            deleted.append(entry)
            count, total = count - 1, total - size
    return deleted


def _delete_if_unused(root: Path, entry: Path) -> bool:
    """Move ``entry`` aside and delete it, under its exclusive lock taken without waiting; False if in use."""
    with _lock_file(root, entry.name) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        trash = entry.parent / f".trash-{entry.name}-{uuid.uuid4().hex[:12]}"
        os.rename(entry, trash)  # gone for new readers at once; they download it again if they need it
    shutil.rmtree(trash, ignore_errors=True)
    return True
