"""TPO preference pairs from the teacher (AlignHuman), on Ray Data.

    python -m ray_jobs.make_preferences --config ray_jobs/configs/tiny/make_preferences.yaml [--set k=v ...]

Thin entry: the job lives in `ray_jobs.preferences`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray_jobs.common import init_ray, parse_job_config, setup_logging
from ray_jobs.preferences import PreferencesConfig, run

__all__ = ["PreferencesConfig", "main"]


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_config(PreferencesConfig, argv, description=__doc__,
                           default_config=str(Path(__file__).parent / "configs/tiny/make_preferences.yaml"))
    init_ray(cfg.ray)
    manifest = run(cfg)
    print(json.dumps({k: manifest[k] for k in ("num_pairs", "pairs_by_dimension")} | {"output": cfg.output}))


if __name__ == "__main__":
    main()
