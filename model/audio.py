"""Per-video-frame audio features: log-mel windows aligned to frames.

`audio_features(wave, fps, num_frames, cfg)` returns float32 (num_frames, W, n_mels) with
W = mels_per_frame * (2 * context_frames + 1): row block ``context_frames`` of frame i covers exactly
video frame i's time span [i / fps, (i + 1) / fps); the blocks before and after are its neighbours
(audio-driven animation needs a little look-ahead for lip shapes). The denoiser projects each row
to a token and attends per latent frame (`model.denoiser`); with a temporal VAE factor > 1 it groups
the frames' windows to latent frames itself.

Silence, and time outside the clip, give the constant log(floor) (zero power), so a silent clip
yields a constant array. We deliberately compute the mel filterbank ourselves in numpy (HTK mel
scale, triangular filters, Hann-windowed STFT): torchaudio is not installed and librosa would be a
large dependency for ~30 lines. The STFT frames are centred on each mel row's time, so rows are
aligned to frames for any fps (no rounding drift across a clip).

Pretrained encoder hook (optional, not required by any job): `wav2vec2_features` runs a
`transformers` Wav2Vec2 model loaded from a LOCAL folder (no hub access here) and resamples its
hidden states to the same (num_frames, W, D) layout, so it can stand in for log-mels with
``n_mels = hidden size`` in the model config.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from pydantic import Field, model_validator

from core.config import StrictConfig

__all__ = ["AudioFeatureConfig", "audio_features", "mel_filterbank", "wav2vec2_features"]


class AudioFeatureConfig(StrictConfig):
    """Log-mel window geometry; the model config embeds one so features and model always agree."""

    sample_rate: int = Field(16000, ge=1000, description="Hz of the mono input wave")
    n_mels: int = Field(32, ge=1, description="mel bins per row (32 tiny, 80 typical for real)")
    mels_per_frame: int = Field(2, ge=1, description="mel rows per video frame")
    context_frames: int = Field(1, ge=0, description="video frames of context on each side of frame i")
    n_fft: int = Field(512, ge=16, description="STFT window length in samples (32 ms at 16 kHz)")
    fmin: float = Field(0.0, ge=0.0, description="lowest mel filter edge, Hz")
    fmax: float | None = Field(None, gt=0.0, description="highest mel filter edge, Hz (None = Nyquist)")
    log_floor: float = Field(1e-5, gt=0.0, description="power floor before the log; silence = log(floor)")

    @model_validator(mode="after")
    def _check_band(self) -> "AudioFeatureConfig":
        top = self.fmax if self.fmax is not None else self.sample_rate / 2
        if not self.fmin < top <= self.sample_rate / 2:
            raise ValueError(f"need fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={top}")
        return self

    @property
    def window(self) -> int:
        """W, rows per video frame's window."""
        return self.mels_per_frame * (2 * self.context_frames + 1)


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """HTK-mel triangular filters (n_mels, n_fft // 2 + 1), each peaking at 1 (O'Shaughnessy mel scale)."""
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(_hz_to_mel(np.array(fmin)), _hz_to_mel(np.array(fmax)), n_mels + 2))
    lower, centre, upper = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None] - lower) / np.maximum(centre - lower, 1e-9)
    falling = (upper - fft_hz[None]) / np.maximum(upper - centre, 1e-9)
    bank = np.clip(np.minimum(rising, falling), 0.0, None).astype(np.float32)
    bank.setflags(write=False)
    return bank


def _row_centres(fps: float, num_rows: int, first_row: int, cfg: AudioFeatureConfig) -> np.ndarray:
    """Sample index at the centre of each mel row; row r spans [r, r+1) / (fps * mels_per_frame) s."""
    row_seconds = 1.0 / (fps * cfg.mels_per_frame)
    rows = np.arange(first_row, first_row + num_rows, dtype=np.float64)
    return np.round((rows + 0.5) * row_seconds * cfg.sample_rate).astype(np.int64)


def _log_mel_rows(wave: np.ndarray, centres: np.ndarray, cfg: AudioFeatureConfig) -> np.ndarray:
    """Log-mel power (len(centres), n_mels) of Hann-windowed frames centred at `centres` (zeros outside)."""
    half = cfg.n_fft // 2
    padded = np.concatenate([np.zeros(half, np.float32), wave, np.zeros(half + 1, np.float32)])
    # padded[c : c + n_fft] is the frame centred on wave[c]; rows beyond the clip read zeros (silence)
    index = centres[:, None] + np.arange(cfg.n_fft)[None]
    inside = (index >= 0) & (index < len(padded))
    frames = np.where(inside, padded[np.clip(index, 0, len(padded) - 1)], 0.0)
    power = np.abs(np.fft.rfft(frames * np.hanning(cfg.n_fft)[None], axis=1)) ** 2 / cfg.n_fft
    fmax = cfg.fmax if cfg.fmax is not None else cfg.sample_rate / 2
    mel = power @ mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, fmax).T
    return np.log(mel + cfg.log_floor)


def audio_features(wave: np.ndarray, fps: float, num_frames: int, cfg: AudioFeatureConfig | None = None) -> np.ndarray:
    """Frame-aligned log-mel windows: wave (N,) float32 at cfg.sample_rate -> (num_frames, W, n_mels)."""
    cfg = cfg or AudioFeatureConfig()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"wave must be mono (N,), got shape {wave.shape}")
    if fps <= 0 or num_frames < 1:
        raise ValueError(f"need fps > 0 and num_frames >= 1, got fps={fps}, num_frames={num_frames}")
    mpf, ctx = cfg.mels_per_frame, cfg.context_frames
    row_samples = cfg.sample_rate / (fps * mpf)
    if cfg.n_fft < row_samples:  # windows would leave gaps: sounds between rows would vanish
        raise ValueError(f"n_fft {cfg.n_fft} < {row_samples:.0f} samples per mel row at fps {fps}; raise n_fft")
    total_rows = (num_frames + 2 * ctx) * mpf
    centres = _row_centres(fps, total_rows, -ctx * mpf, cfg)
    rows = _log_mel_rows(wave, centres, cfg)  # (total_rows, n_mels)
    window = cfg.window
    index = np.arange(num_frames)[:, None] * mpf + np.arange(window)[None]  # frame i starts at row i*mpf
    return rows[index].astype(np.float32)


def wav2vec2_features(wave: np.ndarray, fps: float, num_frames: int, model_path: str,
                      cfg: AudioFeatureConfig | None = None, device: str = "cpu") -> np.ndarray:
    """Optional hook: local Wav2Vec2 hidden states resampled to (num_frames, W, hidden) like `audio_features`."""
    import torch  # lazy: only this optional hook needs transformers
    from transformers import Wav2Vec2Model

    cfg = cfg or AudioFeatureConfig()
    encoder = Wav2Vec2Model.from_pretrained(model_path, local_files_only=True).to(device).eval()
    with torch.no_grad():
        hidden = encoder(torch.as_tensor(wave, dtype=torch.float32, device=device)[None]).last_hidden_state[0]
    hidden = hidden.cpu().numpy()  # (S, D) at the encoder's own rate
    mpf, ctx = cfg.mels_per_frame, cfg.context_frames
    row_times = (np.arange(-ctx * mpf, (num_frames + ctx) * mpf) + 0.5) / (fps * mpf)
    src = np.clip(np.round(row_times / (len(wave) / cfg.sample_rate) * len(hidden) - 0.5), 0, len(hidden) - 1)
    rows = hidden[src.astype(np.int64)]
    index = np.arange(num_frames)[:, None] * mpf + np.arange(cfg.window)[None]
    return rows[index].astype(np.float32)
