"""Speech-like audio for the puppet world and its per-frame loudness.

Syllables are bursts of a harmonic tone (random pitch, glide, harmonic weights) under a random
smooth envelope, separated by short gaps and occasional phrase pauses. The per-frame RMS of the
signal itself (not a hidden envelope) drives the mouth, so any decoder can re-derive it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["speech_audio", "frame_rms"]

_PEAK = 0.5  # headroom below full scale so AAC never clips


def _syllable(rng: np.random.Generator, num_samples: int, sample_rate: int, base_f0: float) -> np.ndarray:
    """One harmonic burst (num_samples,) with a random attack/decay envelope and pitch glide."""
    t = np.arange(num_samples) / sample_rate
    f0 = base_f0 * rng.uniform(0.85, 1.2) * (1 + rng.uniform(-0.15, 0.15) * t / max(t[-1], 1e-6))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    weights = rng.uniform(0.2, 1.0, size=8) / np.arange(1, 9)
    tone = sum(w * np.sin(k * phase) for k, w in enumerate(weights, start=1))
    x = np.linspace(0.0, 1.0, num_samples)
    peak_at = rng.uniform(0.15, 0.5)
    rise = np.clip(x / peak_at, 0, 1) ** rng.uniform(0.5, 2.0)
    fall = np.clip((1 - x) / (1 - peak_at), 0, 1) ** rng.uniform(0.7, 2.5)
    envelope = np.sin(0.5 * np.pi * np.minimum(rise, fall))
    return rng.uniform(0.25, 1.0) * envelope * tone / np.abs(tone).max()


def speech_audio(rng: np.random.Generator, duration_s: float, sample_rate: int = 16000) -> np.ndarray:
    """Speech-like mono float32 (N,), N = round(duration_s * sample_rate), peak 0.5."""
    num_samples = int(round(duration_s * sample_rate))
    audio = np.zeros(num_samples, np.float64)
    base_f0 = rng.uniform(100.0, 240.0)
    cursor = int(rng.uniform(0.05, 0.3) * sample_rate)
    while cursor < num_samples:
        length = int(rng.uniform(0.08, 0.26) * sample_rate)
        burst = _syllable(rng, length, sample_rate, base_f0)[: num_samples - cursor]
        audio[cursor: cursor + len(burst)] += burst
        pause = rng.uniform(0.25, 0.55) if rng.random() < 0.15 else rng.uniform(0.02, 0.12)
        cursor += length + int(pause * sample_rate)
    audio += 1e-3 * rng.standard_normal(num_samples)  # room noise floor
    return (_PEAK * audio / max(np.abs(audio).max(), 1e-9)).astype(np.float32)


def frame_rms(audio: np.ndarray, num_frames: int, fps: float, sample_rate: int = 16000) -> np.ndarray:
    """RMS (T,) of the audio under each video frame [t/fps, (t+1)/fps); missing samples count as silence."""
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)
    padded = np.zeros(max(edges[-1], len(audio)), np.float64)
    padded[: len(audio)] = audio
    squares = np.concatenate([[0.0], np.cumsum(padded**2)])
    energy = (squares[edges[1:]] - squares[edges[:-1]]) / np.maximum(np.diff(edges), 1)
    return np.sqrt(energy)
