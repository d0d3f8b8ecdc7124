"""Async job records and videos, kept in the output store so they outlive any replica.

Layout under ``output`` (local folder or ``s3://bucket/prefix``, through `core.storage.Storage`):

* ``{output}/jobs/{id}.json``: ``{"id", "status": queued|running|done|failed, "progress": {"done",
  "total"}, "created_at", "updated_at", "error", "nfe", "seconds", "face", "params"}``; ``face`` is
  ``{"source": given|detected|none|off, "box": [x0, y0, x1, y1] | null}`` once done (null before).
* ``{output}/videos/{id}.mp4``: the finished video (written before the record says done).

Any replica (or a new one after a restart) answers status and video requests from the store alone.
A job whose replica died mid-run stays queued/running in the store; once its record has not been
updated for ``stale_s`` seconds (progress writes it every sampler step) it is reported ``failed``
with the error ``"lost: no progress for N s (replica restarted?)"``; resubmit it.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from core.storage import Storage, StorageConfig, StorageNotFoundError

__all__ = ["JobStore", "new_job_id", "valid_job_id"]

_ID = re.compile(r"^[0-9a-f]{32}$")


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """Ids are 32 hex chars: also what keeps a path component out of the store's keys."""
    return bool(_ID.match(job_id))


class JobStore:
    """Job records and videos under one output URI."""

    def __init__(self, storage: Storage, output: str, stale_s: float) -> None:
        self.storage, self.output, self.stale_s = storage, output.rstrip("/"), stale_s

    def record_uri(self, job_id: str) -> str:
        return self.storage.join(self.output, "jobs", f"{job_id}.json")

    def video_uri(self, job_id: str) -> str:
        return self.storage.join(self.output, "videos", f"{job_id}.mp4")

    def create(self, job_id: str, total_steps: int, params: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        record = {"id": job_id, "status": "queued", "progress": {"done": 0, "total": total_steps},
                  "created_at": now, "updated_at": now, "error": None, "nfe": None, "seconds": None,
                  "face": None, "params": params}
        self.storage.write_json(self.record_uri(job_id), record)
        return record

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Read-modify-write of one record; only its own replica writes a running job, so no lock is needed."""
        record = self.storage.read_json(self.record_uri(job_id))
        record.update(fields, updated_at=time.time())
        self.storage.write_json(self.record_uri(job_id), record)
        return record

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The record (None when unknown), with a stale queued/running job reported as failed."""
        try:
            record = self.storage.read_json(self.record_uri(job_id))
        except StorageNotFoundError:
            return None
        idle = time.time() - float(record["updated_at"])
        if record["status"] in ("queued", "running") and idle > self.stale_s:
            record = {**record, "status": "failed", "error": f"lost: no progress for {idle:.0f} s (replica restarted?)"}
        return record

    def write_video(self, job_id: str, mp4: bytes) -> str:
        uri = self.video_uri(job_id)
        self.storage.write_bytes(uri, mp4)
        return uri


@dataclass(frozen=True)
class JobProgress:
    """A job's progress callback ``(done, total)`` that pickles: a sequence-parallel worker calls it in its own process."""

    storage: StorageConfig
    output: str
    stale_s: float
    job_id: str

    def __call__(self, done: int, total: int) -> None:
        JobStore(Storage(self.storage), self.output, self.stale_s).update(self.job_id, progress={"done": done, "total": total})
