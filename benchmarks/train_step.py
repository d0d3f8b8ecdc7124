"""Teacher training step: Ray Train + DeepSpeed against a plain single-process torch loop, same model and batch.

Both paths run the teacher's own `TeacherTask.micro_step` (flow matching, condition dropout) on the
tiny preset with batch 2, on the same preprocessed synthetic shards. The Ray path is the real job
(`ray_jobs.train_teacher.run`, one worker, ZeRO-2, fp32 on CPU); its time per step is wall-clock
between logged steps, so data loading, DeepSpeed and Ray Train's periodic reports are all in it.
The baseline is AdamW in a loop over in-memory batches. Then peak memory per worker for ZeRO-2
against ZeRO-3 with 2 workers. Writes benchmarks/results/train.json.

    python benchmarks/train_step.py [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results" / "train.json"


def make_shards(root: Path) -> str:
    from core.config import load_config
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.job import run as preprocess
    from ray_jobs.synthetic.world import SyntheticConfig, run as synthesize

    synthesize(SyntheticConfig(out=str(root / "synthetic"), num_videos=6, seed=5, duration=2.0,
                               num_identities=5, heldout_identities=1, executor="local"))
    preprocess(load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                           {"input": str(root / "synthetic" / "videos"), "output": str(root / "shards")}))
    return str(root / "shards")


def teacher_config(data: str, root: Path, name: str, steps: int, workers: int, zero: int):
    from core.config import load_config
    from ray_jobs.train_teacher import TeacherConfig

    return load_config(TeacherConfig, "ray_jobs/configs/tiny/train_teacher.yaml", {
        "data": data, "steps": steps, "batch_size": 2, "checkpoint.every_n_steps": steps, "validation.steps": 1,
        "run.storage_path": str(root / "runs"), "run.name": name, "scaling.num_workers": workers,
        "scaling.cpus_per_worker": 1 if workers == 1 else 0.5, "deepspeed.zero_stage": zero, "optim.warmup_steps": 0})


def plain_loop(cfg, steps: int) -> list[float]:
    """Seconds per step of a single-process AdamW loop over the same shards and task."""
    import ray.data

    from core.storage import Storage
    from ray_jobs.train_teacher import TRAIN_COLUMNS, TeacherTask
    from artifacts.shards import read_shards

    rows = read_shards(cfg.data, Storage(), "train", TRAIN_COLUMNS).take_all()
    batches = [{k: torch.as_tensor(np.stack([r[k] for r in rows[i:i + 2]])) for k in TRAIN_COLUMNS}
               for i in range(0, len(rows) - 1, 2)]
    torch.manual_seed(0)
    task = TeacherTask(cfg, None)
    model = task.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    generator, times = torch.Generator().manual_seed(0), []
    for step in range(steps):
        start = time.perf_counter()
        loss, _ = task.micro_step(model, batches[step % len(batches)], generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.deepspeed.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def ray_rows(cfg) -> list[dict]:
    from ray_jobs.train_teacher import run

    run(cfg)
    path = Path(cfg.run.storage_path) / cfg.run.name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def main() -> None:
    import ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    warm = args.steps // 4
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    data = make_shards(root)
    torch.set_num_threads(1)  # the Ray worker gets 1 CPU: same budget for the baseline
    plain = plain_loop(teacher_config(data, root, "plain", args.steps, 1, 2), args.steps)[warm:]
    rows = ray_rows(teacher_config(data, root, "ray-zero2-1w", args.steps, 1, 2))
    stamps = [r["time"] for r in rows]
    # Wall time between step ends (steps warm..N-1, checkpoint step excluded): everything the job does per step.
    ray_step = float(np.median(np.diff(stamps[warm:-1])))
    plain_step = float(np.median(plain))
    memory = {}
    for zero in (2, 3):
        zrows = ray_rows(teacher_config(data, root, f"ray-zero{zero}-2w", 6, 2, zero))
        memory[f"zero{zero}"] = max(r["peak_rss_mb"] for r in zrows)
    overhead = ray_step / plain_step - 1
    goals = [{"name": "Ray Train + DeepSpeed step overhead vs plain torch loop", "value": round(100 * overhead, 1),
              "target": 10.0, "unit": "%", "met": overhead <= 0.10}]
    result = {"goals": goals, "plain_step_s_median": plain_step, "ray_step_s_median": ray_step,
              "ray_compute_step_s_median": float(np.median([r["step_time_s"] for r in rows[warm:-1]])),
              "steps": args.steps, "warmup_steps": warm, "batch_size": 2, "preset": "tiny",
              "peak_rss_mb_per_worker": memory,
              "note": "CPU, fp32, gloo; on the tiny preset ZeRO-3's partitioning saves little next to the "
                      "worker's fixed runtime memory (torch, Ray, DeepSpeed)."}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
