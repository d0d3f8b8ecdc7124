"""`ray_jobs.memory_plan`: exact meta-device parameter counts, the ZeRO arithmetic, the activation model against
a measured tiny step, and the command on a repo config."""

from __future__ import annotations

import pytest

from ray_jobs.memory_plan import (Clip, JobShape, Setting, activation_parts, job_shape, load_job_config, main,
                                  measure_activation_peak, parameter_counts, plan_row, state_bytes)

TEACHER = "ray_jobs/configs/tiny/train_teacher.yaml"


def test_meta_counts_equal_a_real_models():
    from model.denoiser import lora_config
    from model.presets import ModelConfig, build_denoiser, count_parameters

    cfg = ModelConfig(aux_head=True)
    real = build_denoiser(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == count_parameters(real) > 1_000_000
    assert counts["aux"] == sum(p.numel() for n, p in real.named_parameters() if n.startswith("aux_")) > 0
    for name in ("motion", "fidelity"):  # as TPO adds its two experts
        real.add_adapter(lora_config(4, None, "attn+ffn"), name)
    with_lora = parameter_counts(cfg, (4, "attn+ffn"), adapters=2)
    assert with_lora["total"] == count_parameters(real)
    assert with_lora["lora"] == sum(p.numel() for n, p in real.named_parameters() if "lora_" in n) > 0


def test_zero_stages_divide_by_hand():
    shape = JobShape(job="x", preset="tiny", kwargs={}, engine_params=1000, trainable=100, frozen_copy_params=50,
                     ema_fp32_params=100, block_params=10)
    want = {  # bytes per GPU over 4 ranks: bf16 weights 2, grads 2, fp32 master + Adam 12, fp32 EMA 4, frozen bf16 2
        Setting(zero=1): dict(weights=2000, grads=200, optimizer=300, ema=400, frozen=100),
        Setting(zero=2): dict(weights=2000, grads=50, optimizer=300, ema=400, frozen=100),
        Setting(zero=3): dict(weights=500 + 20, grads=50, optimizer=300, ema=100, frozen=100),
        Setting(zero=2, offload="optimizer"): dict(weights=2000, grads=50, optimizer=0, ema=400, frozen=100),
        Setting(zero=3, offload="optimizer+params"): dict(weights=20, grads=50, optimizer=0, ema=100, frozen=100),
    }
    for setting, parts in want.items():
        assert state_bytes(shape, setting, gpus=4) == pytest.approx(parts), setting


def test_activation_model_matches_a_measured_tiny_step():
    from model.presets import ModelConfig, preset_kwargs

    cfg, clip = ModelConfig(), Clip.parse("8x64x64")
    predicted = sum(activation_parts(preset_kwargs(cfg), clip, sp=1, dtype_bytes=4).values())
    measured = measure_activation_peak(cfg, clip)
    assert 0.85 < measured / predicted < 1.2, (measured, predicted)
    halved = activation_parts(preset_kwargs(cfg), clip, sp=2, dtype_bytes=4)  # SP splits the checkpointed part only
    full = activation_parts(preset_kwargs(cfg), clip, sp=1, dtype_bytes=4)
    assert halved["block"] == full["block"] / 2 and halved["pose"] == full["pose"]


def test_command_prints_the_plan_of_a_repo_config(capsys):
    argv = [TEACHER, "--set", "model.preset=wan-1.3b", "--gpus", "8", "--gpu-gb", "80", "--clip", "81x720x1280"]
    main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| row | job | preset |") and len([ln for ln in lines if ln.startswith("| ")]) == 4
    job, cfg = load_job_config(TEACHER, ["model.preset=wan-1.3b"])
    row = plan_row(job_shape(job, cfg), Clip.parse("81x720x1280"), Setting(zero=2, sp=1), 8, 80)
    config_row = next(ln for ln in lines if ln.startswith("| config |"))
    assert f"| ZeRO-2, sp 1 | {row['weights']} |" in config_row and f"| {row['total']} | yes |" in config_row
    assert row["weights"] == pytest.approx(2 * 1.53e9 / 1e9, abs=0.1)  # wan-1.3b preset: ~1.53 B parameters
    main(["ray_jobs/configs/tiny/train_tpo.yaml"])  # no data card here: the clip falls back, and says so
    out = capsys.readouterr().out
    assert "| recommended | tpo | tiny | 2 x 80 GB | 8x64x64 |" in out and "pass --clip" in out
