"""Async job records and videos, kept in the output store so they outlive any replica.

Layout under ``output`` (local folder or ``s3://bucket/prefix``, through `core.storage.Storage`):

* ``{output}/jobs/{id}.json``: ``{"id", "status": queued|running|done|failed|cancelled, "progress":
  {"done", "total"[, "chunks": {"done", "total"}]}, "created_at", "updated_at", "error", "nfe", "seconds",
  "face", "params", "attempts", "owner"}``; ``face`` is ``{"source": given|detected|none|off, "box":
  [x0, y0, x1, y1] | null}`` once done (null before); ``owner`` names the replica running it (its lease,
  renewed by every progress write; see `JobStore.claim`); ``cancel_requested`` once a client cancelled.
* ``{output}/jobs/{id}/chunk-NNNN.pt``: each finished chunk of a long job (its new frames and latents,
  `model.generate.ChunkDone`): a re-dispatched run resumes after the last one, and a client can fetch
  a chunk's video before the job ends.
* ``{output}/jobs/{id}/cancel``: written once a client cancels; a record write by the running replica
  (a read-modify-write) could drop ``cancel_requested`` written in between, this marker it never touches.
* ``{output}/videos/{id}.mp4``: the finished video (written before the record says done).

Any replica (or a new one after a restart) answers status and video requests from the store alone.
A job whose replica died mid-run is dispatched again by the ingress (up to ``max_attempts`` runs),
resuming from its stored chunks; a record not updated for ``stale_s`` seconds (progress writes it every
sampler step) with no live run is reported ``failed`` with ``"lost: no progress for N s"``.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from core.storage import Storage, StorageConfig, StorageNotFoundError

__all__ = ["JobStore", "JobProgress", "JobCancelled", "JobBusy", "new_job_id", "valid_job_id", "FINAL"]

FINAL = ("done", "failed", "cancelled")  # statuses a job never leaves


class JobCancelled(Exception):
    """Raised inside a running job once its client cancelled it."""


class JobBusy(Exception):
    """The job is held by another live run (its lease is fresh)."""

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
                  "face": None, "params": params, "attempts": 0, "owner": None}
        self.storage.write_json(self.record_uri(job_id), record)
        return record

    def chunk_uri(self, job_id: str, index: int) -> str:
        return self.storage.join(self.output, "jobs", job_id, f"chunk-{index:04d}.pt")

    def update(self, job_id: str, **fields: Any) -> dict[str, Any]:
        """Read-modify-write of one record; only the run holding its lease writes a running job.

        A progress write to a job whose client asked to cancel raises `JobCancelled` (the run stops there)."""
        record = self.storage.read_json(self.record_uri(job_id))
        if "progress" in fields and (record.get("cancel_requested") or self.cancel_marked(job_id)):
            raise JobCancelled(job_id)
        if "chunks" in record.get("progress", {}) and "chunks" not in fields.get("progress", {"chunks": None}):
            fields = {**fields, "progress": {**fields["progress"], "chunks": record["progress"]["chunks"]}}
        record.update(fields, updated_at=time.time())
        self.storage.write_json(self.record_uri(job_id), record)
        return record

    def claim(self, job_id: str, owner: str, takeover: bool = False) -> dict[str, Any]:
        """Start a run of the job as ``owner``: its lease, so one job never runs twice at once. Refused
        (`JobBusy`) while another owner's run is live (updated within ``stale_s``), unless ``takeover``
        (the ingress knows that run's replica died); a final job is `JobBusy` too."""
        record = self.storage.read_json(self.record_uri(job_id))
        live = record["status"] == "running" and time.time() - float(record["updated_at"]) <= self.stale_s
        if record["status"] in FINAL or record.get("cancel_requested") or self.cancel_marked(job_id):
            raise JobBusy(f"job {job_id} is {record['status']}")
        if live and record.get("owner") not in (None, owner) and not takeover:
            raise JobBusy(f"job {job_id} is running on {record['owner']}")
        return self.update(job_id, status="running", owner=owner, attempts=int(record.get("attempts", 0)) + 1)

    def cancel(self, job_id: str) -> dict[str, Any]:
        """A client's cancel: a queued job is cancelled at once; a running one stops at its next step."""
        record = self.storage.read_json(self.record_uri(job_id))
        if record["status"] in FINAL:
            return record
        self.storage.write_bytes(self.cancel_uri(job_id), b"")
        status = "cancelled" if record["status"] == "queued" else record["status"]
        return self.update(job_id, cancel_requested=True, status=status)

    def cancel_uri(self, job_id: str) -> str:
        return self.storage.join(self.output, "jobs", job_id, "cancel")

    def cancel_marked(self, job_id: str) -> bool:
        return self.storage.exists(self.cancel_uri(job_id))

    def save_chunk(self, job_id: str, chunk: Any) -> None:
        """Store one finished chunk (`model.generate.ChunkDone`) beside the record."""
        import torch

        buffer = io.BytesIO()
        torch.save({"index": chunk.index, "total": chunk.total, "first": chunk.first, "frames": chunk.frames,
                    "latents": chunk.latents}, buffer)
        self.storage.write_bytes(self.chunk_uri(job_id, chunk.index), buffer.getvalue())

    def load_chunk(self, job_id: str, index: int) -> Any | None:
        """Chunk ``index`` of the job as a `model.generate.ChunkDone`, None when not stored."""
        import torch

        from model.generate import ChunkDone

        try:
            data = torch.load(io.BytesIO(self.storage.read_bytes(self.chunk_uri(job_id, index))), weights_only=True)
        except StorageNotFoundError:
            return None
        return ChunkDone(data["index"], data["total"], data["first"], data["frames"], data["latents"])

    def saved_chunks(self, job_id: str) -> list[Any]:
        """The job's stored chunks 0, 1, ... up to the first missing one."""
        chunks = []
        while (chunk := self.load_chunk(job_id, len(chunks))) is not None:
            chunks.append(chunk)
        return chunks

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

    def _store(self) -> JobStore:
        return JobStore(Storage(self.storage), self.output, self.stale_s)

    def __call__(self, done: int, total: int, chunks: tuple[int, int] | None = None) -> None:
        """Write the steps done (and, for a long job, the chunks done); raises `JobCancelled` once cancelled."""
        progress = {"done": done, "total": total}
        if chunks is not None:
            progress["chunks"] = {"done": chunks[0], "total": chunks[1]}
        self._store().update(self.job_id, progress=progress)

    def save_chunk(self, chunk: Any) -> None:
        self._store().save_chunk(self.job_id, chunk)

    def saved_chunks(self) -> list[Any]:
        return self._store().saved_chunks(self.job_id)
