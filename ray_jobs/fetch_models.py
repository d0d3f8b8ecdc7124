"""Fill the pose/face model cache: ``python -m ray_jobs.fetch_models [--cache DIR|s3://...]``.

Why a command and not a dependency: MediaPipe's BlazePose and BlazeFace ``.tflite`` models ship inside
the ``mediapipe==0.10.21`` wheel, which pins numpy<2 and protobuf<5 (ours: numpy>=2.4, protobuf 5+).
So the wheel is only *downloaded* (``pip download --no-deps``, pip's own index and proxy settings),
opened as the zip it is, and the four models (`model.blazepose.MODEL_FILES`) are written to the cache
with ``models.json``: each file's sha256 plus the wheel's name and sha256. The models then run through
LiteRT (``ai-edge-litert``), which fits our dependency set (`model.blazepose`).

Idempotent: a cache whose ``models.json`` lists every file with a matching sha256 is left alone
(``make test`` / ``make demo`` call this before running). Default cache: ``~/.cache/human-animation/
mediapipe`` (``$XDG_CACHE_HOME`` honoured), resolved when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.storage import Storage, StorageConfig, StorageError
from model.blazepose import MEDIAPIPE_WHEEL, MODEL_FILES, MODELS_JSON, default_model_dir

__all__ = ["fetch_models", "cache_is_complete", "download_wheel", "extract_models", "main"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_is_complete(storage: Storage, cache: str) -> bool:
    """Every model is in the cache with the sha256 its models.json records."""
    try:
        record = storage.read_json(storage.join(cache, MODELS_JSON))
        files = record["files"]
        return all(name in files and _sha256(storage.read_bytes(storage.join(cache, name))) == files[name]["sha256"]
                   for name in MODEL_FILES)
    except (StorageError, KeyError, TypeError, ValueError):
        return False


def download_wheel(folder: Path, spec: str = MEDIAPIPE_WHEEL) -> Path:
    """`pip download` the wheel (no dependencies: it is never installed) into `folder`; its path."""
    command = [sys.executable, "-m", "pip", "download", spec, "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr[-2000:]}")
    wheels = sorted(folder.glob("mediapipe-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {spec} left no mediapipe wheel in {folder}: {result.stdout[-1000:]}")
    return wheels[0]


def extract_models(wheel: Path) -> dict[str, bytes]:
    """The model files' bytes out of the wheel (a zip), by cache name; KeyError naming a missing one."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [inner for inner in MODEL_FILES.values() if inner not in names]
        if missing:
            raise KeyError(f"{wheel.name} lacks {missing}")
        return {name: archive.read(inner) for name, inner in MODEL_FILES.items()}


def fetch_models(cache: str | None = None, storage: Storage | None = None, wheel: Path | None = None) -> dict:
    """Fill `cache` (local folder or s3://; None: the default cache) unless complete; its models.json record.

    `wheel`: an already downloaded mediapipe wheel (skips pip).
    """
    storage = storage or Storage(StorageConfig())
    cache = cache or str(default_model_dir())
    if cache_is_complete(storage, cache):
        return storage.read_json(storage.join(cache, MODELS_JSON))
    with tempfile.TemporaryDirectory(prefix="mediapipe-wheel-") as tmp:
        wheel = wheel or download_wheel(Path(tmp))
        models = extract_models(wheel)
        record = {"source": {"spec": MEDIAPIPE_WHEEL, "wheel": wheel.name, "sha256": _sha256(wheel.read_bytes())},
                  "files": {name: {"sha256": _sha256(data), "bytes": len(data), "wheel_path": MODEL_FILES[name]}
                            for name, data in models.items()}}
    for name, data in models.items():
        storage.write_bytes(storage.join(cache, name), data)
    storage.write_json(storage.join(cache, MODELS_JSON), record)  # last: its presence means the cache is whole
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=None, help="local folder or s3:// prefix (default: "
                        "~/.cache/human-animation/mediapipe)")
    parser.add_argument("--wheel", default=None, help="use this downloaded mediapipe wheel instead of pip download")
    args = parser.parse_args(argv)
    record = fetch_models(args.cache, wheel=Path(args.wheel) if args.wheel else None)
    print(f"models from {record['source']['wheel']} in {args.cache or default_model_dir()}: "
          + ", ".join(sorted(record["files"])))


if __name__ == "__main__":
    main()
