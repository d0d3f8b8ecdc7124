"""One request on several devices: an Animator replica's sequence-parallel worker group.

With ``animator.sequence_parallel = sp > 1`` a replica holds no model itself. It starts ``sp`` Ray
actors (`SequenceParallelWorker`; one GPU each on GPU clusters, one CPU each here) that each load the
export and join one gloo/NCCL process group; the denoiser splits every request's tokens across them
(Ulysses, `model.sequence_parallel`). Every worker runs the same request with the same seed, so
their noise and conditions agree; rank 0's decoded frames are the answer. A long request finishes
faster instead of queueing on one device, and Serve's autoscaling still counts replicas.

A worker that dies or raises fails the request (the caller answers 500) and the replica replaces
the whole group before the next request: a process group cannot take a new member.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from serving.config import ServeAppConfig, ServedModel
from serving.engine import Animation, AnimationEngine, ProgressFn, render_mp4
from serving.inputs import AnimationRequest

__all__ = ["SequenceParallelWorker", "ParallelEngine", "WORKER_PREFIX"]

WORKER_PREFIX = "sequence-parallel-"

logger = logging.getLogger("ray.serve")


class SequenceParallelWorker:
    """One rank of a replica's group: an `AnimationEngine` whose denoiser splits tokens over the group."""

    def __init__(self, cfg: dict[str, Any], served: dict[str, Any], rank: int, size: int) -> None:
        import torch

        self.cfg = ServeAppConfig.model_validate(cfg)
        if self.cfg.torch_threads is not None:
            torch.set_num_threads(self.cfg.torch_threads)
        self.rank, self.size = rank, size
        self.engine = AnimationEngine(self.cfg, ServedModel.model_validate(served))

    def address(self) -> str:
        """host:port for the group's rendezvous (asked of rank 0; a free port on its node)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"{ray.util.get_node_ip_address()}:{port}"

    def join(self, address: str) -> None:
        """Join the group at ``address`` and split the denoiser's tokens across it."""
        import deepspeed
        import torch.distributed as dist

        backend = "nccl" if self.engine.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}", rank=self.rank, world_size=self.size)
        deepspeed.init_distributed(dist_backend=backend)  # DistributedAttention talks through deepspeed.comm
        self.engine.model.enable_sequence_parallel(dist.group.WORLD)

    def generate_batch(self, requests: Sequence[AnimationRequest],
                       progress: Sequence[ProgressFn | None] | None = None) -> list[Animation]:
        return self.engine.generate_batch(requests, progress)

    def warmup(self) -> float:
        return self.engine.warmup()

    def precision(self) -> str:
        return self.engine.precision

    def pid(self) -> int:
        return os.getpid()


class ParallelEngine:
    """What the Animator needs of an engine (`generate_batch`, `render_mp4`, `warmup`), run by a worker group."""

    def __init__(self, cfg: ServeAppConfig, served: ServedModel) -> None:
        self.cfg, self.served = cfg, served
        self.workers: list[Any] = []
        self.precision = ""  # the workers' engines' (`AnimationEngine.precision`), asked once they are up
        self._start()

    def _start(self) -> None:
        import ray

        knobs, size = self.cfg.animator, self.cfg.animator.sequence_parallel
        actor = ray.remote(SequenceParallelWorker)
        cfg, served = self.cfg.model_dump(mode="json"), self.served.model_dump(mode="json")
        group = f"{WORKER_PREFIX}{uuid.uuid4().hex[:8]}"  # named, so operators (and tests) can find them
        self.workers = [actor.options(name=f"{group}-rank{rank}", num_cpus=knobs.worker_num_cpus,
                                      num_gpus=knobs.worker_num_gpus).remote(cfg, served, rank, size)
                        for rank in range(size)]
        address = ray.get(self.workers[0].address.remote())
        ray.get([w.join.remote(address) for w in self.workers])
        self.precision = ray.get(self.workers[0].precision.remote())
        logger.info("sequence-parallel group of %d workers ready at %s", size, address)

    def restart(self) -> None:
        """Replace the whole group (after a worker failed)."""
        import ray

        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self._start()

    def _on_all(self, method: str, *args: Any, rank0_only: tuple[Any, ...] = ()) -> Any:
        """Call ``method`` on every worker (rank 0 also gets ``rank0_only``); rank 0's result.
        Any failure restarts the group and is raised to the caller."""
        import ray

        refs = [getattr(w, method).remote(*args, *(rank0_only if rank == 0 else ())) for rank, w in
                enumerate(self.workers)]
        try:
            return ray.get(refs)[0]
        except Exception:
            logger.exception("sequence-parallel %s failed: replacing the worker group", method)
            self.restart()
            raise

    def generate_batch(self, requests: Sequence[AnimationRequest],
                       progress: Sequence[ProgressFn | None] | None = None) -> list[Animation]:
        # Progress comes from rank 0 only (every rank steps in lockstep); it must pickle (`serving.jobs.JobProgress`).
        # Without `saved_chunks`: a resumed long job would skip chunks on rank 0 alone and the ranks' collectives
        # would part ways, so under sequence parallelism a re-dispatched job samples every chunk again.
        progress = None if progress is None else [None if p is None else _NoResume(p) for p in progress]
        return self._on_all("generate_batch", list(requests), rank0_only=(progress,))

    def render_mp4(self, request: AnimationRequest, animation: Animation) -> bytes:
        return render_mp4(request, animation, self.served.card.model.audio)

    def warmup(self) -> float:
        start = time.perf_counter()
        self._on_all("warmup")
        return time.perf_counter() - start


@dataclass(frozen=True)
class _NoResume:
    """A job's progress (steps, chunks saved) without its stored chunks to resume from."""

    progress: Any

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.progress(*args, **kwargs)

    def save_chunk(self, chunk: Any) -> None:
        if hasattr(self.progress, "save_chunk"):
            self.progress.save_chunk(chunk)
