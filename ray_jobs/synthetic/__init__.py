"""The synthetic puppet world: MP4s with exact ground truth (keypoints, face boxes, mouth, identity).

`python -m ray_jobs.synthetic --out URI --num-videos N --seed S` writes the data set;
`ground_truth_frames(sidecar, start, n, H, W)` re-renders any clip for evaluation.
"""

from ray_jobs.synthetic.puppet import PuppetIdentity, face_boxes, make_identity, render_frames
from ray_jobs.synthetic.world import (
    GeneratedVideo,
    SyntheticConfig,
    generate_video,
    ground_truth_frames,
    identity_splits,
    run,
    sidecar_json,
)

__all__ = ["PuppetIdentity", "make_identity", "render_frames", "face_boxes", "SyntheticConfig",
           "GeneratedVideo", "generate_video", "ground_truth_frames", "identity_splits", "run", "sidecar_json"]
