"""Ready for 14B (issue 19) on this machine -> results/scale.json, one section per measurement.

Sections (``--only NAME`` runs one; each run merges its section and its goals into the existing JSON, so
sections measured on different days or machines live side by side; a new section is one function
``NAME_section(args) -> (goals, figures)`` added to ``SECTIONS``):

* ``load``: peak RSS of loading one model folder per process, in real processes, every way in the same
  run: the old full load (model built in fp32 + the whole folder in a dict, then ``load_state_dict``; what
  every rank did before ``deepspeed.initialize`` partitioned it), the same on two gloo workers followed by
  the ZeRO-3 partitioning, the meta-device load (`model.loading.build_on_meta`) and the 2-worker ZeRO-3
  load (built under ``deepspeed.zero.Init``, filled tensor by tensor). Two models of the tiny preset's
  class (``LOAD_MODELS``): ~298 MB of small (<= 6 MB) tensors and ~800 MB of large (38-101 MB) ones.
  Each way runs once with glibc's default malloc (what a Ray worker gets: its mmap threshold rises to
  the largest block freed, up to 32 MB, after which freed blocks below it stay resident in the heap) and
  once with the threshold fixed at 256 KiB (RSS then follows live memory).
  Goals: ZeRO-3 per worker <= 0.6x the full copy, meta <= 0.6x the full copy (default malloc).

* ``distill``: peak RSS of one distillation worker (fp32, ZeRO-2, the ``small_tensors`` model as the
  teacher, 4 synthetic videos) with ``student.mode=lora`` (teacher, student and EMA target on one shared
  base) vs ``student.mode=full`` (three models plus the student's grads and Adam moments), same run
  otherwise. Goal: LoRA <= 0.5x the full-copy peak.

    python benchmarks/scale.py [--only load|distill] [--models small_tensors large_tensors] [--distill-steps 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DS_ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
LOAD_MODES = {"full": 1, "full_zero3": 2, "meta": 1, "zero3": 2}  # mode -> processes


def _status_mb(field: str) -> float:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _old_full_load(folder: Path) -> torch.nn.Module:
    """The loader before model.loading: fp32 model on CPU, every shard into one dict, load_state_dict."""
    from safetensors.torch import load_file

    from model.denoiser import AnimationDenoiser

    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    model = AnimationDenoiser(**config)
    model.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    return model


def _load(mode: str, folder: Path) -> torch.nn.Module:
    from model.loading import zero3_build
    from model.presets import ModelConfig, build_denoiser

    cfg = ModelConfig(pretrained_path=str(folder))
    if mode == "meta":
        return build_denoiser(cfg)
    if mode == "zero3":
        with zero3_build(DS_ZERO3) as built:
            model = build_denoiser(cfg)
        built.check()
        return model
    model = _old_full_load(folder)
    if mode == "full_zero3":  # what deepspeed.initialize does to a full model under ZeRO-3
        import deepspeed

        deepspeed.zero.Init(module=model, config_dict_or_path=DS_ZERO3)
    return model


def _load_worker(rank: int, world: int, mode: str, fixed_mmap: bool, folder: str, out: str) -> None:
    """One process: peak RSS above the RSS before the load (MB) and the load's seconds -> out/rank{r}.json."""
    import ctypes

    import torch.distributed as dist

    if fixed_mmap:
        ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    os.environ["LOCAL_RANK"] = str(rank)  # zero.Init picks its device by it (Ray Train sets it)
    torch.set_num_threads(1)
    if world > 1:
        import deepspeed

        dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank, world_size=world)
        deepspeed.init_distributed(dist_backend="gloo")
    import model.presets  # noqa: F401  (imports outside the measured window)

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before, start = _status_mb("VmRSS"), time.perf_counter()
    _load(mode, Path(folder))
    seconds, peak = time.perf_counter() - start, _status_mb("VmHWM") - before
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_mb": peak, "seconds": seconds}))


def _run(mode: str, fixed_mmap: bool, folder: Path, out: Path) -> list[dict]:
    """One mode's processes (started together, as the ranks of a job are); their results by rank."""
    ctx = multiprocessing.get_context("spawn")
    out.mkdir(parents=True)
    world = LOAD_MODES[mode]
    procs = [ctx.Process(target=_load_worker, args=(r, world, mode, fixed_mmap, str(folder), str(out)))
             for r in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError(f"{mode} (fixed_mmap={fixed_mmap}) failed: exit codes {[p.exitcode for p in procs]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _goal(name: str, value: float, target: float, unit: str) -> dict:
    return {"name": name, "value": round(value, 4), "target": target, "unit": unit, "met": value <= target}


# The measured models: the tiny preset's class at larger dims. "small_tensors": every tensor <= 6 MB, below
# glibc's 32 MB cap on its dynamic mmap threshold; "large_tensors": the big matrices 38-101 MB, above
# it, as every large tensor of the 14B model is (5120 x 5120 x 2 bytes = 50 MB and up).
LOAD_MODELS = {
    "small_tensors": {"num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048, "num_layers": 12},
    "large_tensors": {"num_attention_heads": 48, "attention_head_dim": 64, "ffn_dim": 8192, "num_layers": 1},
}


def _load_figures(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One model: every load way, default and fixed-threshold malloc; peaks per process (max over ranks)."""
    from model.presets import ModelConfig, build_denoiser, count_parameters

    with tempfile.TemporaryDirectory(prefix=f"scale-load-{name}-") as tmp:
        torch.manual_seed(0)
        model = build_denoiser(ModelConfig(overrides=overrides))
        model_mb = count_parameters(model) * 4 / 2**20
        largest_mb = max(p.numel() for p in model.parameters()) * 4 / 2**20
        model.save_pretrained(f"{tmp}/model")
        del model
        runs = {malloc: {mode: _run(mode, malloc == "fixed_mmap_256k", Path(tmp, "model"), Path(tmp, malloc, mode))
                         for mode in LOAD_MODES}
                for malloc in ("default", "fixed_mmap_256k")}
    peak = {malloc: {mode: round(max(r["peak_mb"] for r in rs), 1) for mode, rs in by_mode.items()}
            for malloc, by_mode in runs.items()}
    return {"overrides": overrides, "model_mb_fp32": round(model_mb, 1), "largest_tensor_mb": round(largest_mb, 1),
            "peak_rss_mb_per_process": peak,
            "peak_over_model": {m: {k: round(v / model_mb, 3) for k, v in d.items()} for m, d in peak.items()},
            "runs": runs}


def load_section(args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    """Peak RSS per process of every load way for each of ``args.models`` (see module doc)."""
    figures: dict[str, Any] = {"threads_per_process": 1, "cpu_count": os.cpu_count()}
    goals = []
    for name in args.models:
        figures[name] = fig = _load_figures(name, LOAD_MODELS[name])
        peak = fig["peak_rss_mb_per_process"]["default"]
        goals += [_goal(f"load: ZeRO-3 peak RSS per worker / full-copy peak, {name} (2 workers, default malloc)",
                        peak["zero3"] / peak["full_zero3"], 0.6, "x"),
                  _goal(f"load: meta-device peak RSS / full-copy peak, {name} (1 process, default malloc)",
                        peak["meta"] / peak["full"], 0.6, "x")]
    return goals, figures


def _distill_inputs(work: Path, overrides: dict[str, Any]) -> tuple[str, str]:
    """(shards, teacher export) for the distill section: 4 synthetic videos through preprocessing (tiny VAE),
    and a random teacher of the tiny preset's class at ``overrides``'s dims."""
    from core.config import load_config
    from model.presets import ModelConfig, build_denoiser
    from ray_jobs.preprocess.config import PreprocessConfig
    from ray_jobs.preprocess.job import run as preprocess
    from ray_jobs.synthetic.world import SyntheticConfig, run as synthesize

    synthesize(SyntheticConfig(out=str(work / "synthetic"), num_videos=4, seed=3, duration=1.0, executor="local"))
    preprocess(load_config(PreprocessConfig, "ray_jobs/configs/tiny/preprocess.yaml",
                           {"input": str(work / "synthetic" / "videos"), "output": str(work / "shards")}))
    torch.manual_seed(0)
    build_denoiser(ModelConfig(overrides=overrides)).save_pretrained(str(work / "teacher"), safe_serialization=True)
    return str(work / "shards"), str(work / "teacher")


def _distill_peak(work: Path, shards: str, teacher: str, mode: str, steps: int) -> dict[str, Any]:
    """One 1-worker distillation run (fp32, ZeRO-2): its worker's peak RSS (max over steps) and step time."""
    from core.config import load_config
    from ray_jobs.distill_lcm import DistillConfig, run

    cfg = load_config(DistillConfig, "ray_jobs/configs/tiny/distill_lcm.yaml", {
        "data": shards, "teacher.path": teacher, "steps": steps, "batch_size": 1, "student.mode": mode,
        "checkpoint.every_n_steps": steps, "validation.enabled": False, "scaling.num_workers": 1,
        "run.storage_path": str(work / "runs"), "run.name": f"distill-{mode}"})
    run(cfg)
    lines = [json.loads(ln) for ln in (work / "runs" / f"distill-{mode}" / "metrics.jsonl").read_text().splitlines()]
    return {"peak_rss_mb": round(max(ln["peak_rss_mb"] for ln in lines), 1),
            "step_time_s": round(float(sorted(ln["step_time_s"] for ln in lines)[len(lines) // 2]), 2)}


def distill_section(args: argparse.Namespace) -> tuple[list[dict], dict[str, Any]]:
    """Peak RSS per distillation worker: a LoRA student on the shared base vs the full-copy student (student,
    EMA target and teacher as three models, plus the student's grads and Adam moments), same run otherwise."""
    from model.presets import ModelConfig, build_denoiser, count_parameters
    from ray_jobs.common import RayConfig, init_ray

    overrides = LOAD_MODELS["small_tensors"]
    model_mb = count_parameters(build_denoiser(ModelConfig(overrides=overrides))) * 4 / 2**20
    init_ray(RayConfig())
    with tempfile.TemporaryDirectory(prefix="scale-distill-") as tmp:
        shards, teacher = _distill_inputs(Path(tmp), overrides)
        runs = {mode: _distill_peak(Path(tmp), shards, teacher, mode, args.distill_steps) for mode in ("full", "lora")}
    ratio = runs["lora"]["peak_rss_mb"] / runs["full"]["peak_rss_mb"]
    extra = runs["full"]["peak_rss_mb"] - runs["lora"]["peak_rss_mb"]
    figures = {"overrides": overrides, "model_mb_fp32": round(model_mb, 1), "steps": args.distill_steps,
               "runs": runs, "lora_over_full": round(ratio, 3), "full_minus_lora_mb": round(extra, 1),
               "full_minus_lora_in_models": round(extra / model_mb, 2)}
    return [_goal("distill: LoRA shared-base peak RSS per worker / full-copy student's (1 worker, fp32)",
                  ratio, 0.5, "x")], figures


SECTIONS: dict[str, Callable[[argparse.Namespace], tuple[list[dict], dict[str, Any]]]] = {
    "load": load_section, "distill": distill_section}


def merge(path: Path, section: str, goals: list[dict], figures: dict[str, Any]) -> dict:
    """The JSON at ``path`` with ``section``'s figures replaced and its goals (named ``section: ...``) replaced."""
    data = json.loads(path.read_text()) if path.is_file() else {"goals": []}
    data["goals"] = [g for g in data["goals"] if not g["name"].startswith(f"{section}: ")] + goals
    data[section] = {**figures, "date": time.strftime("%Y-%m-%d")}
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--models", nargs="+", choices=sorted(LOAD_MODELS), default=list(LOAD_MODELS),
                        help="load: which models to measure (see LOAD_MODELS)")
    parser.add_argument("--distill-steps", type=int, default=3, help="distill: optimizer steps per run")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    for section in args.only or sorted(SECTIONS):
        goals, figures = SECTIONS[section](args)
        data = merge(args.out, section, goals, figures)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
        print(json.dumps(goals, indent=2), f"-> {args.out}")


if __name__ == "__main__":
    main()
