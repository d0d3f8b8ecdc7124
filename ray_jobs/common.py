"""Plumbing every job shares: the Ray and worker-scaling config sections, the CLI, and Ray start-up.

Each job module defines one typed config (a `StrictConfig`) that reuses these sections and the
`StorageConfig` / `ModelConfig` sections from `model/`, and a thin `main()`:

    def main(argv=None):
        cfg = parse_job_config(PreprocessConfig, argv, description=__doc__)
        init_ray(cfg.ray)
        run(cfg)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence, TypeVar

from pydantic import Field, model_validator

from core.config import ConfigError, StrictConfig, load_config

__all__ = ["RayConfig", "WorkerScaling", "parse_job_config", "init_ray", "setup_logging"]

log = logging.getLogger(__name__)
C = TypeVar("C", bound=StrictConfig)


class RayConfig(StrictConfig):
    """Where the job's Ray runs. With no address (and none in RAY_ADDRESS) a local Ray is started."""

    address: str | None = Field(None, description="Ray address ('auto', 'ray://host:10001'); None = local or RAY_ADDRESS")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray (None = all)")
    object_store_memory_mb: int | None = Field(None, ge=64, description="object store size for a local Ray")
    log_to_driver: bool = True


class WorkerScaling(StrictConfig):
    """Ray Train worker group: how many workers and what each one holds."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    sequence_parallel: int = Field(1, ge=1, description="Ulysses degree: consecutive groups of this many workers "
                                   "split each clip's tokens by latent frames (1 = off); must divide num_workers")

    @model_validator(mode="after")
    def _check_groups(self) -> "WorkerScaling":
        if self.num_workers % self.sequence_parallel:
            raise ValueError(f"scaling.sequence_parallel={self.sequence_parallel} must divide "
                             f"scaling.num_workers={self.num_workers} (data-parallel x sequence-parallel groups)")
        return self


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def parse_job_config(cls: type[C], argv: Sequence[str] | None = None, description: str | None = None,
                     default_config: str | None = None) -> C:
    """Parse ``--config FILE --set k=v ...`` into ``cls``; exit with status 2 naming the bad key."""
    parser = argparse.ArgumentParser(description=(description or "").strip().splitlines()[0] if description else None)
    parser.add_argument("--config", default=default_config, help="YAML config file (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field by dotted key; repeatable")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except (ConfigError, OSError) as exc:
        parser.exit(2, f"config error: {exc}\n")


def init_ray(cfg: RayConfig) -> None:
    """Connect to the configured cluster, or start a local Ray; a no-op when Ray is already up.

    Under `ray job submit`, RAY_ADDRESS is set by Ray itself and the job joins that cluster unchanged.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict = {"log_to_driver": cfg.log_to_driver}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = cfg.num_cpus
        if cfg.object_store_memory_mb:
            kwargs["object_store_memory"] = cfg.object_store_memory_mb * 2**20
        kwargs["include_dashboard"] = False
    log.info("starting Ray (%s)", f"address={address}" if address else "local")
    ray.init(**kwargs)
