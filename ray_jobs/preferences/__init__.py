"""TPO preference pairs (AlignHuman): teacher candidates on a Ray Data actor pool, pluggable rewards.

`python -m ray_jobs.make_preferences --config ...`; see `ray_jobs.preferences.job` (pipeline),
`ray_jobs.preferences.rewards` (registry) and `ray_jobs.preferences.config` (PreferencesConfig).
"""

from ray_jobs.preferences.config import PreferencesConfig
from ray_jobs.preferences.job import run

__all__ = ["PreferencesConfig", "run"]
