"""The denoiser's conditions: one dataclass every stage passes to ``model(x, sigma, cond)``.

Shapes (B batch, C latent channels, T video frames, T_lat latent frames, h, w latent size,
H, W pixel size, W_a audio window rows, M mel bins):

* ``ref_latent`` (B, C, 1, h, w): VAE latent of the reference image (the video's first frame).
* ``pose`` (B, 3, T, H, W) float in [-1, 1]: rendered skeleton maps, one per video frame.
* ``audio`` (B, T, W_a, M): log-mel windows per video frame (`model.audio.audio_features`).
* ``face`` (B, C, 1, hf, wf): VAE latent of the *reference's* face crop (`model.face.reference_face`),
  broadcast over latent frames by the denoiser; (B, C, T_lat, hf, wf) per-latent-frame faces are
  accepted too. Shards give the reference's (``ref_face_latent``): the clip's own per-frame crops
  would leak the ground-truth mouth in training while serving only has the reference.
* ``motion`` (B, C, k, h, w): clean latents of the last k latent frames of the previous chunk (long-form
  continuation, motion frames): the denoiser pins the first k latent frames of x to them (`model.motion_frames`).
  Keyword-only in practice (it follows ``keep``).
* ``keep``: per condition a bool (B,) mask; False = that sample uses the condition's learned null
  (classifier-free guidance, condition dropout, missing audio/face). A condition that is None is
  dropped for every sample.

Every method returns a new object; tensors are never modified in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import torch

__all__ = ["Conditions", "CONDITION_NAMES"]

CONDITION_NAMES: tuple[str, ...] = ("ref", "pose", "audio", "face", "motion")
_TENSOR_OF = {"ref": "ref_latent", "pose": "pose", "audio": "audio", "face": "face", "motion": "motion"}


@dataclass(frozen=True)
class Conditions:
    """Reference latent, pose maps, audio windows, face latents, motion-frame prefix and per-sample keep masks."""

    ref_latent: torch.Tensor | None = None
    pose: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    face: torch.Tensor | None = None
    keep: dict[str, torch.Tensor] = field(default_factory=dict)
    motion: torch.Tensor | None = None

    def __post_init__(self) -> None:
        unknown = set(self.keep) - set(CONDITION_NAMES)
        if unknown:
            raise ValueError(f"keep has unknown condition names {sorted(unknown)}; known: {CONDITION_NAMES}")
        sizes = {name: t.shape[0] for name, t in self._tensors().items() if t is not None}
        sizes.update({f"keep[{name}]": m.shape[0] for name, m in self.keep.items()})
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditions disagree on batch size: {sizes}")
        for name, mask in self.keep.items():
            if mask.dtype != torch.bool or mask.ndim != 1:
                raise ValueError(f"keep[{name!r}] must be a bool tensor of shape (B,), got {mask.dtype} {tuple(mask.shape)}")
        if self.pose is not None and self.pose.shape[1] != 3:
            raise ValueError(f"pose must be (B, 3, T, H, W), got {tuple(self.pose.shape)}")

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {name: getattr(self, attr) for name, attr in _TENSOR_OF.items()}

    @property
    def batch_size(self) -> int:
        """B, taken from any present tensor or mask."""
        for tensor in list(self._tensors().values()) + list(self.keep.values()):
            if tensor is not None:
                return int(tensor.shape[0])
        raise ValueError("empty Conditions has no batch size")

    def keep_mask(self, name: str, device: torch.device | None = None, batch_size: int | None = None) -> torch.Tensor:
        """(B,) bool: which samples use condition `name` (all False when its tensor is None).

        `batch_size` is only needed for an empty Conditions (fully unconditional call)."""
        if name not in CONDITION_NAMES:
            raise KeyError(f"unknown condition {name!r}; known: {CONDITION_NAMES}")
        empty = all(t is None for t in self._tensors().values()) and not self.keep
        batch = batch_size if empty and batch_size is not None else self.batch_size
        device = device if device is not None else next(
            (t.device for t in self._tensors().values() if t is not None), torch.device("cpu"))
        if self._tensors()[name] is None:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        mask = self.keep.get(name)
        return torch.ones(batch, dtype=torch.bool, device=device) if mask is None else mask.to(device)

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None,
                   dtype: torch.dtype = torch.float32) -> "Conditions":
        """Shard columns (docs/design.md) -> Conditions: uint8 pose (B,T,H,W,3) -> (B,3,T,H,W) in [-1,1].

        A batch without ``pose`` but with `model.pose.POSE_RENDER_COLUMNS` (shards written with
        ``store_pixels: false``) gets its maps rendered here, on the worker, from the keypoints."""
        if "ref_latent" not in batch:
            raise KeyError("batch has no 'ref_latent' column (preprocess with the VAE on)")
        ref = torch.as_tensor(batch["ref_latent"])
        pose = _pose_condition(batch)
        audio = torch.as_tensor(batch["audio_feats"]) if "audio_feats" in batch else None
        face = torch.as_tensor(batch["ref_face_latent"]) if "ref_face_latent" in batch else None
        keep = {}
        for name, flag in (("audio", "has_audio"), ("face", "has_ref_face")):
            if flag in batch:
                keep[name] = torch.as_tensor(batch[flag]).reshape(-1).to(torch.bool)
        return cls(ref, pose, audio, face, keep).to(device, dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditions":
        """Move tensors to `device` and float tensors to `dtype`; masks stay bool."""
        moved = {attr: None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else None)
                 for attr, t in ((a, getattr(self, a)) for a in _TENSOR_OF.values())}
        keep = {name: mask.to(device) for name, mask in self.keep.items()}
        return replace(self, keep=keep, **moved)

    def drop(self, names: set[str] | frozenset[str] | list[str] | tuple[str, ...]) -> "Conditions":
        """Drop the named conditions to their learned nulls for every sample (CFG's unconditional branch)."""
        keep = dict(self.keep)
        for name in names:
            self.keep_mask(name)  # validates the name
            keep[name] = torch.zeros(self.batch_size, dtype=torch.bool, device=self._device())
        return replace(self, keep=keep)

    def random_drop(self, probs: Mapping[str, float], generator: torch.Generator | None = None) -> "Conditions":
        """Drop each condition independently per sample with probability probs[name] (condition dropout)."""
        keep = dict(self.keep)
        for name in sorted(probs):
            p = float(probs[name])
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"drop probability for {name!r} must be in [0, 1], got {p}")
            current = self.keep_mask(name, device=torch.device("cpu"))
            draw = torch.rand(self.batch_size, generator=generator) >= p
            keep[name] = (current & draw).to(self._device())
        return replace(self, keep=keep)

    def random_drop_joint(self, names: set[str] | list[str] | tuple[str, ...], p: float,
                          generator: torch.Generator | None = None) -> "Conditions":
        """Drop all ``names`` *together* per sample with probability ``p``.

        CFG's unconditional branch is ``cond.drop(names)``: independent per-condition dropout with
        p = 0.1 trains that exact combination on only p^3 = 0.1% of samples (three conditions), so the
        branch stays untrained and guidance hurts. A joint draw trains it on a fraction p of samples.
        """
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"joint drop probability must be in [0, 1], got {p}")
        drawn = (torch.rand(self.batch_size, generator=generator) < p).to(self._device())
        keep = dict(self.keep)
        for name in sorted(names):
            keep[name] = self.keep_mask(name) & ~drawn
        return replace(self, keep=keep)

    def _device(self) -> torch.device:
        return next((t.device for t in self._tensors().values() if t is not None), torch.device("cpu"))

    def _full_keep(self) -> dict[str, torch.Tensor]:
        return {name: self.keep_mask(name) for name in CONDITION_NAMES if self._tensors()[name] is not None}

    @staticmethod
    def cat(items: list["Conditions"]) -> "Conditions":
        """Concatenate along the batch (e.g. [cond, cond.drop(...)] for one batched CFG call)."""
        if not items:
            raise ValueError("cat needs at least one Conditions")
        present = [{n for n, t in c._tensors().items() if t is not None} for c in items]
        if any(p != present[0] for p in present):
            raise ValueError(f"cannot cat Conditions with different present conditions: {present}")
        tensors = {attr: torch.cat([getattr(c, attr) for c in items]) if name in present[0] else None
                   for name, attr in _TENSOR_OF.items()}
        keeps = [c._full_keep() for c in items]
        keep = {name: torch.cat([k[name] for k in keeps]) for name in keeps[0]}
        return Conditions(keep=keep, **tensors)

    def repeat(self, times: int) -> "Conditions":
        """The batch repeated `times` times, [c, c, ...] (same order as torch.cat)."""
        return Conditions.cat([self] * times)


def _pose_condition(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The batch's pose maps as floats: stored (``pose``), else drawn from ``keypoints`` with the canvas
    and threshold of its render columns, else None (no pose condition).

    Why here: every consumer of shard batches (teacher, distillation, preferences, evaluation) builds
    its conditions with `Conditions.from_batch`, so latent-first shards need no change in any of them.
    """
    from model.pose import POSE_RENDER_COLUMNS, render_pose_batch

    if "pose" in batch:
        return _pose_to_float(torch.as_tensor(batch["pose"]))
    present = [c for c in POSE_RENDER_COLUMNS if c in batch]
    if not set(present) - {"keypoints"}:  # keypoints alone are a column like any other, not a request to draw
        return None
    if len(present) < len(POSE_RENDER_COLUMNS):
        raise KeyError(f"batch has {present} but not all of {list(POSE_RENDER_COLUMNS)}: cannot render its pose "
                       "maps (read the shards with artifacts.shards.read_shards, which adds the canvas columns)")
    canvas = {c: torch.as_tensor(batch[c]).reshape(-1).unique() for c in POSE_RENDER_COLUMNS[1:]}
    if any(len(v) != 1 for v in canvas.values()):
        raise ValueError(f"one batch must share one pose canvas, got {({k: v.tolist() for k, v in canvas.items()})}")
    keypoints = torch.as_tensor(batch["keypoints"]).cpu().numpy()
    maps = render_pose_batch(keypoints, int(canvas["pose_height"]), int(canvas["pose_width"]),
                             float(canvas["pose_conf_threshold"]))
    return _pose_to_float(torch.from_numpy(maps))


def _pose_to_float(pose_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pose maps (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]."""
    if pose_uint8.ndim != 5 or pose_uint8.shape[-1] != 3:
        raise ValueError(f"pose column must be (B, T, H, W, 3), got {tuple(pose_uint8.shape)}")
    from model.vae import uint8_to_signed

    return uint8_to_signed(pose_uint8.permute(0, 4, 1, 2, 3))
