"""Media I/O every stage shares: probe, decode video/audio to numpy, mux frames + audio to MP4.

Decoding and encoding go through the ffmpeg binary shipped by `imageio-ffmpeg` (driven with
`ffmpeg-python`); probing uses PyAV because the bundle has no ffprobe. Every failure to read a file
(empty, garbage bytes, truncated, no video stream) raises `MediaError` with a one-line reason, which
preprocessing turns into an error row.

Conventions:
- frames are uint8 RGB (T, H, W, 3); audio is float32 mono (N,) in [-1, 1].
- `MediaInfo.width`/`height` are the *displayed* size, i.e. after the rotation metadata is applied;
  `decode_video` applies the rotation too (ffmpeg's autorotate), so its output is upright.
PyAV and ffmpeg-python are imported inside the functions that use them: code that only renders or
reads frames (e.g. a one-GPU pretraining machine without the codec wheels) imports this module too.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

__all__ = ["MediaError", "MediaInfo", "ffmpeg_exe", "probe", "decode_video", "iter_video_chunks", "decode_audio",
           "decode_video_and_audio", "expected_frames", "mux_mp4"]

# A decode missing more than this fraction (and > 2 frames) of what the container promises is
# truncated (a cut file with its index at the front still decodes, just shorter).
_MISSING_FRAMES_TOLERANCE = 0.05


class MediaError(RuntimeError):
    """A media file cannot be read or written; `reason` is a short human-readable cause."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if path is not None else reason)


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` learns about a file; width/height are as displayed (rotation applied)."""

    duration_s: float
    has_video: bool
    has_audio: bool
    fps: float = 0.0
    width: int = 0
    height: int = 0
    rotation: int = 0  # counter-clockwise degrees from the display matrix, in {0, 90, 180, 270}
    num_frames: int = 0  # container's count, else estimated as round(duration * fps)
    audio_sample_rate: int = 0
    audio_channels: int = 0


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_file(path: str | os.PathLike) -> None:
    if not Path(path).exists():
        raise MediaError("file does not exist", path)
    if Path(path).stat().st_size == 0:
        raise MediaError("empty file (0 bytes)", path)


def _first_frame_rotation(container: av.container.InputContainer, stream) -> int:
    """Rotation of the first decodable frame (PyAV exposes the display matrix per frame)."""
    for frame in container.decode(stream):
        return int(round(frame.rotation)) % 360
    raise MediaError("video stream has no decodable frame")


def probe(path: str | os.PathLike) -> MediaInfo:
    """Read container/stream metadata with PyAV; raise MediaError when the file is not media."""
    import av
    _check_file(path)
    try:
        with av.open(str(path)) as container:
            return _probe_container(container)
    except MediaError as exc:
        raise MediaError(exc.reason, path) from exc
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise MediaError(f"not a readable media file ({exc})", path) from exc


def _probe_container(container) -> MediaInfo:
    import av
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None
    duration_s = float(container.duration / av.time_base) if container.duration else 0.0
    fields: dict = {"duration_s": duration_s, "has_video": video is not None, "has_audio": audio is not None}
    if audio is not None:
        fields.update(audio_sample_rate=int(audio.sample_rate or 0), audio_channels=int(audio.channels or 0))
    if video is None:
        return MediaInfo(**fields)
    rate = video.average_rate or video.guessed_rate or video.base_rate
    fps = float(rate) if rate else 0.0
    if video.duration is not None and video.time_base is not None:
        duration_s = float(video.duration * video.time_base) or duration_s
    num_frames = int(video.frames) or int(round(duration_s * fps))
    width, height = int(video.codec_context.width), int(video.codec_context.height)
    rotation = _first_frame_rotation(container, video)
    if rotation in (90, 270):
        width, height = height, width
    return MediaInfo(**{**fields, "duration_s": duration_s}, fps=fps, width=width, height=height,
                     rotation=rotation, num_frames=num_frames)


def _input(path, threads: int):
    """ffmpeg-python input node; `threads` > 0 caps the decoder's threads (0: ffmpeg's choice)."""
    import ffmpeg
    return ffmpeg.input(str(path), **({"threads": threads} if threads else {}))


def _run(stream, path, input_bytes: bytes | None = None, threads: int = 0) -> bytes:
    """Run an ffmpeg-python graph with the bundled binary; ffmpeg failures become MediaError.

    `threads` > 0 caps the filter graph's threads too (the decoder's are capped by `_input`).
    """
    import ffmpeg
    extra = ("-filter_threads", str(threads)) if threads else ()
    try:
        out, _ = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error", *extra).run(
            cmd=ffmpeg_exe(), input=input_bytes, capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as exc:
        lines = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise MediaError(f"ffmpeg failed: {lines[-1] if lines else 'no message'}", path) from exc
    return out


def _video_graph(stream, fps: float, size: tuple[int, int], fit: str):
    """fps resample + aspect-preserving crop or pad to (W, H) on an ffmpeg-python video stream."""
    width, height = size
    if fit not in ("crop", "pad"):
        raise ValueError(f"fit must be 'crop' or 'pad', got {fit!r}")
    node = stream.filter("fps", fps=fps)
    if fit == "crop":
        node = node.filter("scale", width, height, force_original_aspect_ratio="increase", flags="area")
        return node.filter("crop", width, height)
    node = node.filter("scale", width, height, force_original_aspect_ratio="decrease", flags="area")
    return node.filter("pad", width, height, "(ow-iw)/2", "(oh-ih)/2")


def fit_transform(src_size: tuple[int, int], dst_size: tuple[int, int], fit: str) -> tuple[float, float, float]:
    """(scale, tx, ty) with x' = x * scale + tx mapping source pixels to the decoded frame (`decode_video`).

    'crop' scales to cover and centre-crops (tx, ty <= 0); 'pad' scales to fit and centres (tx, ty >= 0).
    """
    (src_w, src_h), (dst_w, dst_h) = src_size, dst_size
    ratios = (dst_w / src_w, dst_h / src_h)
    scale = max(ratios) if fit == "crop" else min(ratios)
    return scale, (dst_w - src_w * scale) / 2.0, (dst_h - src_h * scale) / 2.0


def detection_size(src_size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(W, H) at which pose/face models see a (W, H) source: its aspect, the long side `long_side`
    (never upscaled), even sides (ffmpeg's scale). Decode with fit 'crop' (a sub-pixel crop at most)."""
    width, height = src_size
    scale = min(1.0, long_side / max(width, height, 1))
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


def expected_frames(info: MediaInfo, fps: float) -> float:
    """Frames a full decode at `fps` should give, from the container's count or duration (0: unknown)."""
    return info.num_frames * fps / info.fps if info.fps else info.duration_s * fps


def _check_complete(decoded: int, info: MediaInfo, fps: float, path) -> None:
    """A decode well short of what the container promises is a truncated file."""
    expected = expected_frames(info, fps)
    if decoded < expected - max(2.0, _MISSING_FRAMES_TOLERANCE * expected):
        raise MediaError(f"truncated: decoded {decoded} of ~{expected:.0f} frames", path)


def _frames_from_raw(raw: bytes, info: MediaInfo, fps: float, size: tuple[int, int], path) -> np.ndarray:
    """rgb24 bytes -> uint8 (T, H, W, 3); a decode well short of what the container promises is an error."""
    width, height = size
    frames = np.frombuffer(raw, np.uint8)
    if frames.size == 0 or frames.size % (width * height * 3):
        raise MediaError(f"decoded no complete frame ({frames.size} bytes)", path)
    frames = frames.reshape(-1, height, width, 3)
    _check_complete(len(frames), info, fps, path)
    return frames


def _wave_from_raw(raw: bytes, channels: int, path) -> np.ndarray:
    """Interleaved f32le -> float32 mono (N,): channels averaged (see `decode_audio`)."""
    samples = np.frombuffer(raw, np.float32)
    if samples.size % channels:
        raise MediaError(f"decoded audio of {samples.size} samples is not a multiple of {channels} channels", path)
    return samples.reshape(-1, channels).mean(axis=1, dtype=np.float64).astype(np.float32)


def decode_video(path: str | os.PathLike, fps: float, size: tuple[int, int],
                 fit: Literal["crop", "pad"] = "crop", info: MediaInfo | None = None, threads: int = 0) -> np.ndarray:
    """Decode to uint8 (T, H, W, 3) RGB at `fps` and size (W, H), upright (rotation applied).

    `fit="crop"` scales so the frame covers (W, H) and center-crops the excess;
    `fit="pad"` scales so the frame fits inside (W, H) and pads with black bars, centred.
    `info` is the file's `probe` result when the caller already has it. `threads` > 0 caps ffmpeg's
    threads (decoder and filters): batch jobs that run one decode per core want 1, since ffmpeg's
    default of one thread per core oversubscribes the cores when decodes run side by side.
    """
    info = info or probe(path)
    if not info.has_video:
        raise MediaError("no video stream", path)
    node = _video_graph(_input(path, threads).video, fps, size, fit)
    raw = _run(node.output("pipe:", format="rawvideo", pix_fmt="rgb24"), path, threads=threads)
    return _frames_from_raw(raw, info, fps, size, path)


def iter_video_chunks(path: str | os.PathLike, fps: float, size: tuple[int, int], chunk_frames: int,
                      fit: Literal["crop", "pad"] = "crop", info: MediaInfo | None = None,
                      threads: int = 0) -> Iterator[np.ndarray]:
    """`decode_video` as it streams out of ffmpeg: uint8 (<= chunk_frames, H, W, 3) chunks, in order.

    Memory holds one chunk, not the video (a 10 min 480x832 video is 11 GB of rgb24 at 16 fps). A
    failure or a truncated file raises MediaError after the chunks decoded before it. We drive the
    process ourselves (ffmpeg-python compiles the command line) since its `run` buffers all output.
    """
    info = info or probe(path)
    if not info.has_video or chunk_frames < 1:
        raise MediaError("no video stream" if not info.has_video else f"chunk_frames={chunk_frames} < 1", path)
    width, height = size
    node = _video_graph(_input(path, threads).video, fps, size, fit).output("pipe:", format="rawvideo", pix_fmt="rgb24")
    extra = ("-filter_threads", str(threads)) if threads else ()
    args = node.global_args("-nostdin", "-hide_banner", "-loglevel", "error", *extra).compile(cmd=ffmpeg_exe())
    frame_bytes, decoded = width * height * 3, 0
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: nothing to drain while we read frames
        with subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr) as proc:
            while raw := proc.stdout.read(frame_bytes * chunk_frames):
                if len(raw) % frame_bytes:
                    proc.kill()
                    raise MediaError(f"decoded an incomplete frame ({len(raw) % frame_bytes} bytes)", path)
                decoded += len(raw) // frame_bytes
                yield np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)
        stderr.seek(0)
        lines = stderr.read().decode(errors="replace").strip().splitlines()
    if proc.returncode != 0:
        raise MediaError(f"ffmpeg failed: {lines[-1] if lines else 'no message'}", path)
    if decoded == 0:
        raise MediaError("decoded no complete frame (0 bytes)", path)
    _check_complete(decoded, info, fps, path)


def decode_audio(path: str | os.PathLike, sample_rate: int = 16000, info: MediaInfo | None = None,
                 threads: int = 0) -> np.ndarray:
    """Decode the first audio stream to float32 mono (N,) at `sample_rate`, any rate/layout in.

    Channels are averaged here rather than by ffmpeg's `-ac 1`, whose downmix adds +3 dB to a
    stereo copy of a mono signal: a speaker must sound equally loud in mono and stereo files.
    """
    info = info or probe(path)
    if not info.has_audio:
        raise MediaError("no audio stream", path)
    channels = max(info.audio_channels, 1)
    node = _input(path, threads).audio
    raw = _run(node.output("pipe:", format="f32le", acodec="pcm_f32le", ac=channels, ar=sample_rate), path,
               threads=threads)
    return _wave_from_raw(raw, channels, path)


def decode_video_and_audio(path: str | os.PathLike, fps: float, size: tuple[int, int],
                           fit: Literal["crop", "pad"] = "crop", sample_rate: int = 16000,
                           info: MediaInfo | None = None, threads: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """`decode_video` and `decode_audio` in one ffmpeg run (one process, one demux); audio None if absent.

    The video goes to stdout and the audio to a temporary file (two pipes from one ffmpeg-python
    run would need threads to drain them). Same outputs as the two calls; a failure does not say
    which stream was bad, so callers that attribute errors re-run the two decodes separately.
    """
    import ffmpeg
    info = info or probe(path)
    if not info.has_video:
        raise MediaError("no video stream", path)
    if not info.has_audio:
        return decode_video(path, fps, size, fit, info, threads), None
    channels = max(info.audio_channels, 1)
    source = _input(path, threads)
    video_out = _video_graph(source.video, fps, size, fit).output("pipe:", format="rawvideo", pix_fmt="rgb24")
    with tempfile.TemporaryDirectory(prefix="decode-") as tmp:
        audio_file = Path(tmp) / "audio.f32"
        audio_out = source.audio.output(str(audio_file), format="f32le", acodec="pcm_f32le", ac=channels, ar=sample_rate)
        raw = _run(ffmpeg.merge_outputs(video_out, audio_out), path, threads=threads)
        wave = _wave_from_raw(audio_file.read_bytes(), channels, path)
    return _frames_from_raw(raw, info, fps, size, path), wave


def mux_mp4(frames: np.ndarray, audio: np.ndarray | None, fps: float,
            out_path: str | os.PathLike | None = None, sample_rate: int = 16000,
            crf: int = 12) -> bytes | None:
    """Encode (T, H, W, 3) uint8 frames as H.264 yuv420p (+ mono AAC) MP4; bytes when out_path is None.

    H and W must be even (yuv420p). MP4 needs a seekable output, so bytes go through a temp file.
    """
    import ffmpeg
    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames == 0 or height % 2 or width % 2:
        raise ValueError(f"need T > 0 and even H, W for yuv420p, got {frames.shape}")
    with tempfile.TemporaryDirectory(prefix="mux_") as tmp:
        target = Path(out_path) if out_path is not None else Path(tmp) / "out.mp4"
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        inputs = [video]
        codec_args = {"vcodec": "libx264", "pix_fmt": "yuv420p", "crf": crf, "preset": "medium"}
        if audio is not None:
            audio_file = Path(tmp) / "audio.f32"
            np.ascontiguousarray(audio, dtype=np.float32).reshape(-1).tofile(audio_file)
            inputs.append(ffmpeg.input(str(audio_file), format="f32le", ar=sample_rate, ac=1))
            codec_args.update(acodec="aac", ar=sample_rate, ac=1, audio_bitrate="64k")
        out = ffmpeg.output(*inputs, str(target), format="mp4", map_metadata=-1,
                            fflags="+bitexact", **codec_args).overwrite_output()
        _run(out, target, input_bytes=frames.tobytes())
        return None if out_path is not None else target.read_bytes()

