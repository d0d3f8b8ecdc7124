"""The node-local model cache (`core.model_cache`) on moto's S3 server: plain-sync folders load, N processes
download once (counted by the server's own request log), a new ETag is a new entry, pruning spares entries in use."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
import urllib.request
from pathlib import Path

import pytest

from core.model_cache import ENTRY_FILE, cached_folder, cache_root
from core.storage import MANIFEST_NAME, Storage, StorageConfig, StorageError

ASSETS = Path(__file__).resolve().parents[1] / "model" / "assets"


@pytest.fixture
def cache_storage(s3_server, tmp_path) -> Storage:
    """A storage on the moto server whose model cache lives in this test's temp dir."""
    return Storage(StorageConfig(endpoint_url=s3_server.endpoint_url, model_cache_dir=str(tmp_path / "cache")))


def _put_plain(s3_server, uri: str, files: dict[str, bytes]) -> None:
    """Upload with plain boto3 PUTs, as `aws s3 sync` would: no _MANIFEST.json."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = s3_server.client()
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)


class _ServerLog:
    """moto's request recorder pointed at a temp file: every request the server answered, from any process."""

    def __init__(self, s3_server, path: Path, monkeypatch):
        from moto.moto_api import recorder

        monkeypatch.setattr(recorder, "_location", str(path))
        self.endpoint, self.path = s3_server.endpoint_url, path
        path.write_text("")

    def _post(self, action: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{action}", method="POST"))

    def __enter__(self):
        self._post("start-recording")
        return self

    def __exit__(self, *exc):
        self._post("stop-recording")

    def object_gets(self, bucket: str, prefix: str) -> list[str]:
        """URLs of the GetObject requests (not listings) for keys under ``bucket/prefix``."""
        entries = [json.loads(line) for line in self.path.read_text().splitlines() if line]
        return [e["url"] for e in entries if e["method"] == "GET" and f"/{bucket}/{prefix}/" in e["url"]]


def test_plain_sync_folder_loads_and_stays_cached(s3_server, s3_bucket, cache_storage, tmp_path, monkeypatch):
    from artifacts.models import load_denoiser
    from model.presets import ModelConfig, build_denoiser

    uri = f"{s3_bucket}/models/tiny_teacher"
    files = {p.name: p.read_bytes() for p in (ASSETS / "tiny_teacher").iterdir()}
    _put_plain(s3_server, uri, files)
    assert not cache_storage.exists(cache_storage.join(uri, MANIFEST_NAME))
    with _ServerLog(s3_server, tmp_path / "log.jsonl", monkeypatch) as log:
        first = load_denoiser(ModelConfig(pretrained_path=uri), cache_storage)
        again = load_denoiser(ModelConfig(pretrained_path=uri), cache_storage)  # from the cache: no GETs
    assert len(log.object_gets(s3_bucket.removeprefix("s3://"), "models/tiny_teacher")) == len(files)
    local = build_denoiser(ModelConfig(pretrained_path=str(ASSETS / "tiny_teacher"))).state_dict()
    for loaded in (first, again):
        state = loaded.state_dict()
        assert state.keys() == local.keys() and all(bool((state[k] == local[k]).all()) for k in local)
    (entry,) = (cache_root(cache_storage.cfg) / "entries").iterdir()
    assert (entry / "tiny_teacher" / "config.json").read_bytes() == files["config.json"]  # kept after the load
    meta = json.loads((entry / ENTRY_FILE).read_text())
    assert meta["uri"] == uri and not meta["manifest"] and meta["bytes"] == sum(map(len, files.values()))


def _load_in_process(cfg: StorageConfig, uri: str, barrier, results) -> None:
    """A 'rank': wait for the others, then ask the cache for the folder and report what it read."""
    storage = Storage(cfg)
    barrier.wait()
    asked = time.time()
    with cached_folder(storage, uri) as folder:
        digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}
        results.put({"asked": asked, "folder": str(folder), "digest": digest})


def test_concurrent_processes_download_once(s3_server, s3_bucket, cache_storage, tmp_path, monkeypatch):
    uri, n = f"{s3_bucket}/models/big", 4
    files = {f"shard_{i:02d}.bin": bytes([i]) * (1 << 20) for i in range(16)}  # 16 MB: the download takes a while
    _put_plain(s3_server, uri, files)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_load_in_process, args=(cache_storage.cfg, uri, barrier, results)) for _ in range(n)]
    with _ServerLog(s3_server, tmp_path / "log.jsonl", monkeypatch) as log:
        for proc in procs:
            proc.start()
        got = [results.get(timeout=120) for _ in range(n)]
        for proc in procs:
            proc.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * n
    gets = log.object_gets(s3_bucket.removeprefix("s3://"), "models/big")
    assert len(gets) == len(files) and len(set(gets)) == len(files)  # each object fetched once, by one process
    want = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    assert all(r["digest"] == want for r in got) and len({r["folder"] for r in got}) == 1
    meta = json.loads((Path(got[0]["folder"]).parent / ENTRY_FILE).read_text())
    assert meta["downloaded_by"]["pid"] in {p.pid for p in procs}
    # Every process asked before the one download finished: the others waited for it instead of downloading.
    assert max(r["asked"] for r in got) < meta["downloaded_at"]


def test_new_etag_is_a_new_entry_and_prune_spares_entries_in_use(s3_server, s3_bucket, tmp_path):
    cfg = StorageConfig(endpoint_url=s3_server.endpoint_url, model_cache_dir=str(tmp_path / "cache"),
                        model_cache_max_entries=1)
    storage, uri = Storage(cfg), f"{s3_bucket}/models/m"
    _put_plain(s3_server, uri, {"config.json": b'{"v": 1}', "w.bin": b"old weights"})
    with cached_folder(storage, uri) as old:
        assert (old / "w.bin").read_bytes() == b"old weights"
        _put_plain(s3_server, uri, {"w.bin": b"new weights"})  # one object changes: new ETag
        with cached_folder(storage, uri) as new:
            assert new != old and (new / "w.bin").read_bytes() == b"new weights"
            assert (new / "config.json").read_bytes() == b'{"v": 1}'
        assert (old / "w.bin").read_bytes() == b"old weights"  # over the cap, but in use: not pruned
    _put_plain(s3_server, uri, {"w.bin": b"newest"})
    with cached_folder(storage, uri) as newest:
        assert (newest / "w.bin").read_bytes() == b"newest"
        entries = sorted(p.name for p in (tmp_path / "cache" / "entries").iterdir())
    assert entries == [newest.parent.name] and not old.exists() and not new.exists()  # cap of 1 after the download


def test_manifest_folders_are_checked(storage, s3_server, s3_bucket, tmp_path):
    from artifacts.models import local_folder

    storage = Storage(storage.cfg.model_copy(update={"model_cache_dir": str(tmp_path / "cache")}))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"alpha")
    storage.upload_dir(src, f"{s3_bucket}/with_manifest")
    with local_folder(f"{s3_bucket}/with_manifest", storage, require_manifest=True) as folder:
        assert (folder / "a.bin").read_bytes() == b"alpha" and (folder / MANIFEST_NAME).is_file()
    _put_plain(s3_server, f"{s3_bucket}/with_manifest", {"a.bin": b"ALPHA"})  # same size, other bytes
    with pytest.raises(StorageError, match="sha256"):
        with local_folder(f"{s3_bucket}/with_manifest", storage):
            pass
    _put_plain(s3_server, f"{s3_bucket}/plain", {"a.bin": b"x"})
    with pytest.raises(StorageError, match=MANIFEST_NAME):
        with local_folder(f"{s3_bucket}/plain", storage, require_manifest=True):
            pass
