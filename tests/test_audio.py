"""Audio features: log-mel shapes, silence, pitch, time alignment; the wav2vec2 encoder, its checks, and
preprocessing and serving computing the same features through the one `AudioEncoder`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.audio import AudioEncoder, AudioFeatureConfig, audio_features, folder_fingerprint, mel_filterbank

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


def test_bad_input_is_loud():
    with pytest.raises(ValueError):
        audio_features(np.zeros((2, 100), np.float32), 16, 4)
    with pytest.raises(ValueError):
        audio_features(np.zeros(100, np.float32), 0, 4)
    with pytest.raises(ValueError):
        AudioFeatureConfig(fmin=9000)
    with pytest.raises(ValueError, match="n_fft"):  # 16 kHz at 8 fps, 2 rows/frame = 1000 samples > 512
        audio_features(np.zeros(SR, np.float32), 8, 4)
    with pytest.raises(ValueError, match="AudioEncoder"):  # log-mels of a wav2vec2 config would be the wrong features
        audio_features(np.zeros(SR, np.float32), 16, 4, AudioFeatureConfig(encoder="wav2vec2", encoder_path="/x"))


# ------------------------------------------------------------------------------------------ wav2vec2
HIDDEN = 16


@pytest.fixture(scope="module")
def w2v_folder(tmp_path_factory) -> str:
    """A tiny randomly initialised Wav2Vec2Model (conv stride 10, receptive field 20) + its feature extractor."""
    import torch
    import transformers

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_wav2vec2")
    config = transformers.Wav2Vec2Config(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(config).save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=SR).save_pretrained(folder)
    return str(folder)


def _w2v_cfg(folder: str, **extra) -> AudioFeatureConfig:
    return AudioFeatureConfig(encoder="wav2vec2", encoder_path=folder, n_mels=HIDDEN, **extra)


def test_logmel_encoder_is_the_log_mel_function_bit_for_bit():
    wave, cfg = _tone(440, 0.6), AudioFeatureConfig(mels_per_frame=3, context_frames=2)
    assert np.array_equal(AudioEncoder(cfg)(wave, 25, 10), audio_features(wave, 25, 10, cfg))


def test_wav2vec2_features_identical_in_preprocessing_and_serving(w2v_folder):
    """The preprocessing UDF and the serving engine, each built from its own config, give equal features."""
    import torch

    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.udfs import add_audio_features
    from serving.config import ServeAppConfig
    from serving.engine import AnimationEngine
    from serving.inputs import AnimationRequest

    audio = _w2v_cfg(w2v_folder)
    wave = (_tone(300, 0.5) + np.random.default_rng(1).standard_normal(SR // 2).astype(np.float32) * 0.1)
    cfg = PreprocessConfig(input="unused", output="unused", fps=16, clip_frames=8, audio={"features": audio})
    reversed_wave = wave[::-1].copy()
    batch = {"audio": np.stack([wave, np.zeros_like(wave), reversed_wave]), "has_audio": np.array([True, False, True]),
             "error_stage": np.array(["", "", ""], object), "error_reason": np.array(["", "", ""], object),
             "source": np.array(["a", "b", "c"]), "clip_index": np.array([0, 1, 2])}
    shards = add_audio_features(batch, cfg)["audio_feats"]
    assert shards.shape == (3, 8, audio.window, HIDDEN) and list(batch["error_stage"]) == ["", "", ""]
    torch.manual_seed(0)
    engine = AnimationEngine(ServeAppConfig(model={"preset": "tiny", "audio": audio.model_dump()}, torch_threads=1))
    assert engine.audio_encoder.fingerprint == folder_fingerprint(w2v_folder)
    ref = np.full((64, 64, 3), 128, np.uint8)
    served = [engine.conditions(AnimationRequest(ref, w, None, 8, 16.0, 1, 0)).audio[0].numpy()
              for w in (wave, reversed_wave)]
    assert np.array_equal(served[0], shards[0]) and np.array_equal(served[1], shards[2])
    assert not np.allclose(shards[0], shards[2], atol=1e-3) and not shards[1].any()  # real features; silent clip zeros


def test_wav2vec2_rows_follow_the_frames_and_only_the_clips_span(w2v_folder):
    """Neighbour windows share rows; audio past the last frame's look-ahead cannot change any feature."""
    import torch

    cfg = _w2v_cfg(w2v_folder, mels_per_frame=2, context_frames=1)
    encoder = AudioEncoder(cfg)
    assert (encoder.stride, encoder.receptive) == (10, 20)  # strides 5 * 2; field 10 + (3 - 1) * 5 samples
    with torch.no_grad():  # the geometry predicts the model's own frame count: (L - rf) // stride + 1
        assert encoder.model(torch.zeros(1, 1000)).last_hidden_state.shape[1] == (1000 - 20) // 10 + 1
    wave = _tone(440, 0.5)  # 8 frames at 16 fps; the look-ahead of frame 7 ends at 9 / 16 s = 9000 samples
    feats = encoder(wave, 16, 8)
    assert feats.shape == (8, 6, HIDDEN) and np.isfinite(feats).all()
    assert np.array_equal(feats[3, 2:4], feats[2, 4:6]) and np.array_equal(feats[3, 0:2], feats[2, 2:4])
    longer = np.concatenate([wave, np.zeros(SR // 16, np.float32), np.ones(SR, np.float32)])
    assert np.array_equal(encoder(longer, 16, 8), feats)
    inside = np.concatenate([wave, np.ones(SR // 16, np.float32)])  # changes the look-ahead: features move
    assert not np.allclose(encoder(inside, 16, 8), feats, atol=1e-4)


def test_wav2vec2_folder_mismatches_are_loud(w2v_folder, tmp_path):
    with pytest.raises(ValueError, match="hidden size 16 != audio.n_mels 32"):
        AudioEncoder(AudioFeatureConfig(encoder="wav2vec2", encoder_path=w2v_folder, n_mels=32))
    with pytest.raises(ValueError, match="16000 Hz"):
        AudioEncoder(_w2v_cfg(w2v_folder, sample_rate=22050))
    right = folder_fingerprint(w2v_folder)
    assert AudioEncoder(_w2v_cfg(w2v_folder, encoder_sha256=right)).fingerprint == right
    with pytest.raises(ValueError, match=f"content hash {right}.*pins encoder_sha256={'0' * 64}"):
        AudioEncoder(_w2v_cfg(w2v_folder, encoder_sha256="0" * 64))
    with pytest.raises(ValueError, match="needs encoder_path"):
        AudioFeatureConfig(encoder="wav2vec2")
    with pytest.raises(ValueError, match="wav2vec2 settings"):
        AudioFeatureConfig(encoder_path=w2v_folder)
    with pytest.raises(ValueError, match="local folders"):
        AudioEncoder(_w2v_cfg("s3://bucket/w2v"))
    (tmp_path / "model.safetensors").write_bytes((Path(w2v_folder) / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        AudioEncoder(_w2v_cfg(str(tmp_path)))


def test_wav2vec2_from_s3_is_the_same_encoder(w2v_folder, s3_bucket, s3_server, tmp_path):
    from artifacts.audio import load_audio_encoder
    from core.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url, model_cache_dir=str(tmp_path / "cache")))
    storage.upload_dir(w2v_folder, f"{s3_bucket}/w2v")  # adds _MANIFEST.json: not part of the fingerprint
    remote = load_audio_encoder(_w2v_cfg(f"{s3_bucket}/w2v/", encoder_sha256=folder_fingerprint(w2v_folder)), storage)
    wave = _tone(700, 0.3)
    assert np.array_equal(remote(wave, 16, 4), AudioEncoder(_w2v_cfg(w2v_folder))(wave, 16, 4))


def test_data_and_model_audio_encoders_must_agree(w2v_folder, tmp_path):
    from artifacts.card import DataCard, check_data_matches_model
    from model.presets import ModelConfig

    def check(shards: AudioFeatureConfig, model: AudioFeatureConfig) -> None:
        check_data_matches_model(DataCard(uri="s3://b/shards", audio=shards), ModelConfig(audio=model), "train_teacher")

    w2v, logmel = _w2v_cfg(w2v_folder), AudioFeatureConfig(n_mels=HIDDEN)
    check(w2v, _w2v_cfg(w2v_folder + "/"))  # the same folder spelled differently
    with pytest.raises(ValueError, match=f"train_teacher.*audio encoder: shards s3://b/shards were made with "
                                         f"wav2vec2 {w2v_folder} \\(sha256 not pinned\\), the model uses logmel"):
        check(w2v, logmel)
    with pytest.raises(ValueError, match="audio encoder: .* made with logmel, the model uses wav2vec2"):
        check(logmel, w2v)
    with pytest.raises(ValueError, match=f"wav2vec2 {w2v_folder} .* the model uses wav2vec2 {tmp_path}"):
        check(w2v, _w2v_cfg(str(tmp_path)))
    pinned = folder_fingerprint(w2v_folder)
    check(_w2v_cfg("s3://b/w2v", encoder_sha256=pinned), _w2v_cfg(w2v_folder, encoder_sha256=pinned))  # same content
    with pytest.raises(ValueError, match=f"sha256 {pinned}.*sha256 {'a' * 64}"):
        check(_w2v_cfg(w2v_folder, encoder_sha256=pinned), _w2v_cfg(w2v_folder, encoder_sha256="a" * 64))
    with pytest.raises(ValueError, match="audio features: .*'n_mels': 16.*'n_mels': 32"):  # geometry still compared
        check(w2v, AudioFeatureConfig(n_mels=32))


def test_logmel_dumps_are_unchanged_and_the_manifest_records_the_encoder(w2v_folder):
    """Old manifests / cards (no encoder keys) still compare equal; a wav2vec2 choice travels to the data card."""
    from artifacts.card import DataCard
    from ray_jobs.preprocess.config import PreprocessConfig

    before = {"sample_rate", "n_mels", "mels_per_frame", "context_frames", "n_fft", "fmin", "fmax", "log_floor"}
    assert set(AudioFeatureConfig().model_dump()) == before
    cfg = PreprocessConfig(input="in", output="out", audio={"features": _w2v_cfg(w2v_folder).model_dump()})
    card = DataCard.from_manifest("s3://b/shards", {"config": cfg.model_dump(mode="json")})
    assert card.audio == _w2v_cfg(w2v_folder) and card.audio.encoder == "wav2vec2"
    assert DataCard.from_manifest("old", {"config": {"audio": {"features": {"n_mels": 16}}}}).audio.encoder == "logmel"
