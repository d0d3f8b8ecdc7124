"""The preference-pairs job (AlignHuman TPO data): teacher candidates -> rewards -> pairs, on Ray Data.

    python -m ray_jobs.make_preferences --config ray_jobs/configs/tiny/make_preferences.yaml

Pipeline: shards (conditions + ground truth) -> `CandidateScorer` actors (teacher + VAE loaded once in
``__init__``; per condition M seeded candidates with the teacher's Euler/CFG sampler, decoded and
scored per dimension) -> for each dimension whose margin passes `min_margin`, one row (conditions,
winner latents, loser latents, dimension, margin): best vs worst, or with `other_dimension_tolerance`
set, the widest pair whose winner does not lose the other dimensions (`pick_pair`) -> each actor writes
its batch's pairs as one Parquet file under ``{output}/data/`` (`artifacts.pairs.write_pair_file`) and
returns only (file, dimension) rows -> ``{output}/manifest.json`` (files, counts per dimension, config). Winner/loser latents are the
sampler's final latents, i.e. exactly what the teacher would decode: no VAE round trip.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import numpy as np
import torch

from artifacts.pairs import (CONDITION_COLUMNS, PAIR_COLUMNS, PAIRS_MANIFEST, TRUTH_COLUMNS, pairs_manifest,
                             write_pair_file)
from core.storage import Storage
from ray_jobs.preferences.config import PreferencesConfig
from ray_jobs.preferences.rewards import get_reward

__all__ = ["CandidateScorer", "build_dataset", "run", "candidate_seed", "candidate_spec", "pick_pair"]

log = logging.getLogger(__name__)

def candidate_seed(base_seed: int, video_id: str, clip_index: int, candidate: int) -> int:
    """Deterministic noise seed of candidate m of a clip (independent of batching and actor placement)."""
    return (base_seed * 1_000_003 + zlib.crc32(f"{video_id}:{clip_index}".encode()) * 31 + candidate) % (2**63)


class CandidateScorer:
    """Ray Data callable class: the teacher and the VAE live here for the actor's lifetime."""

    def __init__(self, cfg_json: dict[str, Any]):
        from artifacts.exports import read_export_card
        from artifacts.models import load_denoiser, load_vae
        from model.precision import cast_model, precision_dtype

        self.cfg = PreferencesConfig.model_validate(cfg_json)
        storage = Storage(self.cfg.storage)
        self.device = torch.device("cuda" if self.cfg.actors.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        model = load_denoiser(self.cfg.model, storage).to(self.device).eval()
        self.model = cast_model(model, precision_dtype(self.cfg.precision, self.device))
        self.vae = load_vae(self.cfg.model.vae_path, storage, device=self.device)
        self.spec = candidate_spec(self.cfg, read_export_card(self.cfg.model.pretrained_path, storage))
        self.rewards = {dim: get_reward(name) for dim, name in self.cfg.rewards.items()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Clips -> their pairs, written as one file here (pixels and latents never travel back); (file, dimension) rows."""
        pairs = [pair for i in range(len(batch["video_id"])) for pair in self._pairs_of(_row(batch, i))]
        if not pairs:
            return {"file": np.array([], dtype=object), "dimension": np.array([], dtype=object)}
        columns = {k: np.stack([np.asarray(p[k]) for p in pairs]) for k in PAIR_COLUMNS}
        name = write_pair_file(columns, self.cfg.output, Storage(self.cfg.storage))
        return {"file": np.array([name] * len(pairs), dtype=object),
                "dimension": np.asarray(columns["dimension"], dtype=object)}

    @torch.no_grad()
    def sample_candidates(self, clip: dict[str, np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """M candidates of one clip: final latents (M, C, t, h, w) and decoded frames uint8 (M, T, H, W, 3)."""
        from model.conditions import Conditions
        from model.generate import latent_shape
        from model.sampling import sample
        from model.vae import video_to_uint8

        spec = self.cfg.sampling
        frames = np.asarray(clip["frames"])
        shape = latent_shape(self.vae, *frames.shape[:3])[1:]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
            candidate_seed(self.cfg.seed, str(clip["video_id"]), int(clip["clip_index"]), m)))
            for m in range(spec.num_candidates)])
        one = {k: torch.as_tensor(np.asarray(clip[k]))[None] for k in CONDITION_COLUMNS if k != "motion_mask"}
        cond = Conditions.from_batch(one, self.device).repeat(spec.num_candidates)
        result = sample(self.model, noise.to(self.device), cond, self.spec)
        return result.x.cpu(), video_to_uint8(self.vae.decode(result.x)).numpy()

    def _pairs_of(self, clip: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        """Score the candidates; one pair per dimension whose margin passes the threshold (see `pick_pair`)."""
        latents, videos = self.sample_candidates(clip)
        scores = {dimension: np.array([reward(video, clip) for video in videos])
                  for dimension, reward in self.rewards.items()}
        pairs = []
        for dimension in self.rewards:
            picked = pick_pair(scores, dimension, self.cfg.min_margin.get(dimension, 0.0),
                               self.cfg.other_dimension_tolerance)
            if picked is None:
                continue
            best, worst = picked
            pairs.append({**{k: clip[k] for k in CONDITION_COLUMNS + ["video_id", "clip_index", "identity_id"]},
                          "dimension": dimension, "margin": np.float32(scores[dimension][best] - scores[dimension][worst]),
                          "winner_latents": latents[best].numpy(), "loser_latents": latents[worst].numpy(),
                          "winner_reward": np.float32(scores[dimension][best]),
                          "loser_reward": np.float32(scores[dimension][worst])})
        return pairs


def candidate_spec(cfg: PreferencesConfig, teacher: Any) -> Any:
    """The teacher card's Euler/CFG sampler with ``cfg.sampling.steps`` (and its guidance when set)."""
    spec = teacher.sampler
    if spec.kind != "euler_cfg":
        raise ValueError(f"preference candidates come from an Euler/CFG teacher; {cfg.model.pretrained_path} "
                         f"samples with {spec.kind!r}")
    spec = spec.with_steps(cfg.sampling.steps)
    if cfg.sampling.guidance is not None:
        spec = spec.model_copy(update={"guidance": cfg.sampling.guidance})
    return spec


def pick_pair(scores: dict[str, np.ndarray], dimension: str, min_margin: float,
              tolerance: float | None) -> tuple[int, int] | None:
    """(winner, loser) candidate indices for `dimension`, or None when no pair's margin exceeds `min_margin`.

    tolerance None: best vs worst on `dimension`. Otherwise the widest-margin pair whose winner is not
    worse than its loser by more than `tolerance` on any other dimension in `scores`.
    """
    own = scores[dimension]
    if tolerance is None:
        best, worst = int(np.argmax(own)), int(np.argmin(own))
        return (best, worst) if own[best] - own[worst] > min_margin else None
    margins = own[:, None] - own[None, :]  # [winner, loser]
    allowed = margins > min_margin
    for other, values in scores.items():
        if other != dimension:
            allowed &= values[:, None] - values[None, :] >= -tolerance
    if not allowed.any():
        return None
    winner, loser = np.unravel_index(np.where(allowed, margins, -np.inf).argmax(), margins.shape)
    return int(winner), int(loser)


def _row(batch: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    return {k: v[i] for k, v in batch.items()}


def build_dataset(cfg: PreferencesConfig):
    """Shards -> teacher actor pool -> pair rows (a lazy Ray Dataset)."""
    import ray.data

    from artifacts.shards import read_shards

    ds = read_shards(cfg.data, Storage(cfg.storage), split=cfg.split, columns=CONDITION_COLUMNS + TRUTH_COLUMNS)
    if cfg.max_clips is not None:
        ds = ds.limit(cfg.max_clips)
    act = cfg.actors
    ds = ds.map_batches(CandidateScorer, fn_constructor_kwargs={"cfg_json": cfg.model_dump(mode="json")},
                        batch_size=act.batch_size, num_cpus=act.num_cpus, num_gpus=act.num_gpus,
                        compute=ray.data.ActorPoolStrategy(min_size=act.min_actors, max_size=act.max_actors))
    return ds


def run(cfg: PreferencesConfig) -> dict[str, Any]:
    """Write ``{output}/data/*.parquet`` and ``{output}/manifest.json``; return the manifest."""
    storage = Storage(cfg.storage)
    data_uri = storage.join(cfg.output, "data")
    if storage.list(data_uri):
        log.warning("replacing the pairs under %s", data_uri)
        storage.delete(data_uri)
    written = build_dataset(cfg).take_all()
    manifest = pairs_manifest(sorted({row["file"] for row in written}), [row["dimension"] for row in written],
                              cfg.model_dump(mode="json"))
    storage.write_json(storage.join(cfg.output, PAIRS_MANIFEST), manifest)
    log.info("wrote %d pairs (%s) to %s", manifest["num_pairs"], manifest["pairs_by_dimension"], cfg.output)
    return manifest
