"""The Ray Serve application: FastAPI `Ingress` -> `Animator` (model + VAE, autoscaled, batched).

Start it with ``serve run serving.app:build_app`` (dev, tiny random model; ``serve run
serving/config.dev.yaml`` for the dev YAML) or ``serve deploy serving/config.yaml`` on a cluster.
`build_app(args)` validates ``args`` as `ServeAppConfig` and returns
``Ingress.bind(Animator.bind(cfg), cfg)`` with the deployment options taken from the config.

Failure containment: every request's work runs inside try/except in the replica; an exception fails
that request only (500 JSON or a failed job record). `check_health` fails only after an accelerator
error, which leaves the CUDA context unusable; Serve then replaces the replica.
"""

# No `from __future__ import annotations`: FastAPI must see real types on the class-based routes.
import asyncio
import functools
import hmac
import json
import logging
import os
import threading
from collections import defaultdict
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from starlette.concurrency import run_in_threadpool

from core.media import mux_mp4
from core.storage import Storage
from serving.config import ServeAppConfig, ServedModel, resolve_served
from serving.inputs import (AnimationRequest, InputError, check_s3_uri, check_size, decode_audio_bytes,
                            decode_image, parse_face_box, parse_keypoints, pose_from_video, resolve_frames)
from serving.jobs import FINAL, JobBusy, JobCancelled, JobProgress, JobStore, new_job_id, valid_job_id

__all__ = ["Animator", "Ingress", "build_app", "api"]

logger = logging.getLogger("ray.serve")

api = FastAPI(title="Human animation", version="1",
              description="Reference image + audio and/or pose keypoints -> MP4. See serving/README.md.")


def _error(status: int, field: str | None, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status_code=status, headers=headers)


# Above the deployments: Serve pickles a class (and the globals it uses) when it is decorated.
def _face_headers(face: dict[str, Any]) -> dict[str, str]:
    """``X-Face`` (given / detected / none / off) and, when a box was used, ``X-Face-Box`` "x0,y0,x1,y1"."""
    headers = {"X-Face": face["source"]}
    if face["box"] is not None:
        headers["X-Face-Box"] = ",".join(f"{v:g}" for v in face["box"])
    return headers


@api.exception_handler(InputError)
async def _input_error(_: Request, exc: InputError) -> JSONResponse:
    return _error(exc.status, exc.field, exc.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = str(first["loc"][-1]) if first.get("loc") else None
    return _error(422, field, first.get("msg", "invalid"))


@api.middleware("http")
async def _guard(request: Request, call_next):
    """API key on /v1/* (when configured) and a Content-Length cap, before any body is read.

    The settings live on the replica's `Ingress` instance (found through the replica context):
    Serve runs a deserialised copy of `api`, so state set on the module's `api` would not be seen.
    """
    try:
        settings: _Settings | None = getattr(serve.get_replica_context().servable_object, "settings", None)
    except RayServeException:  # not inside a replica (e.g. the app under a plain ASGI test client)
        settings = None
    if settings is None:
        return _error(503, None, "ingress not initialised", {"Retry-After": "1"})
    root, path = request.scope.get("root_path", ""), request.url.path
    if path.removeprefix(root).startswith("/v1/"):  # the app may be mounted under a route prefix
        if settings.api_key is not None:
            given = request.headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return _error(401, "X-API-Key", "missing or wrong API key")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return _error(413, "body", f"request body of {length} bytes exceeds {settings.max_body_bytes} bytes")
    return await call_next(request)


class _Settings:
    """What the middleware needs, read once when the ingress replica starts."""

    def __init__(self, cfg: ServeAppConfig) -> None:
        self.api_key = None
        if cfg.api_key_env is not None:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                raise RuntimeError(f"api_key_env {cfg.api_key_env!r} is configured but that variable is unset or empty")
        self.max_body_bytes = 3 * cfg.limits.max_upload_bytes + 64 * 1024  # three files + form fields


@serve.deployment
class Animator:
    """Model + VAE replica: sync `animate`, async `run_job`, both through one `@serve.batch` queue."""

    def __init__(self, cfg: dict[str, Any], served: dict[str, Any]) -> None:
        import torch

        from serving.engine import AnimationEngine

        self.cfg = ServeAppConfig.model_validate(cfg)
        if self.cfg.torch_threads is not None:
            torch.set_num_threads(self.cfg.torch_threads)
        storage = Storage(self.cfg.storage)
        if self.cfg.animator.sequence_parallel > 1:  # a worker group runs each request together
            from serving.parallel import ParallelEngine

            self.engine = ParallelEngine(self.cfg, ServedModel.model_validate(served))
        else:
            self.engine = AnimationEngine(self.cfg, ServedModel.model_validate(served), storage)
        self.jobs = JobStore(storage, self.cfg.output, self.cfg.job_stale_s)
        self._batched.set_max_batch_size(self.cfg.animator.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.animator.batch_wait_timeout_s)
        self._in_flight = 0  # requests inside `_animate`; drives the adaptive batch wait
        self.owner = new_job_id()  # this replica's name in the job leases it holds
        self._fatal: str | None = None
        if self.cfg.warmup:
            logger.info("Animator warm-up took %.2f s", self.engine.warmup())

    def check_health(self) -> None:
        if self._fatal is not None:
            raise RuntimeError(f"replica unusable after: {self._fatal}")

    def ready(self) -> bool:
        return True

    def _run_groups(self, items: list[tuple[AnimationRequest, Any]]) -> list[Any]:
        """Group by shape, one batched call per group; a failing group is retried one by one so one bad request fails alone."""
        results: list[Any] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, (request, _) in enumerate(items):
            groups[request.shape_key].append(index)
        for indices in groups.values():
            chunks = [indices] if len(indices) > 1 else []
            chunks += [[i] for i in indices]
            for chunk in chunks:
                if all(results[i] is not None for i in chunk):
                    continue
                try:
                    outs = self.engine.generate_batch([items[i][0] for i in chunk], [items[i][1] for i in chunk])
                    for i, out in zip(chunk, outs):
                        results[i] = out
                except Exception as exc:  # noqa: BLE001 - isolate one request's failure from the replica
                    if "CUDA" in str(exc) and "out of memory" not in str(exc):
                        self._fatal = f"{type(exc).__name__}: {exc}"
                    if len(chunk) == 1:
                        results[chunk[0]] = exc
                    else:
                        logger.warning("batch of %d failed (%s); retrying one by one", len(chunk), exc)
        return results

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def _batched(self, items: list[tuple[AnimationRequest, Any]]) -> list[Any]:
        return await asyncio.to_thread(self._run_groups, items)

    async def _animate(self, request: AnimationRequest, progress: Any) -> tuple[bytes, Any]:
        # Adaptive batch wait: a request arriving at an idle replica runs at once (waiting to fill a
        # batch would only add latency); one arriving while others are in flight waits up to
        # batch_wait_timeout_s, which costs nothing while the replica is busy and lets batches form.
        self._in_flight += 1
        busy = self._in_flight > 1
        self._batched.set_batch_wait_timeout_s(self.cfg.animator.batch_wait_timeout_s if busy else 0.0)
        try:
            animation = await self._batched((request, progress))
        finally:
            self._in_flight -= 1
        if isinstance(animation, Exception):
            raise animation
        mp4 = await asyncio.to_thread(self.engine.render_mp4, request, animation)
        return mp4, animation

    async def animate(self, request: AnimationRequest) -> dict[str, Any]:
        """Sync path: MP4 bytes and figures (face: `FaceReport.as_dict`)."""
        mp4, animation = await self._animate(request, None)
        return {"mp4": mp4, "nfe": animation.nfe, "seconds": animation.seconds, "face": animation.face.as_dict(),
                "precision": self.engine.precision}

    async def run_job(self, job_id: str, request: AnimationRequest, takeover: bool = False) -> str:
        """Async path: progress and result go to the job record; never raises (the record carries the error).

        Takes the job's lease first (`JobStore.claim`): a job another live run holds answers "busy". A long
        job resumes after its stored chunks; a cancelled one stops at its next step ("cancelled")."""
        try:
            await asyncio.to_thread(self.jobs.claim, job_id, self.owner, takeover)
        except JobBusy as exc:
            logger.warning("job %s not run here: %s", job_id, exc)
            return "busy"
        try:
            progress = JobProgress(self.cfg.storage, self.cfg.output, self.cfg.job_stale_s, job_id)
            mp4, animation = await self._animate(request, progress)
            await asyncio.to_thread(self.jobs.write_video, job_id, mp4)
            await asyncio.to_thread(self.jobs.update, job_id, status="done", nfe=animation.nfe,
                                    seconds=animation.seconds, face=animation.face.as_dict())
            return "done"
        except JobCancelled:
            await asyncio.to_thread(self.jobs.update, job_id, status="cancelled", error="cancelled by the client")
            return "cancelled"
        except Exception as exc:  # noqa: BLE001 - the job fails, the replica stays
            logger.exception("job %s failed", job_id)
            await asyncio.to_thread(self.jobs.update, job_id, status="failed", error=f"{type(exc).__name__}: {exc}")
            return "failed"


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP API: validates inputs, calls the `Animator`, serves job status and videos."""

    def __init__(self, animator: DeploymentHandle, cfg: dict[str, Any], served: dict[str, Any]) -> None:
        self.cfg = ServeAppConfig.model_validate(cfg)
        self.served = ServedModel.model_validate(served)
        self.settings = _Settings(self.cfg)
        self.animator = animator
        self.storage = Storage(self.cfg.storage)
        self.jobs = JobStore(self.storage, self.cfg.output, self.cfg.job_stale_s)
        self.temporal_factor = self.served.temporal_factor
        self._tasks: set[asyncio.Task] = set()
        self._pose: Any = None  # BlazePoseExtractor, loaded at the first pose_video (LiteRT: one call at a time)
        self._pose_lock = threading.Lock()

    def _extract_pose(self, frames: Any, fps: float) -> Any:
        """`model.blazepose.BlazePoseExtractor` on decoded frames; a missing model cache is the request's 422."""
        from model.blazepose import BlazePoseExtractor

        with self._pose_lock:
            if self._pose is None:
                try:
                    self._pose = BlazePoseExtractor(self.cfg.pose_model_dir)
                except FileNotFoundError as exc:
                    raise InputError("pose_video", f"pose from video is not available on this server: {exc}") from None
            self._pose.fps = fps  # the One Euro filter's time step
            return self._pose(frames)

    # ------------------------------------------------------------------ health
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:
            await asyncio.wait_for(self.animator.ready.remote(), timeout=5.0)
        except (asyncio.TimeoutError, BackPressureError, Exception) as exc:  # noqa: BLE001
            return _error(503, None, f"animator not ready: {type(exc).__name__}", {"Retry-After": str(self.cfg.retry_after_s)})
        return JSONResponse({"status": "ready"})

    # ------------------------------------------------------------------ inputs
    async def _read(self, upload: UploadFile | None, uri: str | None, field: str) -> bytes | None:
        """Bytes of an upload or of an allowed s3:// object (size-checked), None when neither is given."""
        limit = self.cfg.limits.max_upload_bytes
        if upload is not None and uri is not None:
            raise InputError(field, f"give {field} or {field}_uri, not both")
        if upload is not None:
            return check_size(await upload.read(limit + 1), field, limit)
        if uri is None:
            return None
        check_s3_uri(uri, f"{field}_uri", self.cfg.allowed_s3_buckets)
        return await run_in_threadpool(self._read_s3, uri, f"{field}_uri", limit)

    def _read_s3(self, uri: str, field: str, limit: int) -> bytes:
        bucket, _, key = uri[len("s3://"):].partition("/")
        try:
            size = self.storage.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except Exception as exc:  # noqa: BLE001 - any S3 failure is this field's problem
            raise InputError(field, f"cannot read {uri} ({type(exc).__name__})") from None
        if size > limit:
            raise InputError(field, f"object of {size} bytes exceeds the limit of {limit} bytes", status=413)
        return check_size(self.storage.read_bytes(uri), field, limit)

    def _build_request(self, image: bytes, audio: bytes | None, keypoints: bytes | None, frames: int | None,
                       duration: float | None, fps: float | None, steps: int | None, seed: int,
                       face_box: str | None = None, pose_video: bytes | None = None) -> AnimationRequest:
        """Decode and check every input (runs in a thread: PIL and ffmpeg block)."""
        cfg, limits = self.cfg, self.cfg.limits
        fps = cfg.default_fps if fps is None else fps
        if not limits.min_fps <= fps <= limits.max_fps:
            raise InputError("fps", f"must lie in [{limits.min_fps}, {limits.max_fps}]")
        served = self.served
        steps = served.default_steps if steps is None else steps
        if not 1 <= steps <= limits.max_steps:
            raise InputError("steps", f"must lie in [1, {limits.max_steps}]")
        try:
            served.spec.with_steps(steps)
        except ValueError as exc:  # a student's edges or a TPO plan fix the step count
            raise InputError("steps", str(exc)) from None
        if seed < 0 or seed >= 2**63:
            raise InputError("seed", "must lie in [0, 2**63)")
        height, width = served.height, served.width
        box = None if face_box is None else parse_face_box(face_box, "face_box", height, width)
        ref = decode_image(image, "image", height, width, limits.max_image_pixels)
        rate = served.card.model.audio.sample_rate
        wave = None if audio is None else decode_audio_bytes(audio, "audio", rate, limits.max_duration_s)
        poses = None if keypoints is None else parse_keypoints(keypoints, "keypoints", height, width)
        if pose_video is not None:
            poses = pose_from_video(pose_video, "pose_video", height, width, fps, limits.max_frames,
                                    functools.partial(self._extract_pose, fps=fps), cfg.detection_long_side)
        num_frames, source = resolve_frames(frames, duration, fps, wave, poses, rate, cfg.default_frames)
        self._check_frames(num_frames, source, fps, poses)
        return AnimationRequest(ref, wave, poses, num_frames, fps, steps, seed, face_box=box)

    def _check_frames(self, num_frames: int, source: str, fps: float, poses: Any) -> None:
        limits = self.cfg.limits
        if not 1 <= num_frames <= limits.max_frames:
            raise InputError(source, f"{num_frames} frames is outside [1, {limits.max_frames}]")
        if num_frames / fps > limits.max_duration_s:
            raise InputError(source, f"{num_frames / fps:.2f} s exceeds the limit of {limits.max_duration_s} s")
        if (num_frames - 1) % self.temporal_factor:
            raise InputError(source, f"{num_frames} frames: this model needs 1 + k * {self.temporal_factor}")
        if poses is not None and len(poses) != num_frames:
            raise InputError("keypoints", f"has {len(poses)} frames, the request asks {num_frames}")

    # ------------------------------------------------------------------ generation
    @api.post("/v1/animations", responses={200: {"content": {"video/mp4": {}}}, 202: {}})
    async def create(
        self,
        image: UploadFile | None = File(None, description="reference image, PNG or JPEG"),
        audio: UploadFile | None = File(None, description="driving audio (any ffmpeg-readable file)"),
        keypoints: UploadFile | None = File(None, description="pose keypoints JSON [T][17][3] in output pixels"),
        pose_video: UploadFile | None = File(None, description="driving pose video: keypoints by the preprocessing "
                                                              "job's BlazePose extractor"),
        image_uri: str | None = Form(None, description="s3:// reference image from an allowed bucket"),
        audio_uri: str | None = Form(None, description="s3:// audio from an allowed bucket"),
        keypoints_uri: str | None = Form(None, description="s3:// keypoints JSON from an allowed bucket"),
        frames: int | None = Form(None, description="number of frames (or give duration)"),
        duration: float | None = Form(None, description="seconds; frames = round(duration * fps)"),
        fps: float | None = Form(None, description="frames per second (default from the config)"),
        steps: int | None = Form(None, description="sampler steps (default from the config)"),
        seed: int = Form(0, description="noise seed"),
        face_box: str | None = Form(None, description="JSON [x0, y0, x1, y1]: the reference's face in pixels of the "
                                                       "output H x W (after fitting); default: detected"),
        mode: Literal["sync", "async"] = Form("sync", description="sync: answer the MP4; async: answer a job id"),
    ) -> Response:
        if pose_video is not None and keypoints is not None:
            raise InputError("pose_video", "give keypoints or pose_video, not both")
        video_bytes = None if pose_video is None else check_size(
            await pose_video.read(self.cfg.limits.max_upload_bytes + 1), "pose_video", self.cfg.limits.max_upload_bytes)
        image_bytes = await self._read(image, image_uri, "image")
        if image_bytes is None:
            raise InputError("image", "a reference image is required")
        audio_bytes = await self._read(audio, audio_uri, "audio")
        keypoint_bytes = await self._read(keypoints, keypoints_uri, "keypoints")
        request = await run_in_threadpool(self._build_request, image_bytes, audio_bytes, keypoint_bytes,
                                          frames, duration, fps, steps, seed, face_box, video_bytes)
        if mode == "sync":
            return await self._sync(request)
        return await self._async(request)

    def _overloaded(self) -> JSONResponse:
        return _error(503, None, "overloaded, retry later", {"Retry-After": str(self.cfg.retry_after_s)})

    async def _sync(self, request: AnimationRequest) -> Response:
        try:
            result = await self.animator.animate.remote(request)
        except BackPressureError:
            return self._overloaded()
        except Exception as exc:  # noqa: BLE001 - a failed generation is this request's 500, not the server's
            logger.exception("generation failed")
            return _error(500, None, f"generation failed: {type(exc).__name__}")
        headers = {"X-NFE": str(result["nfe"]), "X-Generate-Seconds": f"{result['seconds']:.3f}",
                   "X-Frames": str(request.num_frames), "X-Precision": result["precision"], **_face_headers(result["face"])}
        return Response(result["mp4"], media_type="video/mp4", headers=headers)

    async def _async(self, request: AnimationRequest) -> JSONResponse:
        job_id = new_job_id()
        params = {"frames": request.num_frames, "fps": request.fps, "steps": request.steps, "seed": request.seed,
                  "has_audio": request.audio is not None, "has_pose": request.keypoints is not None,
                  "face_box": None if request.face_box is None else request.face_box.tolist()}
        await run_in_threadpool(self.jobs.create, job_id, request.steps, params)
        task = asyncio.create_task(self._dispatch(job_id, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Backpressure rejects at assignment, within milliseconds; a queued job is accepted.
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done and task.result() == "rejected":
            return self._overloaded()
        return JSONResponse({"id": job_id, "status": "queued", "status_url": f"/v1/animations/{job_id}",
                             "video_url": f"/v1/animations/{job_id}/video"}, status_code=202)

    async def _dispatch(self, job_id: str, request: AnimationRequest) -> str:
        """Run the job on an Animator; when its replica dies mid-run, run it again (another or a restarted
        replica, resuming from its stored chunks) up to ``max_attempts`` runs in all."""
        for attempt in range(1, self.cfg.max_attempts + 1):
            try:
                return await self.animator.run_job.remote(job_id, request, takeover=attempt > 1)
            except BackPressureError:
                if attempt == 1:
                    await run_in_threadpool(self.jobs.update, job_id, status="failed", error="rejected: overloaded")
                    return "rejected"
                await asyncio.sleep(self.cfg.retry_after_s)  # the restarted replica is not taking work yet
                error = "rejected: overloaded"
            except Exception as exc:  # noqa: BLE001 - the replica died mid-job
                error = f"{type(exc).__name__}: {exc}"
                logger.warning("job %s: run %d lost its replica (%s)", job_id, attempt, error)
            record = await run_in_threadpool(self.jobs.get, job_id)
            if record is None or record["status"] in FINAL:
                return "failed" if record is None else record["status"]
        await run_in_threadpool(self.jobs.update, job_id, status="failed",
                                error=f"lost its replica {self.cfg.max_attempts} times; last: {error}")
        return "failed"

    # ------------------------------------------------------------------ jobs
    async def _record(self, job_id: str) -> dict[str, Any]:
        if not valid_job_id(job_id):
            raise InputError("id", "not a job id (32 hex characters)", status=404)
        record = await run_in_threadpool(self.jobs.get, job_id)
        if record is None:
            raise InputError("id", f"no job {job_id}", status=404)
        return record

    _PUBLIC = ("id", "status", "progress", "error", "nfe", "seconds", "face", "params", "attempts")

    @api.get("/v1/animations/{job_id}")
    async def status(self, job_id: str) -> JSONResponse:
        record = await self._record(job_id)
        return JSONResponse({k: record.get(k) for k in self._PUBLIC})

    @api.delete("/v1/animations/{job_id}")
    async def cancel(self, job_id: str) -> JSONResponse:
        """Cancel a job: a queued one at once, a running one at its next sampler step; a finished one stays."""
        await self._record(job_id)
        record = await run_in_threadpool(self.jobs.cancel, job_id)
        return JSONResponse({k: record.get(k) for k in self._PUBLIC}, status_code=202 if record["status"] not in FINAL
                            else 200)

    @api.get("/v1/animations/{job_id}/events")
    async def events(self, job_id: str) -> StreamingResponse:
        """Server-sent events: ``progress`` each time the record's progress or status changes, then one
        ``done``/``failed``/``cancelled`` event with the record, and the stream ends."""
        await self._record(job_id)

        async def stream():
            last = None
            while True:
                record = await run_in_threadpool(self.jobs.get, job_id)
                public = {k: record.get(k) for k in self._PUBLIC}
                state = (record["status"], json.dumps(record.get("progress"), sort_keys=True))
                if record["status"] in FINAL:
                    yield f"event: {record['status']}\ndata: {json.dumps(public)}\n\n"
                    return
                if state != last:
                    yield f"event: progress\ndata: {json.dumps(public)}\n\n"
                    last = state
                await asyncio.sleep(self.cfg.events_poll_s)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.get("/v1/animations/{job_id}/chunks/{index}")
    async def chunk(self, job_id: str, index: int) -> Response:
        """The video (no sound) of finished chunk ``index`` of a long job, before the job ends: its new frames."""
        record = await self._record(job_id)
        stored = await run_in_threadpool(self.jobs.load_chunk, job_id, index)
        if stored is None:
            return _error(404, "index", f"chunk {index} of job {job_id} is not finished (progress: {record['progress']})")
        mp4 = await run_in_threadpool(mux_mp4, stored.frames.numpy(), None, record["params"]["fps"])
        return Response(mp4, media_type="video/mp4", headers={"X-Chunk": f"{index + 1}/{stored.total}",
                                                             "X-First-Frame": str(stored.first)})

    @api.get("/v1/animations/{job_id}/video")
    async def video(self, job_id: str) -> Response:
        record = await self._record(job_id)
        if record["status"] != "done":
            return _error(409, "id", f"job is {record['status']}, not done")
        uri = self.jobs.video_uri(job_id)
        if self.storage.is_s3(uri):
            return RedirectResponse(await run_in_threadpool(self.storage.presigned_url, uri), status_code=307)
        return Response(await run_in_threadpool(self.storage.read_bytes, uri), media_type="video/mp4")


def _num_gpus(knob: float | str) -> float:
    """'auto' -> 1 when the connected cluster has GPUs, else 0 (0 when Ray is not up yet)."""
    if knob != "auto":
        return float(knob)
    import ray

    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """Validate ``args`` as `ServeAppConfig`, read the export's model card (`resolve_served`); return the bound
    app with deployment options from the config. A bad config or an unreadable card fails the deploy."""
    cfg = ServeAppConfig.model_validate(args or {})
    served = resolve_served(cfg, Storage(cfg.storage)).model_dump(mode="json")
    knobs = cfg.animator
    animator = Animator.options(
        autoscaling_config=knobs.autoscaling_config(),
        max_ongoing_requests=knobs.max_ongoing_requests,
        max_queued_requests=knobs.max_queued_requests,
        # with a sequence-parallel group the workers hold the devices, the replica only coordinates
        ray_actor_options={"num_cpus": knobs.num_cpus,
                           "num_gpus": _num_gpus(knobs.num_gpus) if knobs.sequence_parallel == 1 else 0.0},
        health_check_period_s=knobs.health_check_period_s,
        health_check_timeout_s=knobs.health_check_timeout_s,
        graceful_shutdown_timeout_s=knobs.graceful_shutdown_timeout_s,
    ).bind(cfg.model_dump(), served)
    ingress = Ingress.options(num_replicas=cfg.ingress_replicas,
                              max_ongoing_requests=cfg.ingress_max_ongoing_requests,
                              ray_actor_options={"num_cpus": 0.5})
    return ingress.bind(animator, cfg.model_dump(), served)
