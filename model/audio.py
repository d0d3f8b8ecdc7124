"""Per-video-frame audio features: log-mel (or wav2vec2) windows aligned to frames.

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

Two encoders (``AudioFeatureConfig.encoder``), one entry point: `AudioEncoder(cfg)` is what
preprocessing (`ray_jobs.preprocess.udfs.add_audio_features`) and serving
(`serving.engine.AnimationEngine.conditions`) both call, so training features and served features
come from the same code and cannot drift apart:
* ``logmel`` (default): `audio_features` above, unchanged;
* ``wav2vec2``: `transformers`' `Wav2Vec2Model` (the optional ``wav2vec2`` extra) from a LOCAL folder
  (`artifacts.audio` resolves ``s3://`` through the node's model cache; `model/` reads local paths
  only). The folder's last hidden states are sampled at the same row centres as the log-mel rows, in
  the same (num_frames, W, n_mels) layout with ``n_mels`` = the encoder's hidden size (checked at load:
  the denoiser's ``audio_proj`` is built for ``n_mels``). The folder's content hash
  (`folder_fingerprint`) can be pinned in ``encoder_sha256``: loading then refuses another folder, and
  `artifacts.card.check_data_matches_model` compares it between shards and model.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_serializer, model_validator

from core.config import StrictConfig

__all__ = ["AudioFeatureConfig", "AudioEncoder", "ENCODER_FIELDS", "audio_features", "mel_filterbank",
           "folder_fingerprint"]

log = logging.getLogger(__name__)


ENCODER_FIELDS = ("encoder", "encoder_path", "encoder_sha256")  # which encoder; the rest is window geometry


class AudioFeatureConfig(StrictConfig):
    """Feature encoder and window geometry; the model config embeds one so features and model always agree."""

    encoder: Literal["logmel", "wav2vec2"] = Field("logmel", description="logmel: our numpy log-mels; "
                                                   "wav2vec2: a transformers Wav2Vec2Model's last hidden states")
    encoder_path: str | None = Field(None, description="wav2vec2: local or s3:// folder (config.json, weights, "
                                     "preprocessor_config.json)")
    encoder_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="wav2vec2: optional pin of "
                                       "the folder's content hash (folder_fingerprint); loading another fails")
    sample_rate: int = Field(16000, ge=1000, description="Hz of the mono input wave")
    n_mels: int = Field(32, ge=1, description="feature dim per row: mel bins (32 tiny, 80 typical for real), "
                        "or the wav2vec2 hidden size")
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

    @model_validator(mode="after")
    def _check_encoder(self) -> "AudioFeatureConfig":
        """A folder without wav2vec2, or wav2vec2 without a folder, is a config mistake: say so at load."""
        if self.encoder == "wav2vec2" and not self.encoder_path:
            raise ValueError("audio encoder 'wav2vec2' needs encoder_path (a local or s3:// model folder)")
        if self.encoder == "logmel" and (self.encoder_path or self.encoder_sha256):
            raise ValueError("encoder_path / encoder_sha256 are wav2vec2 settings; encoder is 'logmel'")
        return self

    @model_serializer(mode="wrap")
    def _omit_logmel_encoder(self, handler: Any) -> dict[str, Any]:
        """Log-mel dumps stay exactly as before the encoder setting existed, so manifests and model cards
        written earlier still compare equal (the preprocess job refuses to add shards to an output whose
        recorded audio config differs)."""
        data = handler(self)
        if self.encoder == "logmel":
            for key in ENCODER_FIELDS:
                data.pop(key, None)
        return data

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


def _check_clip(wave: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
    """The mono float32 wave, after refusing shapes and rates no encoder can window."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"wave must be mono (N,), got shape {wave.shape}")
    if fps <= 0 or num_frames < 1:
        raise ValueError(f"need fps > 0 and num_frames >= 1, got fps={fps}, num_frames={num_frames}")
    return wave


def _windows(rows: np.ndarray, num_frames: int, cfg: AudioFeatureConfig) -> np.ndarray:
    """(total_rows, D) rows from frame -context on -> (num_frames, W, D): frame i's window starts at row i*mpf."""
    index = np.arange(num_frames)[:, None] * cfg.mels_per_frame + np.arange(cfg.window)[None]
    return rows[index].astype(np.float32)


def audio_features(wave: np.ndarray, fps: float, num_frames: int, cfg: AudioFeatureConfig | None = None) -> np.ndarray:
    """Frame-aligned log-mel windows: wave (N,) float32 at cfg.sample_rate -> (num_frames, W, n_mels)."""
    cfg = cfg or AudioFeatureConfig()
    if cfg.encoder != "logmel":  # a wav2vec2 config read as log-mels would silently train on other features
        raise ValueError(f"audio_features computes log-mels, the config's encoder is {cfg.encoder!r}: use AudioEncoder")
    wave = _check_clip(wave, fps, num_frames)
    mpf, ctx = cfg.mels_per_frame, cfg.context_frames
    row_samples = cfg.sample_rate / (fps * mpf)
    if cfg.n_fft < row_samples:  # windows would leave gaps: sounds between rows would vanish
        raise ValueError(f"n_fft {cfg.n_fft} < {row_samples:.0f} samples per mel row at fps {fps}; raise n_fft")
    total_rows = (num_frames + 2 * ctx) * mpf
    centres = _row_centres(fps, total_rows, -ctx * mpf, cfg)
    return _windows(_log_mel_rows(wave, centres, cfg), num_frames, cfg)


# The files that decide what a wav2vec2 folder computes (a cache's own manifest or lock files do not).
_FINGERPRINT_FILES = ("config.json", "preprocessor_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over the names and bytes of a model folder's config, preprocessor config and weights.

    Identifies the encoder by content, so the same weights in a local folder and on s3 agree and an
    overwritten folder at the same URI does not.
    """
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and
                   (f.name in _FINGERPRINT_FILES or f.suffix in _WEIGHT_SUFFIXES))
    if not any(f.suffix in _WEIGHT_SUFFIXES for f in files):
        raise FileNotFoundError(f"{folder} holds no model weights (*.safetensors / *.bin)")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _conv_geometry(model_config: Any) -> tuple[int, int]:
    """(stride, receptive field) in samples of the wav2vec2 conv feature encoder: 320 and 400 for base."""
    stride, receptive = 1, 1
    for kernel, step in zip(model_config.conv_kernel, model_config.conv_stride):
        receptive += (kernel - 1) * stride
        stride *= step
    return stride, receptive


class AudioEncoder:
    """wave -> (num_frames, W, n_mels) features: the one function preprocessing and serving both call.

    Built once per process (a wav2vec2 folder loads in seconds; a clip encodes in milliseconds), then
    called per clip. ``folder`` is the local copy of ``cfg.encoder_path`` (`artifacts.audio` fetches
    s3 folders); None reads ``cfg.encoder_path`` itself, which must then be local.
    """

    def __init__(self, cfg: AudioFeatureConfig, folder: str | Path | None = None, device: Any = "cpu") -> None:
        self.cfg, self.device = cfg, device
        self.fingerprint: str | None = None
        if cfg.encoder == "wav2vec2":
            self._load_wav2vec2(Path(folder if folder is not None else _local_path(cfg.encoder_path)))

    def _load_wav2vec2(self, folder: Path) -> None:
        """Load the folder's feature extractor and model, after checking it is the one the config means."""
        import torch  # lazy: logmel needs neither torch nor transformers
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        cfg = self.cfg
        if not (folder / "preprocessor_config.json").is_file():  # its normalisation is part of the features
            raise FileNotFoundError(f"{folder}: no preprocessor_config.json; save the Wav2Vec2FeatureExtractor "
                                    "the model was trained with beside it")
        self.fingerprint = folder_fingerprint(folder)
        if cfg.encoder_sha256 is not None and cfg.encoder_sha256 != self.fingerprint:
            raise ValueError(f"audio encoder folder {cfg.encoder_path} has content hash {self.fingerprint}, "
                             f"the config pins encoder_sha256={cfg.encoder_sha256}")
        self.extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        self.model = Wav2Vec2Model.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        _check_wav2vec2(self.model.config, self.extractor, cfg, str(cfg.encoder_path))
        self.stride, self.receptive = _conv_geometry(self.model.config)
        log.info("audio encoder wav2vec2 %s (sha256 %s)", cfg.encoder_path, self.fingerprint)

    def __call__(self, wave: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
        """Features of a clip's mono wave at cfg.sample_rate, aligned to its frames like `audio_features`."""
        if self.cfg.encoder == "logmel":
            return audio_features(wave, fps, num_frames, self.cfg)
        wave = _check_clip(wave, fps, num_frames)
        return _windows(self._wav2vec2_rows(wave, fps, num_frames), num_frames, self.cfg)

    def _wav2vec2_rows(self, wave: np.ndarray, fps: float, num_frames: int) -> np.ndarray:
        """(total_rows, hidden) hidden states at the log-mel rows' centres.

        The encoder sees exactly the rows' span (frames -context .. num_frames + context, silence
        outside the clip, audio past it cut) plus half a receptive field of silence each side, so the
        features depend on the clip's own audio only, never on how much longer the caller's wave is.
        """
        import torch

        cfg, margin = self.cfg, self.receptive // 2
        mpf, ctx, rate = cfg.mels_per_frame, cfg.context_frames, cfg.sample_rate
        lead = round(ctx / fps * rate) + margin
        clip = wave[: round((num_frames + ctx) / fps * rate)]
        padded = np.zeros(round((num_frames + 2 * ctx) / fps * rate) + 2 * margin, np.float32)
        padded[lead: lead + len(clip)] = clip
        values = self.extractor(padded, sampling_rate=rate, return_tensors="np").input_values
        with torch.no_grad():
            hidden = self.model(torch.from_numpy(values).to(self.device)).last_hidden_state[0].float().cpu().numpy()
        centres = _row_centres(fps, (num_frames + 2 * ctx) * mpf, -ctx * mpf, cfg) + lead  # samples in `padded`
        nearest = np.round((centres - (self.receptive - 1) / 2) / self.stride).astype(np.int64)
        return hidden[np.clip(nearest, 0, len(hidden) - 1)]


def _local_path(path: str | None) -> str:
    if path is None or "://" in path:
        raise ValueError(f"AudioEncoder reads local folders; fetch {path} first (artifacts.audio.load_audio_encoder)")
    return path


def _check_wav2vec2(model_config: Any, extractor: Any, cfg: AudioFeatureConfig, where: str) -> None:
    """The folder must produce what the denoiser was built for: n_mels-wide rows from cfg.sample_rate audio."""
    if getattr(model_config, "add_adapter", False):
        raise ValueError(f"{where}: wav2vec2 with an adapter (add_adapter) is not supported; use the plain encoder")
    if model_config.hidden_size != cfg.n_mels:
        raise ValueError(f"{where}: wav2vec2 hidden size {model_config.hidden_size} != audio.n_mels {cfg.n_mels} "
                         "(the denoiser's audio_proj input); set audio.n_mels to the hidden size")
    if extractor.sampling_rate != cfg.sample_rate or extractor.feature_size != 1:
        raise ValueError(f"{where}: wav2vec2 expects mono {extractor.sampling_rate} Hz audio, "
                         f"audio.sample_rate is {cfg.sample_rate}; set audio.sample_rate={extractor.sampling_rate}")
