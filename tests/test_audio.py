"""Frame-aligned log-mel windows: shapes, silence, pitch, time alignment, wav2vec2 hook."""

from __future__ import annotations

import numpy as np
import pytest

from model.audio import AudioFeatureConfig, audio_features, mel_filterbank, wav2vec2_features

SR = 16000


def _tone(freq: float, seconds: float) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_shape_and_silence_is_constant():
    cfg = AudioFeatureConfig(n_mels=32, mels_per_frame=2, context_frames=1)
    feats = audio_features(np.zeros(SR // 2, np.float32), fps=16, num_frames=8, cfg=cfg)
    assert feats.shape == (8, cfg.window, 32) == (8, 6, 32) and feats.dtype == np.float32
    assert np.all(feats == np.float32(np.log(cfg.log_floor)))


def test_filterbank_and_pitch_lands_in_the_right_band():
    cfg = AudioFeatureConfig()
    bank = mel_filterbank(SR, cfg.n_fft, cfg.n_mels, 0.0, SR / 2)
    assert bank.shape == (32, cfg.n_fft // 2 + 1) and bank.max() <= 1.0 and (bank.sum(1) > 0).all()
    low = audio_features(_tone(300, 1.0), 16, 16, cfg)
    high = audio_features(_tone(3000, 1.0), 16, 16, cfg)
    low_bin, high_bin = low[8].mean(0).argmax(), high[8].mean(0).argmax()
    for freq, found in ((300, low_bin), (3000, high_bin)):  # the loudest row is the filter covering freq
        assert abs(int(bank[:, round(freq / (SR / cfg.n_fft))].argmax()) - int(found)) <= 1
    assert high_bin > low_bin + 5


def test_rows_align_with_video_frames():
    """A click inside video frame 5 is loudest in frame 5's own row block, then its neighbours' context."""
    fps, frames = 16, 12
    cfg = AudioFeatureConfig(mels_per_frame=2, context_frames=1)
    wave = np.zeros(SR * frames // fps, np.float32)
    start = int(5.5 / fps * SR) - 64  # centred in frame 5, within its second mel row
    wave[start : start + 128] = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    feats = audio_features(wave, fps, frames, cfg).mean(-1)  # (frames, W)
    own = feats[:, 2:4].max(1)  # the centre block (context_frames * mels_per_frame = 2 rows in)
    assert own.argmax() == 5
    assert own[5] > own[2] + 3 and own[5] > own[8] + 3
    assert feats[4, 4:6].max() > feats[4, 0:2].max() + 3  # frame 4's look-ahead sees it
    assert feats[6, 0:2].max() > feats[6, 4:6].max() + 3  # frame 6's look-back sees it


def test_wav2vec2_hook_from_a_local_folder(tmp_path):
    import transformers
    cfg_w = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
                                        conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(cfg_w).save_pretrained(tmp_path)
    cfg = AudioFeatureConfig(mels_per_frame=2, context_frames=1)
    feats = wav2vec2_features(_tone(440, 0.5), 16, 8, str(tmp_path), cfg)
    assert feats.shape == (8, 6, 16) and np.isfinite(feats).all()
    assert np.allclose(feats[3, 2:4], feats[2, 4:6])  # neighbour windows share rows


def test_bad_input_is_loud():
    with pytest.raises(ValueError):
        audio_features(np.zeros((2, 100), np.float32), 16, 4)
    with pytest.raises(ValueError):
        audio_features(np.zeros(100, np.float32), 0, 4)
    with pytest.raises(ValueError):
        AudioFeatureConfig(fmin=9000)
    with pytest.raises(ValueError, match="n_fft"):  # 16 kHz at 8 fps, 2 rows/frame = 1000 samples > 512
        audio_features(np.zeros(SR, np.float32), 8, 4)
