"""core.media on real files made by the bundled ffmpeg: probe, crop/pad/fps, rotation, audio, errors."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from core.media import (MediaError, decode_audio, decode_video, decode_video_and_audio, ffmpeg_exe, iter_video_chunks,
                         mux_mp4, probe)

RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 200, 20)


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True, capture_output=True)


def _two_color_frames(num_frames: int = 32, height: int = 32, width: int = 64) -> np.ndarray:
    """Left half red, right half blue, a green square in the top-left corner (orientation marker)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[:, :, : width // 2] = RED
    frames[:, :, width // 2:] = BLUE
    frames[:, : height // 4, : height // 4] = GREEN
    return frames


def _tone(seconds: float, sample_rate: int, freq: float = 440.0, amplitude: float = 0.4) -> np.ndarray:
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _close(pixel: np.ndarray, color: tuple[int, int, int], tol: int = 40) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(color)).max() <= tol)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 2 s, 16 fps, 64x32 (W x H) H.264 + AAC file written by mux_mp4."""
    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    assert mux_mp4(_two_color_frames(), _tone(2.0, 16000), fps=16, out_path=path) is None
    return path


def test_mux_probe_roundtrip(clip):
    info = probe(clip)
    assert (info.width, info.height, info.fps, info.num_frames, info.rotation) == (64, 32, 16.0, 32, 0)
    assert info.has_video and info.has_audio
    assert (info.audio_sample_rate, info.audio_channels) == (16000, 1)
    assert info.duration_s == pytest.approx(2.0, abs=0.07)
    data = mux_mp4(_two_color_frames(8), None, fps=8)
    assert data[4:8] == b"ftyp" and len(data) > 200


def test_decode_crop_and_pad(clip):
    cropped = decode_video(clip, fps=16, size=(32, 32), fit="crop")
    assert cropped.shape == (32, 32, 32, 3) and cropped.dtype == np.uint8
    # crop keeps the centre: columns 16..48 of the source, so left half red and right half blue, no margin
    assert _close(cropped[5, 16, 4], RED) and _close(cropped[5, 16, 28], BLUE)
    padded = decode_video(clip, fps=16, size=(32, 32), fit="pad")
    assert padded.shape == (32, 32, 32, 3)
    # pad scales 64x32 to 32x16 and adds 8 black rows above and below
    assert padded[:, :7].max() < 20 and padded[:, 25:].max() < 20
    assert _close(padded[5, 16, 4], RED) and _close(padded[5, 16, 28], BLUE)


@pytest.mark.parametrize("fps, expected_frames", [(8, 16), (16, 32), (24, 48)])
def test_decode_resamples_fps(clip, fps, expected_frames):
    assert decode_video(clip, fps=fps, size=(64, 32)).shape == (expected_frames, 32, 64, 3)


def test_rotation_metadata_is_honoured(clip, tmp_path):
    rotated = tmp_path / "rotated.mp4"
    _ffmpeg("-display_rotation", "90", "-i", str(clip), "-c", "copy", str(rotated))
    info = probe(rotated)
    assert (info.rotation, info.width, info.height) == (90, 32, 64)  # displayed size is portrait
    frames = decode_video(rotated, fps=16, size=(32, 64))
    assert frames.shape == (32, 64, 32, 3)
    # 90 degrees counter-clockwise: the source's top-left marker lands bottom-left, red goes down
    assert _close(frames[3, 60, 3], GREEN)
    assert _close(frames[3, 50, 24], RED) and _close(frames[3, 10, 24], BLUE)


def test_decode_audio_44k_stereo_to_16k_mono(tmp_path):
    raw, path = tmp_path / "stereo.f32", tmp_path / "stereo.m4a"
    tone = _tone(1.5, 44100)
    np.stack([tone, tone], axis=1).tofile(raw)
    _ffmpeg("-f", "f32le", "-ar", "44100", "-ac", "2", "-i", str(raw), "-c:a", "aac", "-b:a", "128k", str(path))
    info = probe(path)
    assert (info.audio_sample_rate, info.audio_channels, info.has_video) == (44100, 2, False)
    audio = decode_audio(path, sample_rate=16000)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 24000) <= 16  # 1.5 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(audio[2000:18000]))
    assert np.fft.rfftfreq(16000, 1 / 16000)[spectrum.argmax()] == pytest.approx(440, abs=2)
    assert np.abs(audio[4000:20000]).max() == pytest.approx(0.4, abs=0.05)


def test_decode_audio_of_mp4(clip):
    audio = decode_audio(clip)
    assert abs(len(audio) - 32000) <= 16
    assert np.sqrt(np.mean(audio[1000:31000] ** 2)) == pytest.approx(0.4 / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_one_run_decode_equals_the_two_decodes(clip, tmp_path, fit):
    frames, wave = decode_video_and_audio(clip, 12, (48, 40), fit, sample_rate=22050)
    assert np.array_equal(frames, decode_video(clip, 12, (48, 40), fit))
    assert np.array_equal(wave, decode_audio(clip, 22050))
    silent = tmp_path / "silent.mp4"
    mux_mp4(_two_color_frames(8), None, fps=16, out_path=silent)
    frames, wave = decode_video_and_audio(silent, 16, (32, 32), fit)
    assert wave is None and frames.shape == (8, 32, 32, 3)


def test_one_thread_decodes_the_same_as_ffmpegs_default(clip):
    frames, wave = decode_video_and_audio(clip, 12, (48, 40), "crop", sample_rate=22050, threads=1)
    default_frames, default_wave = decode_video_and_audio(clip, 12, (48, 40), "crop", sample_rate=22050)
    assert np.array_equal(frames, default_frames) and np.array_equal(wave, default_wave)
    assert np.array_equal(decode_video(clip, 8, (32, 32), threads=1), decode_video(clip, 8, (32, 32)))


def test_media_errors(clip, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    for bad, reason in ((empty, "empty"), (garbage, "not a readable media"), (truncated, "not a readable media"),
                        (tmp_path / "missing.mp4", "does not exist")):
        with pytest.raises(MediaError, match=reason) as info:
            decode_video(bad, fps=16, size=(32, 32))
        assert info.value.path == str(bad)
        with pytest.raises(MediaError):
            decode_audio(bad)


def test_truncated_faststart_file_raises(clip, tmp_path):
    """A cut file whose index is at the front opens fine but decodes short: still an error."""
    faststart, cut = tmp_path / "faststart.mp4", tmp_path / "cut.mp4"
    _ffmpeg("-i", str(clip), "-c", "copy", "-movflags", "+faststart", str(faststart))
    assert decode_video(faststart, fps=16, size=(64, 32)).shape[0] == 32
    cut.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * 0.75)])
    assert probe(cut).num_frames == 32
    with pytest.raises(MediaError, match="truncated: decoded"):
        decode_video(cut, fps=16, size=(64, 32))


def test_video_chunks_stream_the_same_frames_and_a_cut_tail_raises_after_them(clip, tmp_path):
    whole = decode_video(clip, fps=16, size=(64, 32))
    chunks = list(iter_video_chunks(clip, 16, (64, 32), chunk_frames=5))
    assert [len(c) for c in chunks] == [5] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate(chunks), whole)
    faststart, cut = tmp_path / "faststart.mp4", tmp_path / "cut.mp4"
    _ffmpeg("-i", str(clip), "-c", "copy", "-movflags", "+faststart", str(faststart))
    cut.write_bytes(faststart.read_bytes()[: int(faststart.stat().st_size * 0.75)])
    streamed = []
    with pytest.raises(MediaError, match="truncated: decoded"):
        for chunk in iter_video_chunks(cut, 16, (64, 32), chunk_frames=5):
            streamed.append(chunk)
    got = np.concatenate(streamed)
    assert 5 <= len(got) < 32
    np.testing.assert_array_equal(got, whole[: len(got)])  # what came before the cut is the video's start
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(1).bytes(2048))
    with pytest.raises(MediaError, match="not a readable media file"):
        list(iter_video_chunks(garbage, 16, (64, 32), chunk_frames=5))


def test_audio_only_and_silent_files_raise(tmp_path):
    audio_only = tmp_path / "speech.m4a"
    raw = tmp_path / "mono.f32"
    _tone(0.5, 16000).tofile(raw)
    _ffmpeg("-f", "f32le", "-ar", "16000", "-ac", "1", "-i", str(raw), "-c:a", "aac", str(audio_only))
    with pytest.raises(MediaError, match="no video stream"):
        decode_video(audio_only, fps=16, size=(32, 32))
    silent = tmp_path / "silent.mp4"
    mux_mp4(_two_color_frames(8), None, fps=16, out_path=silent)
    assert not probe(silent).has_audio
    with pytest.raises(MediaError, match="no audio stream"):
        decode_audio(silent)


def test_mux_rejects_bad_frames():
    with pytest.raises(ValueError, match="even"):
        mux_mp4(np.zeros((4, 33, 32, 3), np.uint8), None, fps=16)
    with pytest.raises(ValueError, match="uint8"):
        mux_mp4(np.zeros((4, 32, 32, 3), np.float32), None, fps=16)
