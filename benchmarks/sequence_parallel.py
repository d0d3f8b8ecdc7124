"""Ulysses sequence parallelism on this machine -> results/sequence_parallel.json.

A token-heavy tiny config: the tiny denoiser (same class, 4 heads) on one clip of 32 latent frames
x 32 x 32 latents = 32 x 16 x 16 = 8,192 tokens. Two measurements, each sp=1 and sp=2 in the same run:

* **activation memory per worker** for one training forward + backward: the bytes autograd saves
  for backward (`torch.autograd.graph.saved_tensors_hooks`, counted once per storage). That is the
  memory that grows with tokens; weights and optimizer state are the same on every worker.
  Goal: sp=2 <= 0.6x sp=1.
* **one request's latency**: a 4-step Euler sampling of that clip (no grad). sp=1 is one process,
  one thread (one device); sp=2 is two processes of one thread each over gloo (two devices).
  Goal: sp=2 <= 0.7x sp=1 (median of ``--repeats``).

    python benchmarks/sequence_parallel.py [--frames 32] [--latent 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results"


def _model_and_inputs(frames: int, latent: int):
    from model.conditions import Conditions
    from model.presets import ModelConfig, build_denoiser

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    gen = torch.Generator().manual_seed(0)
    pixels = latent * 4  # tiny VAE: spatial factor 4, temporal factor 1
    cond = Conditions(ref_latent=torch.randn(1, 16, 1, latent, latent, generator=gen),
                      pose=torch.rand(1, 3, frames, pixels, pixels, generator=gen) * 2 - 1,
                      audio=torch.randn(1, frames, 6, 32, generator=gen),
                      face=torch.randn(1, 16, 1, 8, 8, generator=gen))
    return model, torch.randn(1, 16, frames, latent, latent, generator=gen), cond


def _activation_bytes(model, x, cond) -> int:
    """Bytes autograd keeps for backward in one training forward (each storage once), then runs backward."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        velocity = model(x, torch.tensor([0.5]), cond)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    velocity.square().mean().backward()
    return sum(n for ptr, n in seen.items() if ptr not in weights)


def _sample_seconds(model, x, cond, steps: int) -> float:
    from model.sampling import SamplerSpec, sample

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        sample(model, x, cond, SamplerSpec(kind="euler_cfg", steps=steps, guidance=1.0))
    return time.perf_counter() - start


def _worker(rank: int, size: int, init: str, args: argparse.Namespace, out: str) -> None:
    import deepspeed
    import torch.distributed as dist

    torch.set_num_threads(1)
    model, x, cond = _model_and_inputs(args.frames, args.latent)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=size)
        deepspeed.init_distributed(dist_backend="gloo")
        model.enable_sequence_parallel(dist.group.WORLD)
    memory = _activation_bytes(model, x, cond)
    _sample_seconds(model, x, cond, 1)  # warm-up
    seconds = []
    for _ in range(args.repeats):
        if size > 1:
            dist.barrier()
        seconds.append(_sample_seconds(model, x, cond, args.steps))
    Path(out, f"rank{rank}_of{size}.json").write_text(json.dumps({"activation_bytes": memory, "seconds": seconds}))
    if size > 1:
        dist.destroy_process_group()


def _measure(size: int, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(size, f"{folder}/init", args, folder), nprocs=size, join=True)
        return [json.loads(Path(folder, f"rank{r}_of{size}.json").read_text()) for r in range(size)]


# Wan geometry on paper (bf16 = 2 bytes): dims from `model.presets` (wan-1.3b, wan-animate-14b).
WAN = {"wan-1.3b": {"dim": 1536, "heads": 12, "blocks": 30, "ffn": 8960, "params": 1.3e9},
       "wan-animate-14b": {"dim": 5120, "heads": 40, "blocks": 40, "ffn": 13824, "params": 14e9}}
CLIPS = {"81x480x832": (21, 30 * 52), "81x720x1280": (21, 45 * 80)}  # latent frames, tokens per latent frame


def paper_plan(gpus_per_node: int = 8) -> list[dict]:
    """Tokens, FLOPs, all-to-all bytes and memory per GPU at Wan geometry, per SP degree (assumptions in docs/scale.md).

    Activation bytes come from `ray_jobs.memory_plan` (the one place they are defined; its full per-job
    plan adds the EMA, frozen copies, the embedding and the pose encoder: docs/scale.md, memory plan)."""
    from ray_jobs.memory_plan import block_bytes, checkpoint_bytes, serve_block_bytes

    rows = []
    for name, m in WAN.items():
        for clip, (frames, per_frame) in CLIPS.items():
            tokens = frames * per_frame
            d, ffn, blocks = m["dim"], m["ffn"], m["blocks"]
            attn_flops = 4 * tokens**2 * d * blocks  # QK^T and AV, forward
            linear_flops = 2 * tokens * (6 * d * d + 2 * d * ffn) * blocks  # q,k,v,o + cross q,o; FFN
            # ZeRO-3 over the node: weights + grads + fp32 master + Adam = 16 B/param, sharded
            states_gb = 16 * m["params"] / gpus_per_node / 1e9
            for sp in (1, 2, 4, 8):
                if m["heads"] % sp:
                    continue
                local = tokens / sp
                checkpoints_gb = checkpoint_bytes(blocks, local, d) / 1e9  # the assumptions: ray_jobs.memory_plan
                block_gb = block_bytes(local, d, ffn) / 1e9
                a2a_gb = 2 * blocks * 4 * local * d * 2 * (sp - 1) / sp / 1e9  # q,k,v,o each way, forward + backward
                rows.append({"model": name, "clip": clip, "tokens": tokens, "sp": sp,
                             "attention_tflops_fwd": round(attn_flops / 1e12, 1),
                             "linear_tflops_fwd": round(linear_flops / 1e12, 1),
                             "all_to_all_gb_per_rank_per_step": round(a2a_gb, 2),
                             "train_gb_per_gpu": round(states_gb + checkpoints_gb + block_gb, 1),
                             "serve_gb_per_gpu": round(2 * m["params"] / 1e9 + serve_block_bytes(local, d, ffn) / 1e9, 1)})
    return rows


def _goal(name: str, value: float, target: float, unit: str) -> dict:
    return {"name": name, "value": round(value, 4), "target": target, "unit": unit, "met": value <= target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=32, help="latent frames of the clip")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width (patch 2: /2 tokens a side)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps of one request")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokens = args.frames * (args.latent // 2) ** 2
    one, two = _measure(1, args), _measure(2, args)
    memory_ratio = max(r["activation_bytes"] for r in two) / one[0]["activation_bytes"]
    latency = {size: statistics.median(max(r["seconds"][i] for r in runs) for i in range(args.repeats))
               for size, runs in ((1, one), (2, two))}
    result = {
        "goals": [_goal("activation memory per worker, sp=2 / sp=1", memory_ratio, 0.6, "x"),
                  _goal("one request's latency, sp=2 / sp=1", latency[2] / latency[1], 0.7, "x")],
        "tokens_per_clip": tokens, "frames": args.frames, "latent": args.latent, "steps": args.steps,
        "activation_mb": {"sp1": one[0]["activation_bytes"] / 2**20,
                          "sp2_per_worker": [r["activation_bytes"] / 2**20 for r in two]},
        "latency_s": {"sp1": latency[1], "sp2": latency[2], "sp1_runs": one[0]["seconds"],
                      "sp2_runs_per_rank": [r["seconds"] for r in two]},
        "setup": "tiny preset (4 heads, dim 128, 4 blocks); sp=1: 1 process x 1 thread; sp=2: 2 processes x 1 "
                 "thread over gloo on this machine's 2 cores",
        "date": time.strftime("%Y-%m-%d"),
        "paper_wan_geometry": paper_plan(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sequence_parallel.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"], indent=2))


if __name__ == "__main__":
    main()
