"""Storage on local paths and on a real S3 endpoint (moto's server over HTTP, via boto3 and pyarrow)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import traceback
import urllib.request

import pytest

from core.storage import MANIFEST_NAME, Storage, StorageConfig, StorageError, StorageNotFoundError

from conftest import FAKE_SECRET_KEY


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, storage) -> str:
    """A folder URI on each backend: a temp dir, or a prefix in a fresh moto bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/some/prefix"


def _make_tree(base) -> dict[str, bytes]:
    files = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)) * 3, "sub/deep/c.json": b'{"k": 1}'}
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return files


def test_round_trips(storage, root):
    uri = storage.join(root, "x", "blob.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"\x00\x01payload")
    assert storage.read_bytes(uri) == b"\x00\x01payload"
    assert storage.exists(uri) and storage.is_file(uri)
    assert storage.exists(storage.join(root, "x")) and not storage.is_file(storage.join(root, "x"))
    storage.write_text(storage.join(root, "t.txt"), "héllo")
    assert storage.read_text(storage.join(root, "t.txt")) == "héllo"
    obj = {"b": [1, 2.5, None], "a": {"nested": "yes"}}
    storage.write_json(storage.join(root, "m.json"), obj)
    assert storage.read_json(storage.join(root, "m.json")) == obj
    storage.write_bytes(uri, b"v2")  # overwrite
    assert storage.read_bytes(uri) == b"v2"
    storage.delete(uri)
    assert not storage.exists(uri)
    with pytest.raises(StorageNotFoundError, match="blob.bin"):
        storage.read_bytes(uri)


def test_join_and_scheme(storage):
    assert storage.join("s3://b/x/", "/y/", "z.json") == "s3://b/x/y/z.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("file:///tmp/x")
    with pytest.raises(StorageError, match="gs://b/k"):
        storage.is_s3("gs://b/k")


def test_list_with_suffix_filter(storage, root):
    for rel in ["v1.mp4", "v1.json", "nested/v2.mp4", "nested/deeper/v3.MP4", "notes.txt"]:
        storage.write_bytes(storage.join(root, rel), rel.encode())
    all_files = storage.list(root)
    assert all_files == sorted(storage.join(root, r) for r in
                               ["v1.mp4", "v1.json", "nested/v2.mp4", "nested/deeper/v3.MP4", "notes.txt"])
    assert storage.list(root, suffixes=[".mp4"]) == [storage.join(root, "nested/v2.mp4"), storage.join(root, "v1.mp4")]
    assert storage.list(root, suffixes=".json", recursive=False) == [storage.join(root, "v1.json")]
    assert storage.list(root, recursive=False) == sorted(storage.join(root, r) for r in ["v1.mp4", "v1.json", "notes.txt"])
    assert storage.read_bytes(storage.list(root, suffixes=".MP4")[0]) == b"nested/deeper/v3.MP4"
    assert storage.list(storage.join(root, "missing")) == []


def test_local_write_is_atomic_on_crash(tmp_path, monkeypatch):
    storage = Storage()
    target = tmp_path / "state.json"
    storage.write_bytes(str(target), b"old complete content")

    def crash(fd):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        storage.write_bytes(str(target), b"new content that never lands")
    assert target.read_bytes() == b"old complete content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # no temp leftovers


def test_dir_round_trip_with_manifest(storage, root, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    dst_uri = storage.join(root, "ckpt")
    manifest = storage.upload_dir(src, dst_uri)
    assert [e["path"] for e in manifest["files"]] == sorted(files)
    assert {e["path"]: e["size"] for e in manifest["files"]} == {k: len(v) for k, v in files.items()}
    assert {e["path"]: e["sha256"] for e in manifest["files"]} == {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}
    assert storage.dir_complete(dst_uri)
    assert storage.read_json(storage.join(dst_uri, MANIFEST_NAME)) == manifest
    out = storage.download_dir(dst_uri, tmp_path / "out")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()
            and p.name != MANIFEST_NAME} == files
    # Re-upload of a smaller tree replaces the folder: stale files are gone.
    (src / "sub" / "b.bin").unlink()
    storage.upload_dir(src, dst_uri)
    assert sorted(storage.list(dst_uri)) == sorted(storage.join(dst_uri, r) for r in
                                                   ["a.txt", "sub/deep/c.json", MANIFEST_NAME])
    assert storage.dir_complete(dst_uri)


def test_s3_crash_mid_upload_dir_never_looks_complete(storage, s3_bucket, tmp_path, monkeypatch):
    src = tmp_path / "src"
    _make_tree(src)
    dst_uri = f"{s3_bucket}/ckpt"
    storage.upload_dir(src, dst_uri)
    assert storage.dir_complete(dst_uri)
    real_upload = storage.upload_file
    calls = []

    def upload_then_crash(local, uri):
        calls.append(uri)
        if len(calls) == 2:
            raise KeyboardInterrupt("worker killed")  # not an OSError: nothing may catch it
        real_upload(local, uri)

    monkeypatch.setattr(storage, "upload_file", upload_then_crash)
    with pytest.raises(KeyboardInterrupt):
        storage.upload_dir(src, dst_uri)
    assert len(calls) == 2
    assert storage.exists(storage.join(dst_uri, "a.txt"))  # a half folder is there ...
    assert not storage.exists(storage.join(dst_uri, MANIFEST_NAME))
    assert not storage.dir_complete(dst_uri)  # ... but it does not look complete
    with pytest.raises(StorageError, match="ckpt.*_MANIFEST"):
        storage.download_dir(dst_uri, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_local_crash_mid_upload_dir_keeps_old_folder(tmp_path, monkeypatch):
    storage = Storage()
    src = tmp_path / "src"
    _make_tree(src)
    dst = tmp_path / "published"
    storage.upload_dir(src, str(dst))
    (src / "a.txt").write_bytes(b"new version")
    real_copy = shutil.copyfile
    calls = []

    def copy_then_crash(a, b, **kw):
        calls.append(b)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_copy(a, b, **kw)

    monkeypatch.setattr(shutil, "copyfile", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        storage.upload_dir(src, str(dst))
    monkeypatch.undo()
    assert (dst / "a.txt").read_bytes() == b"alpha" and storage.dir_complete(str(dst))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published", "src"]  # staging removed


def test_dir_complete_detects_truncation_and_hash_mismatch(storage, s3_bucket, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    uri = f"{s3_bucket}/model"
    storage.upload_dir(src, uri)
    storage.write_bytes(f"{uri}/a.txt", b"alp")  # truncated
    assert not storage.dir_complete(uri)
    storage.write_bytes(f"{uri}/a.txt", b"ALPHA")  # same size, wrong bytes
    assert storage.dir_complete(uri)  # sizes match: the cheap check passes ...
    with pytest.raises(StorageError, match="a.txt does not match its sha256"):
        storage.download_dir(uri, tmp_path / "out")  # ... the download verifies content
    assert not (tmp_path / "out").exists()
    assert len(files) == 3


def test_multipart_upload_above_threshold(s3_server, s3_bucket, tmp_path):
    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url, multipart_threshold_mb=5,
                                    multipart_chunk_mb=5, max_concurrency=2))
    data = os.urandom(12 * 2**20 + 123)
    (tmp_path / "big.bin").write_bytes(data)
    uri = f"{s3_bucket}/weights/big.bin"
    storage.upload_file(tmp_path / "big.bin", uri)
    bucket, key = uri[5:].split("/", 1)
    etag = s3_server.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert etag.endswith("-3")  # S3's multipart ETag: 3 parts of 5, 5 and 2 MiB
    back = storage.download_file(uri, tmp_path / "back.bin")
    assert back.read_bytes() == data
    small = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))  # default threshold: single PUT
    small.upload_file(tmp_path / "big.bin", uri)
    etag = s3_server.client().head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    assert etag == hashlib.md5(data).hexdigest()


def test_presigned_url_serves_bytes(storage, s3_bucket):
    uri = f"{s3_bucket}/out/video.mp4"
    storage.write_bytes(uri, b"\x00\x00\x00\x18ftypmp42 fake mp4")
    url = storage.presigned_url(uri, expires_s=120)
    assert url.startswith(storage.cfg.endpoint_url) and FAKE_SECRET_KEY not in url
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"\x00\x00\x00\x18ftypmp42 fake mp4"
    with pytest.raises(StorageError, match="only s3://"):
        storage.presigned_url("/tmp/local.mp4")


def test_pyarrow_parquet_on_s3_and_endpoint_from_env(storage, s3_bucket, s3_server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"video_id": ["a", "b", "c"], "clip_index": [0, 1, 2], "fps": [16.0, 16.0, 25.0]})
    fs, path = storage.arrow_path(f"{s3_bucket}/shards/part-0.parquet")
    assert path == f"{s3_bucket[5:]}/shards/part-0.parquet"
    pq.write_table(table, path, filesystem=fs)
    assert storage.list(f"{s3_bucket}/shards", suffixes=".parquet") == [f"{s3_bucket}/shards/part-0.parquet"]
    # With no endpoint in the config, both clients take AWS_ENDPOINT_URL (pyarrow alone would not).
    from_env = Storage(StorageConfig())
    assert from_env.client.meta.endpoint_url == s3_server.endpoint_url
    env_fs, env_path = from_env.arrow_path(f"{s3_bucket}/shards")
    assert pq.read_table(env_path, filesystem=env_fs).to_pydict() == table.to_pydict()
    assert FAKE_SECRET_KEY.encode() not in pickle.dumps(env_fs)  # shipped to Ray workers as is
    local_fs, local_path = storage.arrow_path("relative/dir")
    assert type(local_fs).__name__ == "LocalFileSystem" and os.path.isabs(local_path)


def test_local_copy(storage, s3_bucket, tmp_path):
    src = tmp_path / "src"
    files = _make_tree(src)
    storage.upload_dir(src, f"{s3_bucket}/pretrained")
    with storage.local_copy(f"{s3_bucket}/pretrained") as local:
        assert local.is_dir() and (local / "sub/deep/c.json").read_bytes() == files["sub/deep/c.json"]
    assert not local.exists()
    with storage.local_copy(f"{s3_bucket}/pretrained/a.txt") as one:
        assert one.name == "a.txt" and one.read_bytes() == b"alpha"
    with storage.local_copy(str(src)) as same:
        assert same == src
    storage.write_bytes(f"{s3_bucket}/raw/x.bin", b"1")  # no manifest: refused unless asked
    with pytest.raises(StorageError, match="raw"):
        with storage.local_copy(f"{s3_bucket}/raw"):
            pass
    with storage.local_copy(f"{s3_bucket}/raw", require_manifest=False) as raw:
        assert (raw / "x.bin").read_bytes() == b"1"


def test_delete_folder(storage, s3_bucket, tmp_path):
    _make_tree(tmp_path / "src")
    storage.upload_dir(tmp_path / "src", f"{s3_bucket}/d")
    storage.write_bytes(f"{s3_bucket}/keep.txt", b"k")
    storage.delete(f"{s3_bucket}/d")
    assert storage.list(s3_bucket) == [f"{s3_bucket}/keep.txt"]
    with pytest.raises(StorageError, match="whole bucket"):
        storage.delete(s3_bucket)


def test_errors_name_uri_never_credentials(storage, s3_server):
    uri = "s3://no-such-bucket-xyz/private/data.bin"
    with pytest.raises(StorageNotFoundError) as info:
        storage.read_bytes(uri)
    rendered = "".join(traceback.format_exception(info.value))
    assert uri in str(info.value)
    assert FAKE_SECRET_KEY not in rendered and s3_server.access_key not in rendered
    with pytest.raises(StorageError) as info:
        storage.write_bytes(uri, b"x")
    assert uri in str(info.value) and FAKE_SECRET_KEY not in str(info.value)
    assert FAKE_SECRET_KEY not in repr(storage) and FAKE_SECRET_KEY not in repr(storage.cfg)


def test_storage_pickles_for_ray_tasks(storage, s3_bucket):
    storage.write_bytes(f"{s3_bucket}/p.txt", b"before")  # builds the (unpicklable) boto3 client
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.cfg == storage.cfg
    assert clone.read_bytes(f"{s3_bucket}/p.txt") == b"before"
    assert FAKE_SECRET_KEY.encode() not in pickle.dumps(storage)


def test_config_validation():
    with pytest.raises(ValueError, match="endpoint_url"):
        StorageConfig(endpoint_url="127.0.0.1:9000")
    with pytest.raises(ValueError, match="multipart_chunk_mb"):
        StorageConfig(multipart_chunk_mb=1)
    with pytest.raises(ValueError, match="access_key"):
        StorageConfig(access_key="x")  # credentials are not config
    assert json.loads(StorageConfig(region="eu-west-1").model_dump_json())["region"] == "eu-west-1"
