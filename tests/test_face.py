"""The face condition: `model.face.reference_face` (box, Haar detection, none) and the closed leak.

The denoiser's face condition is the reference's face only. The leak test runs the real
preprocessing stages (`udfs.clips_from_frames` + `udfs.VaeEncoder`, the checked-in tiny VAE) on a
synthetic puppet video and a tiny denoiser with its face path woken: the clip's own per-frame face
track (`face_crops`, `face_boxes`, `has_face`) must not change the model's output by a single bit,
while the reference's face latent must change it.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from core.config import load_config
from model.face import FaceCropConfig, crop_faces, detect_face, reference_face

haar = pytest.mark.skipif(not hasattr(cv2, "CascadeClassifier"), reason="OpenCV 5 has no Haar cascades")
CFG = FaceCropConfig(detector="haar")  # the Haar tests; the default is auto (BlazeFace when fetched)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (4,) boxes [x0, y0, x1, y1]."""
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    return float(inter / (np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter))


def test_reference_face_with_a_box_is_crop_faces_of_that_box():
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    box = np.array([30.5, 8.0, 62.0, 41.0], np.float32)
    face = reference_face(image, CFG, box=box)
    assert face.found and face.crop.shape == (CFG.size, CFG.size, 3) and face.crop.dtype == np.uint8
    np.testing.assert_array_equal(face.crop, crop_faces(image[None], box[None], CFG.size, CFG.margin)[0])
    np.testing.assert_array_equal(face.box, box)
    other = reference_face(image, FaceCropConfig(size=16, margin=1.5), box=box.tolist())  # a list works too
    np.testing.assert_array_equal(other.crop, crop_faces(image[None], box[None], 16, 1.5)[0])


@haar
@pytest.mark.parametrize("height,width", [(64, 64), (240, 416)])
def test_reference_face_detects_a_haar_face(height, width):
    from ray_jobs.synthetic.faces import face_track_clip

    frames, truth = face_track_clip(1, height, width)
    face = reference_face(frames[0], CFG)
    assert face.found and _iou(face.box, truth[0]) > 0.8
    np.testing.assert_array_equal(face.crop, crop_faces(frames[:1], face.box[None], CFG.size, CFG.margin)[0])
    np.testing.assert_array_equal(face.box, detect_face(frames[0], CFG.min_side))
    nan_box = reference_face(frames[0], CFG, box=np.full(4, np.nan, np.float32))  # NaN box = none: detect
    np.testing.assert_array_equal(nan_box.box, face.box)
    assert not reference_face(frames[0], CFG, detect=False).found  # no box, detection off


@haar
def test_reference_face_on_a_blank_or_faceless_image_is_not_found():
    from ray_jobs.synthetic.faces import face_track_clip

    for image in (np.full((64, 64, 3), 128, np.uint8), face_track_clip(1, 64, 64, face=False)[0][0]):
        face = reference_face(image, CFG)
        assert not face.found and np.isnan(face.box).all()
        assert face.crop.shape == (CFG.size, CFG.size, 3) and not face.crop.any()


def test_serving_and_preprocessing_cut_the_same_face():
    from ray_jobs.preprocess import PreprocessConfig
    from serving.config import ServeAppConfig

    trained = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml").face
    served = ServeAppConfig().face
    assert served == FaceCropConfig(**{k: getattr(trained, k) for k in FaceCropConfig.model_fields})


# --------------------------------------------------------------------------- the leak is closed
@pytest.fixture(scope="module")
def preprocessed():
    """One synthetic puppet video (sidecar face boxes) through every CPU stage and the VAE stage: a
    columnar batch of its clips with the shard schema, and the config it was made with."""
    from ray_jobs.preprocess import PreprocessConfig
    from ray_jobs.preprocess import udfs
    from ray_jobs.synthetic import SyntheticConfig, generate_video

    torch.set_num_threads(1)
    cfg = load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml", {"input": "in", "output": "out"})
    video = generate_video(SyntheticConfig(out="unused", duration=1.0, seed=3), 0)
    clips = udfs.clips_from_frames("v0.mp4", video.sidecar, video.frames, video.audio, cfg)
    assert (clips["error_stage"] == "").all() and clips["has_face"].all() and clips["has_ref_face"].all()
    return udfs.VaeEncoder(cfg), clips, cfg


def _denoised(batch: dict) -> torch.Tensor:
    """A tiny denoiser (fixed init, every zero-init condition path woken) on fixed noise: v (B, C, T, h, w)."""
    from model.conditions import Conditions
    from model.presets import ModelConfig, build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("ref_embedding", "pose_encoder.proj", "null_")) or ".to_out." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
        latents = torch.as_tensor(batch["latents"])
        x = torch.randn(latents.shape, generator=gen)
        sigma = torch.full((len(x),), 0.6)
        return model(x, sigma, Conditions.from_batch(batch))


def test_the_clips_own_faces_never_reach_the_model(preprocessed):
    from artifacts.pairs import CONDITION_COLUMNS
    from ray_jobs.training.teacher_objective import TRAIN_COLUMNS as TEACHER_COLUMNS
    from ray_jobs.train_tpo import TRAIN_COLUMNS as TPO_COLUMNS

    encoder, clips, cfg = preprocessed
    batch = encoder({k: v.copy() for k, v in clips.items()})
    assert "face_latents" not in batch and batch["ref_face_latent"].shape == (len(clips["frames"]), 16, 1, 8, 8)
    # the clip's own face track, changed before the VAE stage: zeroed crops, shuffled boxes, flags off
    changed = {k: v.copy() for k, v in clips.items()}
    changed["face_crops"] = np.zeros_like(changed["face_crops"])
    changed["face_boxes"] = changed["face_boxes"][:, ::-1].copy()
    changed["has_face"] = np.zeros_like(changed["has_face"])
    other = encoder(changed)
    np.testing.assert_array_equal(other["ref_face_latent"], batch["ref_face_latent"])
    assert torch.equal(_denoised(other), _denoised(batch))  # bit-identical
    # ...while the reference's face latent does reach it (so the check above could fail)
    moved = {**batch, "ref_face_latent": np.roll(batch["ref_face_latent"], 1, axis=-1)}
    assert (_denoised(moved) - _denoised(batch)).abs().max() > 1e-4
    # and the jobs never load the per-frame track as a condition column
    for columns in (TEACHER_COLUMNS, TPO_COLUMNS, CONDITION_COLUMNS):
        assert "ref_face_latent" in columns and "has_ref_face" in columns
        assert not {"face_crops", "face_boxes", "has_face", "face_latents"} & set(columns), columns


def test_the_vae_stage_runs_in_its_own_dtype(preprocessed):
    """`vae.dtype` (a `model.vae.VAEConfig` field, the same the server takes) reaches the encoder:
    bf16 latents are fp32 ones up to bf16 rounding, not another computation."""
    from ray_jobs.preprocess import udfs

    encoder, clips, cfg = preprocessed
    half = udfs.VaeEncoder(cfg.model_copy(update={"vae": cfg.vae.model_copy(update={"dtype": "bfloat16"})}))
    assert encoder.vae.dtype == torch.float32 and half.vae.dtype == torch.bfloat16
    batch = {k: v[:2] for k, v in clips.items()}
    full, low = encoder({**batch})["latents"], half({**batch})["latents"]
    assert low.dtype == np.float32 and low.shape == full.shape
    error = np.abs(low - full).mean() / np.abs(full).mean()
    assert 0 < error < 0.05
