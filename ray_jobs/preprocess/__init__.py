"""Ray Data preprocessing job: raw videos (folder or s3://) -> Parquet training shards + error rows + manifest.

`python -m ray_jobs.preprocess --config ray_jobs/configs/tiny/preprocess.yaml [--set key=value ...]`

One streaming Ray Data pipeline (see `job.build_dataset`): list inputs -> decode + clip (one
ffmpeg run per video) -> audio features -> pose -> face crop track -> motion mask -> VAE latents
(actor pool) -> Parquet shards. Bad inputs become error rows, never job failures. Layout and resume
rules: `ray_jobs.preprocess.job`; shard schema: docs/design.md, tensor encoding: `artifacts.tables`.
"""

from ray_jobs.preprocess.config import PreprocessConfig
from ray_jobs.preprocess.job import MANIFEST_FILE, build_dataset, list_inputs, run

__all__ = ["PreprocessConfig", "run", "main", "build_dataset", "list_inputs", "MANIFEST_FILE"]


def main(argv=None) -> dict:
    """CLI entry: parse the config, start or join Ray, run, return the summary."""
    from ray_jobs.common import init_ray, parse_job_config, setup_logging

    setup_logging()
    cfg = parse_job_config(PreprocessConfig, argv, description=__doc__,
                           default_config="ray_jobs/configs/tiny/preprocess.yaml")
    init_ray(cfg.ray)
    return run(cfg)
