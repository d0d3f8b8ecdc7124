"""A small puppet perception model: COCO-17 keypoints and mouth openness from 64x64 frames.

It plays the role DWPose and SyncNet play in the papers' evaluations (docs/design.md, "Evaluation on
the synthetic world"): run on *generated* frames, its detections are compared with the clip's exact
keypoints and mouth track (`model.metrics.pose_error`, `pck`, `lip_sync`). It is fitted on frames the
synthetic world renders, with exact labels, by `python -m ray_jobs.fit_perception`; the checked-in
fit is `model/assets/puppet_perception/` (`FIT_REPORT.json` gives its own error on held-out identities).

Two stages, one module (a diffusers `ModelMixin`/`ConfigMixin`, so a saved folder rebuilds itself):

* pose: a small convolutional encoder-decoder (64 -> 8 -> 32 px) whose 17 heatmaps at stride 2 are
  read out by a soft-argmax (integral regression: sub-pixel keypoints, trained with an L1 loss on
  coordinates in pixels).
* mouth: the mouth is a few pixels high at 64x64, so it is read from a crop: a square of side
  `mouth_crop_scale` x the head radius, centred below the head centre on the head's own axes (the
  head is a disc between the ears, the mouth below the nose; `ray_jobs/synthetic/puppet.py`), sampled
  to `mouth_crop_size`^2 pixels by `grid_sample` and read by a second small CNN (sigmoid output). The
  crop comes from the detected ears at inference and from the true ones (jittered) in training.

Frames of another size are resized to `size` x `size` first and the keypoints scaled back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from model.vae import uint8_to_signed

__all__ = ["PERCEPTION_PATH", "NUM_KEYPOINTS", "Detection", "PuppetPerception", "frames_to_input",
           "mouth_crop_theta", "load_perception"]

PERCEPTION_PATH = Path(__file__).resolve().parent / "assets" / "puppet_perception"
NUM_KEYPOINTS = 17
L_EAR, R_EAR = 3, 4  # COCO-17: the head disc spans the ears


@dataclass(frozen=True)
class Detection:
    """What the model sees in a clip: keypoints float (T, 17, 2) (x, y) pixels, mouth openness float (T,)."""

    keypoints: np.ndarray
    mouth: np.ndarray


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _Residual(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv(channels, channels), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def frames_to_input(frames: np.ndarray | torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[float, float]]:
    """uint8 (T, H, W, 3) -> float (T, 3, size, size) in [-1, 1] and the (x, y) scale back to (W, H) pixels."""
    video = torch.as_tensor(np.asarray(frames))
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3); got {tuple(video.shape)} {video.dtype}")
    height, width = video.shape[1:3]
    x = uint8_to_signed(video.permute(0, 3, 1, 2))
    if (height, width) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x, (width / size, height / size)


def mouth_crop_theta(keypoints: torch.Tensor, size: int, scale: float, offset: float) -> torch.Tensor:
    """`affine_grid` matrices (B, 2, 3) of the mouth crop for keypoints (B, 17, 2) in pixels of a `size` frame.

    The crop is a square of side ``scale`` x head radius centred ``offset`` radii below the head
    centre, rotated with the ear axis, so the mouth sits at the same place in every crop.
    """
    left, right = keypoints[:, L_EAR], keypoints[:, R_EAR]
    span = left - right
    radius = span.norm(dim=-1, keepdim=True).div(2).clamp_min(1.5)
    ear_axis = span / (2 * radius)
    down_axis = torch.stack([-ear_axis[:, 1], ear_axis[:, 0]], dim=-1)
    centre = (left + right) / 2 + offset * radius * down_axis
    half = scale * radius / size  # half side in normalised [-1, 1] units
    theta = torch.stack([half * ear_axis, half * down_axis, 2 * centre / size - 1], dim=-1)
    return theta  # rows x and y: input = centre + half * (a * ear_axis + b * down_axis)


class PuppetPerception(ModelMixin, ConfigMixin):
    """Frames float (B, 3, size, size) in [-1, 1] -> keypoints (B, 17, 2) pixels and mouth openness (B,)."""

    @register_to_config
    def __init__(self, size: int = 64, width: int = 16, mouth_width: int = 16, mouth_crop_size: int = 24,
                 mouth_crop_scale: float = 2.0, mouth_crop_offset: float = 0.35, num_keypoints: int = NUM_KEYPOINTS):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(3, w, stride=2), _conv(w, w))  # 32 px
        self.down16 = nn.Sequential(_conv(w, 2 * w, stride=2), _Residual(2 * w))
        self.down8 = nn.Sequential(_conv(2 * w, 4 * w, stride=2), _Residual(4 * w))
        self.lateral16 = nn.Conv2d(2 * w, 2 * w, 1)
        self.lateral32 = nn.Conv2d(w, w, 1)
        self.up16 = nn.Sequential(_conv(4 * w, 2 * w, kernel=1))
        self.fuse16 = _conv(2 * w, 2 * w)
        self.up32 = _conv(2 * w, w, kernel=1)
        self.fuse32 = _conv(w, w)
        self.heatmap = nn.Conv2d(w, num_keypoints, 1)
        m = mouth_width
        self.mouth = nn.Sequential(_conv(3, m), _conv(m, 2 * m, stride=2), _conv(2 * m, 2 * m),
                                   _conv(2 * m, 4 * m, stride=2), _conv(4 * m, 4 * m), nn.AdaptiveAvgPool2d(1),
                                   nn.Flatten(), nn.Linear(4 * m, 1))

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """Keypoint logits (B, 17, size/2, size/2) for frames (B, 3, size, size)."""
        f32 = self.stem(x)
        f16 = self.down16(f32)
        f8 = self.down8(f16)
        u16 = self.fuse16(F.interpolate(self.up16(f8), scale_factor=2.0, mode="nearest") + self.lateral16(f16))
        u32 = self.fuse32(F.interpolate(self.up32(u16), scale_factor=2.0, mode="nearest") + self.lateral32(f32))
        return self.heatmap(u32)

    def keypoints(self, x: torch.Tensor) -> torch.Tensor:
        """Soft-argmax keypoints (B, 17, 2) in pixels of the `size` frame."""
        logits = self.heatmaps(x)
        batch, joints, rows, cols = logits.shape
        prob = logits.flatten(2).softmax(-1).view(batch, joints, rows, cols)
        stride = x.shape[-1] / cols
        xs = (torch.arange(cols, device=x.device, dtype=prob.dtype) + 0.5) * stride
        ys = (torch.arange(rows, device=x.device, dtype=prob.dtype) + 0.5) * stride
        return torch.stack([(prob.sum(2) * xs).sum(-1), (prob.sum(3) * ys).sum(-1)], dim=-1)

    def mouth_openness(self, x: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """Mouth openness (B,) in [0, 1] read from the crop placed by ``keypoints`` (B, 17, 2) pixels."""
        cfg = self.config
        theta = mouth_crop_theta(keypoints.to(x.dtype), x.shape[-1], cfg.mouth_crop_scale, cfg.mouth_crop_offset)
        side = cfg.mouth_crop_size
        grid = F.affine_grid(theta, [x.shape[0], 3, side, side], align_corners=False)
        crop = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return torch.sigmoid(self.mouth(crop)[:, 0])

    def forward(self, x: torch.Tensor, crop_keypoints: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keypoints (B, 17, 2) pixels, mouth (B,)); the mouth crop uses ``crop_keypoints`` when given (training)."""
        keypoints = self.keypoints(x)
        crop_from = keypoints.detach() if crop_keypoints is None else crop_keypoints
        return keypoints, self.mouth_openness(x, crop_from)

    @torch.no_grad()
    def detect(self, frames: np.ndarray | torch.Tensor, batch_size: int = 64) -> Detection:
        """Keypoints (T, 17, 2) in the frames' own pixels and mouth openness (T,) for uint8 frames (T, H, W, 3)."""
        was_training = self.training
        self.eval()
        x, (sx, sy) = frames_to_input(frames, self.config.size)
        param = next(self.parameters())
        keypoints, mouth = [], []
        for chunk in x.split(batch_size):
            k, m = self(chunk.to(param.device, param.dtype))
            keypoints.append(k.float().cpu())
            mouth.append(m.float().cpu())
        self.train(was_training)
        points = torch.cat(keypoints).numpy().astype(np.float64) * np.array([sx, sy])
        return Detection(keypoints=points, mouth=torch.cat(mouth).numpy().astype(np.float64))


def load_perception(path: str | None = None, device: str | torch.device = "cpu") -> PuppetPerception:
    """The perception model of a saved local folder (None = the checked-in fit), in eval mode.

    Remote folders: `artifacts.models.load_perception`.
    """
    from model.presets import require_local

    local = PERCEPTION_PATH if path is None else require_local(str(path), "perception path")
    return PuppetPerception.from_pretrained(str(local)).to(device).eval()
