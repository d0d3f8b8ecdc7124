"""`python -m ray_jobs.make_preferences` config: TPO preference pairs from the teacher (AlignHuman)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from core.config import StrictConfig
from model.precision import Precision
from model.presets import ModelConfig
from core.storage import StorageConfig
from ray_jobs.common import RayConfig

__all__ = ["CandidateSampling", "ActorSection", "PreferencesConfig"]


class CandidateSampling(StrictConfig):
    """How the teacher draws the M candidates of one condition: its model card's sampler (guidance, shift,
    conditions CFG drops) with `steps` Euler steps; `guidance` overrides the card's when set."""

    num_candidates: int = Field(4, ge=2, description="M candidates per condition, seeds differ")
    steps: int = Field(4, ge=1, description="teacher Euler steps (tiny default: cheap; 50 = the 100-NFE teacher)")
    guidance: float | None = Field(None, ge=1.0, description="CFG scale; None = the teacher card's")


class ActorSection(StrictConfig):
    """The teacher actor pool (`map_batches(..., compute=ActorPoolStrategy)`)."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    batch_size: int = Field(1, ge=1, description="conditions per actor call")


class PreferencesConfig(StrictConfig):
    """Preference pairs: M teacher candidates per clip, scored by a motion and a fidelity reward."""

    data: str = Field("outputs/shards", description="preprocessed shards (folder or s3://)")
    split: str = Field("train", description="which clips give conditions")
    max_clips: int | None = Field(None, ge=1, description="cap on conditions (None = all of the split)")
    output: str = Field("outputs/preferences", description="pairs folder (local or s3://): data/*.parquet + manifest.json")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the teacher: model.pretrained_path = its export")
    sampling: CandidateSampling = Field(default_factory=CandidateSampling)
    rewards: dict[str, str] = Field(
        default_factory=lambda: {"motion": "gt_motion", "fidelity": "gt_fidelity"},
        description="dimension -> built-in reward name (ray_jobs.preferences.rewards) or 'package.module:function'",
    )
    min_margin: dict[str, float] = Field(
        default_factory=lambda: {"motion": 0.0, "fidelity": 0.0},
        description="a pair is kept when best - worst reward > this (per dimension, reward units)",
    )
    other_dimension_tolerance: float | None = Field(
        None, ge=0,
        description="None: the pair is best vs worst on its dimension alone. A number: the pair is the widest-margin "
                    "(winner, loser) whose winner trails the loser by at most this on every other dimension "
                    "(that dimension's reward units), so an expert is never taught to trade one dimension for another",
    )
    seed: int = 0
    precision: Precision = Field("auto", description="teacher weights: auto = bf16 on GPU, fp32 on CPU (model.precision)")
    actors: ActorSection = Field(default_factory=ActorSection)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def model_post_init(self, _context: Any) -> None:
        from ray_jobs.preferences.rewards import DIMENSIONS, reward_dimension

        if set(self.rewards) - set(DIMENSIONS) or set(self.min_margin) - set(self.rewards):
            raise ValueError(f"rewards keys must be among {DIMENSIONS} and min_margin keys among them; "
                             f"got rewards {sorted(self.rewards)}, min_margin {sorted(self.min_margin)}")
        for dimension, name in self.rewards.items():  # imports user rewards now: a bad path fails at start
            try:
                scored = reward_dimension(name)
            except (ImportError, KeyError, TypeError) as exc:
                raise ValueError(f"rewards.{dimension}: {exc}") from None
            if scored not in (None, dimension):
                raise ValueError(f"reward {name!r} scores {scored!r}, configured for {dimension!r}")
        if self.actors.min_actors > self.actors.max_actors:
            raise ValueError("actors.min_actors > actors.max_actors")
