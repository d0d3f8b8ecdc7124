"""Conditions: shard columns -> tensors, drop / random_drop, batching helpers."""

from __future__ import annotations

import pytest
import torch

from model.conditions import CONDITION_NAMES, Conditions


def _batch(b: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pose = torch.randint(0, 256, (b, 8, 64, 64, 3), dtype=torch.uint8, generator=gen)
    return {
        "ref_latent": torch.randn(b, 16, 1, 16, 16, generator=gen),
        "pose": pose,
        "audio_feats": torch.randn(b, 8, 6, 32, generator=gen),
        "ref_face_latent": torch.randn(b, 16, 1, 8, 8, generator=gen),
        "has_audio": torch.tensor([True, False, True][:b]),
        "has_ref_face": torch.tensor([False, True, True][:b]),
        # the clip's per-frame face track: ground truth for evaluation, never a condition
        "face_crops": torch.randint(0, 256, (b, 8, 32, 32, 3), dtype=torch.uint8, generator=gen),
        "has_face": torch.tensor([True, False, False][:b]),
        "video_id": ["a", "b", "c"][:b],  # non-tensor columns are ignored
    }


def test_from_batch_maps_columns_and_flags():
    batch = _batch()
    cond = Conditions.from_batch(batch, device="cpu", dtype=torch.float64)
    assert cond.batch_size == 3
    assert cond.pose.shape == (3, 3, 8, 64, 64) and cond.pose.dtype == torch.float64
    # channel c of frame t at (y, x) comes from pose[b, t, y, x, c], scaled 0 -> -1, 255 -> 1
    b, t, y, x, c = 1, 5, 7, 9, 2
    expected = batch["pose"][b, t, y, x, c].item() / 127.5 - 1.0
    assert cond.pose[b, c, t, y, x].item() == pytest.approx(expected)
    assert cond.pose.min() >= -1.0 and cond.pose.max() <= 1.0
    assert torch.equal(cond.keep_mask("audio"), torch.tensor([True, False, True]))
    assert torch.equal(cond.keep_mask("face"), torch.tensor([False, True, True]))
    assert torch.equal(cond.keep_mask("ref"), torch.ones(3, dtype=torch.bool))
    assert torch.allclose(cond.audio, batch["audio_feats"].double())
    assert cond.face.shape == (3, 16, 1, 8, 8) and torch.allclose(cond.face, batch["ref_face_latent"].double())


def test_face_comes_from_the_reference_columns_only():
    """`has_face` / `face_crops` (the clip's own per-frame faces) neither set the face nor its keep flag."""
    batch = _batch()
    cond = Conditions.from_batch(batch)
    no_track = Conditions.from_batch({k: v for k, v in batch.items() if k not in ("face_crops", "has_face")})
    assert torch.equal(cond.face, no_track.face) and torch.equal(cond.keep_mask("face"), no_track.keep_mask("face"))
    assert torch.equal(cond.keep_mask("face"), batch["has_ref_face"])
    only_track = Conditions.from_batch({k: v for k, v in batch.items() if not k.startswith(("ref_face", "has_ref"))})
    assert only_track.face is None and not only_track.keep_mask("face").any()


def test_from_batch_without_optional_columns_and_missing_ref():
    batch = {"ref_latent": torch.zeros(2, 16, 1, 16, 16)}
    cond = Conditions.from_batch(batch)
    assert cond.pose is None and cond.audio is None and cond.face is None
    assert not cond.keep_mask("audio").any() and not cond.keep_mask("pose").any()
    with pytest.raises(KeyError, match="ref_latent"):
        Conditions.from_batch({"pose": torch.zeros(1, 8, 64, 64, 3, dtype=torch.uint8)})


def test_drop_and_random_drop():
    cond = Conditions.from_batch(_batch())
    dropped = cond.drop({"audio", "pose"})
    assert not dropped.keep_mask("audio").any() and not dropped.keep_mask("pose").any()
    assert dropped.keep_mask("ref").all()
    assert torch.equal(cond.keep_mask("audio"), torch.tensor([True, False, True]))  # original untouched
    with pytest.raises(KeyError):
        cond.drop({"text"})

    big = Conditions(ref_latent=torch.zeros(4000, 1, 1, 1, 1), pose=torch.zeros(4000, 3, 1, 1, 1))
    rnd = big.random_drop({"ref": 0.25, "pose": 1.0}, generator=torch.Generator().manual_seed(1))
    assert abs(rnd.keep_mask("ref").float().mean().item() - 0.75) < 0.03
    assert not rnd.keep_mask("pose").any()
    again = big.random_drop({"ref": 0.25, "pose": 1.0}, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rnd.keep_mask("ref"), again.keep_mask("ref"))
    # an already-dropped sample stays dropped
    flags = Conditions.from_batch(_batch()).random_drop({"audio": 0.0})
    assert torch.equal(flags.keep_mask("audio"), torch.tensor([True, False, True]))
    with pytest.raises(ValueError):
        big.random_drop({"ref": 1.5})


def test_cat_repeat_to_and_validation():
    cond = Conditions.from_batch(_batch(2))
    both = Conditions.cat([cond, cond.drop({"audio"})])
    assert both.batch_size == 4 and both.audio.shape[0] == 4
    assert torch.equal(both.keep_mask("audio"), torch.tensor([True, False, False, False]))
    assert torch.equal(both.keep_mask("face"), torch.tensor([False, True, False, True]))
    rep = cond.repeat(3)
    assert rep.batch_size == 6 and torch.equal(rep.ref_latent[4], cond.ref_latent[0])
    half = cond.to(dtype=torch.float16)
    assert half.ref_latent.dtype == torch.float16 and half.keep_mask("audio").dtype == torch.bool
    with pytest.raises(ValueError, match="batch size"):
        Conditions(ref_latent=torch.zeros(2, 16, 1, 4, 4), audio=torch.zeros(3, 8, 6, 32))
    with pytest.raises(ValueError, match="bool"):
        Conditions(ref_latent=torch.zeros(2, 16, 1, 4, 4), keep={"ref": torch.ones(2)})
    with pytest.raises(ValueError, match="different present"):
        Conditions.cat([cond, Conditions(ref_latent=cond.ref_latent)])
    assert set(CONDITION_NAMES) == {"ref", "pose", "audio", "face", "motion"}
