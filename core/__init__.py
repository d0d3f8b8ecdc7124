"""Infrastructure below the model: the typed-config base, storage (local and s3://), media I/O (ffmpeg)."""
