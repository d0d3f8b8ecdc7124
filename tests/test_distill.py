"""DanceLCM distillation: segment math, exact-field consistency, switches, TPO routing, a 2-worker DeepSpeed run, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.conditions import Conditions
from core.config import load_config
from model.flow import add_noise
from model.generate import generate
from model.losses import consistency_function, fine_solver_grid, sample_consistency_pair
from model.presets import ModelConfig, build_denoiser
from model.samplers import consistency_target_edge, sample_consistency, segment_edges
from artifacts.exports import export_student, load_export
from core.storage import Storage
from ray_jobs.distill_lcm import DistillConfig, DistillObjective, DistillTask, distill_losses, run, update_target

TINY = "ray_jobs/configs/tiny/distill_lcm.yaml"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    """A tiny teacher export: random init with the zero-init condition paths woken, saved diffusers-style."""
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("ref_embedding", "pose_encoder.proj", "null_")) or ".to_out." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    folder = tmp_path_factory.mktemp("teacher") / "export"
    model.save_pretrained(str(folder), safe_serialization=True)
    return str(folder)


def _config(teacher: str, **overrides) -> DistillConfig:
    base = {"teacher.path": teacher, "batch_size": 1, "optim.warmup_steps": 0, "objective.solver_points": 20}
    return load_config(DistillConfig, TINY, {**base, **overrides})


def _batch(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the shard schema's shapes (docs/design.md, tiny geometry)."""
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 8, 16, 16, generator=gen) > 0.7).float()
    return {"latents": torch.randn(batch, 16, 8, 16, 16, generator=gen),
            "ref_latent": torch.randn(batch, 16, 1, 16, 16, generator=gen),
            "pose": torch.randint(0, 256, (batch, 8, 64, 64, 3), generator=gen, dtype=torch.uint8),
            "audio_feats": torch.randn(batch, 8, 6, 32, generator=gen),
            "ref_face_latent": torch.randn(batch, 16, 1, 8, 8, generator=gen),
            "has_audio": torch.ones(batch, dtype=torch.bool), "has_ref_face": torch.ones(batch, dtype=torch.bool),
            "motion_mask": mask}


class _Engine:
    """What micro_step needs of a DeepSpeed engine for single-process unit tests: call, .module, .global_steps."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.global_steps = module, 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _new_task(cfg: DistillConfig) -> DistillTask:
    """The task as a worker builds it: the teacher's card (its CFG drop) and the shards' data card (frames)."""
    from artifacts.card import DataCard, ModelCard
    from model.sampling import SamplerSpec

    return DistillTask(cfg, None, ModelCard(kind="teacher", sampler=SamplerSpec(cfg_drop=["pose", "audio", "face"])),
                       DataCard(uri="in-memory"))


def _task(cfg: DistillConfig) -> tuple[DistillTask, _Engine]:
    task = _new_task(cfg)
    torch.manual_seed(0)
    engine = _Engine(task.build_model())
    task.on_engine_ready(engine, torch.device("cpu"), torch.float32)
    return task, engine


class _ExactField:
    """Exact velocity of the flow towards one clean latent x0: v = (x - x0) / σ (straight lines, Euler is exact)."""

    def __init__(self, x0: torch.Tensor, bias: float = 0.0):
        self.x0, self.bias = x0, bias

    def __call__(self, x, sigma, cond, return_aux=False):
        v = (x - self.x0) / sigma.clamp(min=1e-3).view(-1, 1, 1, 1, 1) + self.bias
        return (v, self.x0.clone()) if return_aux else v


# ---------------------------------------------------------------------- math
def test_segment_edges_and_config_validation(teacher_dir):
    assert DistillObjective().edge_tensor().tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    shifted = DistillObjective(segments=2, edge_shift=3.0).edge_tensor()
    assert shifted[1].item() == pytest.approx(0.75)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert DistillObjective(segments=2, edges=[0.0, 0.6, 1.0]).edge_tensor().tolist() == pytest.approx([0, 0.6, 1])
    with pytest.raises(ValueError, match="segments"):
        DistillObjective(segments=3, edges=[0.0, 0.6, 1.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        DistillObjective(segments=2, edges=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ZeRO <= 2"):
        _config(teacher_dir, **{"deepspeed.zero_stage": 3})
    with pytest.raises(ValueError, match="contradicts objective.aux"):
        _config(teacher_dir, **{"model.aux_head": False})
    cfg = _config(teacher_dir, **{"objective.face": False, "objective.aux": False})
    student = cfg.student_model_config()
    assert (student.face_injection, student.aux_head, student.pretrained_path) == (False, False, teacher_dir)


def test_pairs_stay_in_their_segment_and_one_jump_lands_on_the_lower_edge():
    edges = segment_edges([0.0, 0.2, 0.55, 0.8, 1.0])
    pair = sample_consistency_pair(edges, fine_solver_grid(60), 4000, torch.Generator().manual_seed(0))
    assert bool((pair.sigma_edge <= pair.sigma_n).all() and (pair.sigma_n < pair.sigma_m).all())
    assert torch.equal(consistency_target_edge(pair.sigma_m, edges), pair.sigma_edge)
    assert set(pair.segment.tolist()) == {0, 1, 2, 3}
    # From any σ in a segment, f = x_σ + (s_k - σ) v with the exact velocity is x at s_k on the same path.
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 16, 2, 4, 4, generator=gen), torch.randn(6, 16, 2, 4, 4, generator=gen)
    sigma = torch.tensor([0.01, 0.2, 0.21, 0.55, 0.79, 1.0])
    edge = consistency_target_edge(sigma, edges)
    assert edge.tolist() == pytest.approx([0.0, 0.0, 0.2, 0.2, 0.55, 0.8])
    jumped = consistency_function(add_noise(x0, eps, sigma), sigma, eps - x0, edge)
    torch.testing.assert_close(jumped, add_noise(x0, eps, edge), atol=1e-5, rtol=0)


def test_cd_loss_is_zero_when_student_target_and_teacher_agree():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 16, 2, 4, 4, generator=gen)
    cond = Conditions(ref_latent=torch.randn(3, 16, 1, 4, 4, generator=gen))
    mask = torch.rand(3, 2, 4, 4, generator=gen)
    obj = DistillObjective(solver_points=30, motion_weight=3.0)
    exact = _ExactField(x0)
    args = dict(x0=x0, cond=cond, uncond=cond.drop({"ref"}), edges=obj.edge_tensor(), grid=fine_solver_grid(30),
                obj=obj, motion_mask=mask)
    for seed in range(5):
        total, terms = distill_losses(exact, exact, exact, generator=torch.Generator().manual_seed(seed), **args)
        assert terms["loss_cd"] < 1e-6 and terms["loss_aux"] < 1e-6 and float(total) < 1e-6
    _, off = distill_losses(_ExactField(x0, bias=0.1), exact, exact, generator=torch.Generator().manual_seed(0), **args)
    assert off["loss_cd"] > 1e-3  # a wrong student is penalised


# ---------------------------------------------------------------------- switches
def _step(cfg: DistillConfig, seed: int = 0):
    task, engine = _task(cfg)
    loss, terms = task.micro_step(engine, _batch(), torch.Generator().manual_seed(seed))
    return task, engine, loss, terms


def test_all_on_trains_aux_head_and_face_path(teacher_dir):
    cfg = _config(teacher_dir)
    task, engine, loss, terms = _step(cfg)
    assert set(terms) == {"loss_cd", "loss_aux", "motion_fraction", "sigma_m", "teacher_w"}
    # CFG on: the per-clip scales are drawn from U[w_min, w_max] (1.0, the no-CFG value, only at w_min)
    assert cfg.objective.w_min < terms["teacher_w"] <= cfg.objective.w_max and loss.item() > 0
    loss.backward()
    grads = {n: p.grad for n, p in engine.module.named_parameters()}
    assert grads["aux_proj.weight"] is not None and grads["aux_proj.weight"].abs().sum() > 0
    assert grads["face_embedding.weight"] is not None
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert all(not p.requires_grad for p in task.target.parameters())


def test_each_switch_removes_its_term(teacher_dir):
    _, engine, _, terms = _step(_config(teacher_dir, **{"objective.aux": False}))
    assert "loss_aux" not in terms and not any(n.startswith("aux_") for n, _ in engine.module.named_parameters())
    _, engine, _, terms = _step(_config(teacher_dir, **{"objective.face": False}))
    assert not any(n.startswith("face_") for n, _ in engine.module.named_parameters())
    # Motion: off equals weight 1 exactly (same draws); a weight > 1 changes the loss.
    off = _step(_config(teacher_dir, **{"objective.motion_loss": False}))[3]
    unit = _step(_config(teacher_dir, **{"objective.motion_weight": 1.0}))[3]
    heavy = _step(_config(teacher_dir, **{"objective.motion_weight": 5.0}))[3]
    assert "motion_fraction" not in off and off["loss_cd"] == pytest.approx(unit["loss_cd"], rel=1e-6)
    assert heavy["loss_cd"] > unit["loss_cd"] * 1.05
    # No CFG in the teacher: one teacher call per step instead of two.
    task, engine = _task(_config(teacher_dir, **{"objective.teacher_cfg": False}))
    calls = []
    inner = task.teacher_fn
    task.teacher_fn = lambda *a, **k: calls.append(1) or inner(*a, **k)
    _, terms = task.micro_step(engine, _batch(), torch.Generator().manual_seed(0))
    assert len(calls) == 1 and terms["teacher_w"] == 1.0
    # K = 1: plain consistency distillation, every target is the clean end (edge 0).
    task = _new_task(_config(teacher_dir, **{"objective.segments": 1}))
    assert task.edges.tolist() == [0.0, 1.0]


def test_lora_student_trains_only_adapters_and_aux(teacher_dir):
    task, engine, loss, _ = _step(_config(teacher_dir, **{"student.mode": "lora", "student.lora_rank": 2}))
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("aux_") for n in trainable)
    assert any(n.startswith("aux_") for n in trainable)


def _perturb(model: torch.nn.Module, adapter: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)


def test_shared_base_gives_the_losses_and_gradients_of_three_separate_models(teacher_dir):
    """Issue 19: the LoRA student, its EMA target and the teacher as adapters of ONE base compute exactly
    what three separate networks (teacher, base + student adapter, base + target adapter) compute."""
    import copy

    from model.denoiser import use_adapter
    from ray_jobs.distill_lcm import TARGET_ADAPTER, distill_losses

    task, engine = _task(_config(teacher_dir, **{"student.mode": "lora", "student.lora_rank": 2}))
    shared = engine.module
    _perturb(shared, "student", 1)
    _perturb(shared, TARGET_ADAPTER, 2)  # target != student != teacher, so each pass matters
    student = copy.deepcopy(shared)
    student.delete_adapters([TARGET_ADAPTER])
    target = copy.deepcopy(shared)
    use_adapter(target, TARGET_ADAPTER)
    teacher = build_denoiser(ModelConfig(pretrained_path=teacher_dir)).requires_grad_(False)
    batch = _batch()
    loss, terms = task.micro_step(engine, batch, torch.Generator().manual_seed(0))
    loss.backward()
    cond = Conditions.from_batch(batch)
    alone, alone_terms = distill_losses(student, target, teacher, batch["latents"], cond, cond.drop(task.uncond_drop),
                                        task.edges, task.grid, task.cfg.objective, torch.Generator().manual_seed(0),
                                        batch["motion_mask"])
    alone.backward()
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=0)
    assert terms["loss_aux"] == pytest.approx(alone_terms["loss_aux"], rel=1e-5)
    grads = {n: p.grad for n, p in student.named_parameters() if p.requires_grad}
    assert grads and any(g.abs().max() > 0 for g in grads.values())
    for name, param in shared.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-7)


def _held_bytes(task, engine) -> int:
    """Bytes of the distinct parameter tensors a worker's task holds (student, target, teacher)."""
    held = {}
    for module in (engine.module, task.target, getattr(task, "teacher", None)):
        for tensor in ([] if module is None else module.parameters()):
            held[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(held.values())


def test_a_lora_student_holds_one_base_model_plus_adapters(teacher_dir):
    base = sum(p.numel() * p.element_size() for p in build_denoiser(ModelConfig(pretrained_path=teacher_dir)).parameters())
    lora, lora_engine = _task(_config(teacher_dir, **{"student.mode": "lora", "student.lora_rank": 2}))
    full, full_engine = _task(_config(teacher_dir))
    adapters = sum(p.numel() * p.element_size() for n, p in lora_engine.module.named_parameters()
                   if "lora_" in n or n.startswith("aux_"))
    assert _held_bytes(lora, lora_engine) == base + adapters and adapters < 0.2 * base
    assert _held_bytes(full, full_engine) >= 3 * base  # student, target and teacher: three models


def test_target_is_an_ema_of_the_student_after_each_optimizer_step(teacher_dir):
    task, engine = _task(_config(teacher_dir, **{"objective.target_ema_decay": 0.9}))
    before = {n: p.detach().clone() for n, p in task.target.named_parameters()}
    with torch.no_grad():
        for p in engine.module.parameters():
            p.add_(1.0)
    task.sync_target(engine)  # no optimizer step yet: unchanged
    assert all(torch.equal(p, before[n]) for n, p in task.target.named_parameters())
    engine.global_steps = 1
    task.sync_target(engine)
    for name, param in task.target.named_parameters():
        torch.testing.assert_close(param, before[name] + 0.1, atol=1e-5, rtol=0)
    update_target(task.target, engine.module, 0.0)
    assert all(torch.equal(p, q) for p, q in zip(task.target.parameters(), engine.module.parameters()))
    # the LoRA student's target: the EMA of the student adapter, in the target adapter of the same base
    from ray_jobs.distill_lcm import adapter_pairs

    task, engine = _task(_config(teacher_dir, **{"student.mode": "lora", "objective.target_ema_decay": 0.9}))
    pairs = adapter_pairs(engine.module)
    assert all(torch.equal(t, s) for t, s in pairs)  # the target starts as the student
    before = [t.detach().clone() for t, _ in pairs]
    with torch.no_grad():
        for _, student in pairs:
            student.add_(1.0)
    engine.global_steps = 1
    task.sync_target(engine)
    for (target, _), old in zip(pairs, before):
        torch.testing.assert_close(target, old + 0.1, atol=1e-5, rtol=0)
    state = task.state_dict()
    assert set(state["target"]) == {n for n, _ in engine.module.named_parameters() if ".target." in n}


def _tpo_export(teacher_dir: str, folder: Path, boundary: float) -> str:
    """A TPO export as the TPO job writes it: two random experts and a card naming them, their base and σ segments."""
    from artifacts.card import ModelCard, write_card
    from model.denoiser import lora_config
    from model.sampling import SamplerSpec

    model = build_denoiser(ModelConfig(pretrained_path=teacher_dir))
    gen = torch.Generator().manual_seed(4)
    for name in ("motion", "fidelity"):
        model.add_adapter(lora_config(rank=2), name)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_B" in pname and f".{name}." in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
        model.save_lora_adapter(str(folder / name), adapter_name=name)
    write_card(folder, ModelCard(kind="tpo", format="lora", base_model=teacher_dir, adapters=["motion", "fidelity"],
                                 sampler=SamplerSpec(kind="tpo", tpo_boundary=boundary)))
    return str(folder)


def test_tpo_export_experts_are_routed_per_sigma_on_its_cards_boundary(teacher_dir, tmp_path):
    from model.denoiser import use_adapter

    tpo = _tpo_export(teacher_dir, tmp_path / "tpo", boundary=0.6)
    # a face-less student: the teacher is still built as its own card says (with its face path)
    task, _ = _task(_config(teacher_dir, **{"teacher.tpo_path": tpo, "objective.face": False}))
    assert task.teacher.config.face_injection and not any(p.requires_grad for p in task.teacher.parameters())
    batch = _batch(3)
    cond = Conditions.from_batch(batch)
    x, sigma = batch["latents"], torch.tensor([0.95, 0.7, 0.3])  # the card's boundary 0.6: motion, motion, fidelity
    with torch.no_grad():
        routed = task.teacher_fn(x, sigma, cond)
        expected = {}
        for name in ("motion", "fidelity"):
            use_adapter(task.teacher, name)
            expected[name] = task.teacher(x, sigma, cond)
        use_adapter(task.teacher, None)
        base = task.teacher(x, sigma, cond)
    for i, name in enumerate(("motion", "motion", "fidelity")):
        torch.testing.assert_close(routed[i], expected[name][i])
    assert (routed - base).abs().max() > 1e-4


def test_a_tpo_export_of_another_teacher_fails_at_start_naming_both(teacher_dir, tmp_path):
    tpo = _tpo_export(teacher_dir, tmp_path / "tpo", boundary=0.875)
    other = tmp_path / "other_teacher"
    build_denoiser(ModelConfig()).save_pretrained(str(other), safe_serialization=True)
    with pytest.raises(ValueError, match="trained on") as caught:
        run(_config(str(other), **{"teacher.tpo_path": tpo, "data": "unused"}))
    assert teacher_dir in str(caught.value) and str(other) in str(caught.value)


def test_lora_export_loads_and_samples_in_k_nfe(teacher_dir, tmp_path):
    cfg = _config(teacher_dir, **{"student.mode": "lora", "student.lora_rank": 2, "objective.segments": 2})
    task, engine = _task(cfg)
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    export_student(engine.module, weights, tmp_path / "export", task.card)
    loaded = load_export(str(tmp_path / "export"), Storage())
    student, edges = loaded.model, loaded.sampler.edges
    assert loaded.card.format == "lora" and loaded.card.base_model == teacher_dir
    assert edges == [0.0, 0.5, 1.0] and not student.config.aux_head
    cond = Conditions.from_batch(_batch(1))
    x = torch.randn(1, 16, 8, 16, 16)
    with torch.no_grad():
        result = sample_consistency(student, x, cond, torch.tensor(edges))
        engine.module.eval()
        reference = sample_consistency(engine.module, x, cond, torch.tensor(edges))
    assert result.nfe == 2
    torch.testing.assert_close(result.x, reference.x, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------- Ray Train + DeepSpeed
def test_two_worker_deepspeed_distillation_exports_a_k_step_student(tiny_data, teacher_dir, tmp_path):
    """The scale configuration: a LoRA student on the teacher's shared base under ZeRO-3, in bf16 on CPU
    (teacher, target and student passes of one partitioned network; export from rank 0 in bf16)."""
    from model.vae import load_vae

    cfg = _config(teacher_dir, data=tiny_data, steps=2, **{
        "checkpoint.every_n_steps": 2, "deepspeed.precision": "bf16", "deepspeed.zero_stage": 3,
        "student.mode": "lora", "student.lora_rank": 4, "run.storage_path": str(tmp_path), "run.name": "student"})
    result = run(cfg)
    assert result.metrics["step"] == 2
    lines = [json.loads(ln) for ln in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2]
    # loss_cd can be exactly 0 at step 1: student = target = teacher and σ_n on the edge (boundary condition).
    assert all(ln["loss_cd"] >= 0 and ln["loss_aux"] > 0 and np.isfinite(ln["loss"]) for ln in lines)
    assert "val_nfe" not in result.metrics  # ZeRO-3: no single-rank validation pass, the export is the check
    export = tmp_path / "student" / "export"
    loaded = load_export(str(export), Storage())
    assert loaded.card.kind == "student" and loaded.card.format == "lora"
    assert loaded.sampler.edges == [0.0, 0.25, 0.5, 0.75, 1.0]
    student = loaded.model
    cond = Conditions.from_batch(_batch(1))
    assert any(p.abs().max() > 0 for n, p in student.named_parameters() if "lora_B" in n), "adapter untrained"
    out = generate(student, load_vae(None), cond, num_frames=8, spec=loaded.sampler)
    assert out.nfe == 4 and tuple(out.frames.shape) == (8, 64, 64, 3)
