"""AnimationDenoiser: shapes, conditions, learned nulls, LoRA, checkpointing, speed, overfitting, save/load."""

from __future__ import annotations

import copy
import inspect
import time

import pytest
import torch

from model.conditions import Conditions
from model.denoiser import AnimationDenoiser, load_transformer_weights, lora_config, use_adapter
from model.presets import PRESETS, ModelConfig, build_denoiser, count_parameters


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _inputs(batch: int = 1, seed: int = 0, face: bool = True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 8, 16, 16, generator=gen)
    cond = Conditions(
        ref_latent=torch.randn(batch, 16, 1, 16, 16, generator=gen),
        pose=torch.rand(batch, 3, 8, 64, 64, generator=gen) * 2 - 1,
        audio=torch.randn(batch, 8, 6, 32, generator=gen),
        face=torch.randn(batch, 16, 1, 8, 8, generator=gen) if face else None,  # the reference's face latent
    )
    return x, torch.rand(batch, generator=gen), cond


def _wake_zero_inits(model: AnimationDenoiser, seed: int = 1) -> None:
    """Make the zero-initialised condition paths and nulls non-zero (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (name.startswith(("ref_embedding", "pose_encoder.proj", "null_"))
                    or (name.startswith(("audio_attn", "face_attn")) and ".to_out." in name)):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("face_injection,aux_head", [(True, False), (False, False), (True, True), (False, True)])
def test_shapes_for_condition_combinations(face_injection, aux_head):
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(face_injection=face_injection, aux_head=aux_head)).eval()
    x, sigma, cond = _inputs(batch=2)
    with torch.no_grad():
        for present in ({}, {"pose": None}, {"audio": None}, {"face": None}, {"ref_latent": None},
                        {"pose": None, "audio": None, "face": None, "ref_latent": None}):
            sub = Conditions(**{**{k: getattr(cond, k) for k in ("ref_latent", "pose", "audio", "face")}, **present})
            v = model(x, sigma, sub)
            assert v.shape == x.shape and torch.isfinite(v).all()
        if aux_head:
            v, x0 = model(x, sigma, cond, return_aux=True)
            assert v.shape == x0.shape == x.shape
        else:
            with pytest.raises(ValueError, match="aux_head"):
                model(x, sigma, cond, return_aux=True)
    assert hasattr(model, "face_attn") == face_injection


def test_dropping_each_condition_changes_the_output_and_zero_init_is_neutral():
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(ref_as_frame=True)).eval()
    x, sigma, cond = _inputs(batch=2)
    with torch.no_grad():
        fresh = model(x, sigma, cond)
        # zero-initialised paths: only the ref frame (a pretrained-style patch embedding) acts
        assert torch.allclose(fresh, model(x, sigma, cond.drop({"pose", "audio", "face"})), atol=1e-6)
        _wake_zero_inits(model)
        full = model(x, sigma, cond)
        for name in ("ref", "pose", "audio", "face"):
            dropped = model(x, sigma, cond.drop({name}))
            assert (dropped - full).abs().max() > 1e-4, name
        # per-sample keep: dropping sample 1's audio leaves sample 0 unchanged
        keep = {"audio": torch.tensor([True, False])}
        mixed = model(x, sigma, Conditions(cond.ref_latent, cond.pose, cond.audio, cond.face, keep))
        assert torch.allclose(mixed[0], full[0], atol=1e-5) and (mixed[1] - full[1]).abs().max() > 1e-4
        # a dropped condition equals its learned null whatever the tensor held
        other = Conditions(cond.ref_latent, cond.pose, torch.randn_like(cond.audio), cond.face)
        assert torch.allclose(model(x, sigma, other.drop({"audio"})), model(x, sigma, cond.drop({"audio"})), atol=1e-5)


def test_bad_shapes_are_loud():
    model = build_denoiser(ModelConfig()).eval()
    x, sigma, cond = _inputs()
    with torch.no_grad(), pytest.raises(ValueError, match="pose"):
        model(x, sigma, Conditions(cond.ref_latent, cond.pose[:, :, :4], cond.audio, cond.face))
    with torch.no_grad(), pytest.raises(ValueError, match="audio"):
        model(x, sigma, Conditions(cond.ref_latent, cond.pose, cond.audio[:, :, :, :8], cond.face))
    with torch.no_grad(), pytest.raises(ValueError, match="face"):
        model(x, sigma, Conditions(cond.ref_latent, cond.pose, cond.audio, cond.face.repeat(1, 1, 3, 1, 1)))
    with pytest.raises(ValueError):
        ModelConfig(overrides={"no_such_kwarg": 1})


def test_reference_face_broadcasts_over_latent_frames():
    """face (B, C, 1, hf, wf) acts as that face repeated on every latent frame; per-frame faces still work."""
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig()).eval()
    _wake_zero_inits(model)
    x, sigma, cond = _inputs(batch=2)
    per_frame = cond.face.repeat(1, 1, x.shape[2], 1, 1)
    with torch.no_grad():
        once = model(x, sigma, cond)
        repeated = model(x, sigma, Conditions(cond.ref_latent, cond.pose, cond.audio, per_frame))
        varied = per_frame.clone()
        varied[:, :, 3] = torch.randn_like(varied[:, :, 3])
        other = model(x, sigma, Conditions(cond.ref_latent, cond.pose, cond.audio, varied))
    assert torch.allclose(once, repeated, atol=1e-5)
    assert (other - once).abs().max() > 1e-4  # per-frame faces are not collapsed to one


def test_tiny_param_count_and_timed_train_step():
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig())
    params = count_parameters(model)
    assert 1_000_000 <= params <= 5_000_000, params
    x, sigma, cond = _inputs()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model(x, sigma, cond).square().mean().backward()
        times.append(time.perf_counter() - start)
    print(f"tiny denoiser: {params / 1e6:.2f}M params, fwd+bwd (1 x 16x8x16x16, 512 tokens): "
          f"best {min(times):.3f}s of {[round(t, 3) for t in times]}")
    assert min(times) < 2.0


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_denoiser(ModelConfig(aux_head=True))
    _wake_zero_inits(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_gradient_checkpointing()
    x, sigma, cond = _inputs()
    for model in (plain, ckpt):
        v, x0 = model(x, sigma, cond, return_aux=True)
        (v.square().mean() + x0.abs().mean()).backward()
    assert ckpt.gradient_checkpointing and not plain.gradient_checkpointing
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name


def test_two_lora_adapters_switch_disable_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig()).eval()
    _wake_zero_inits(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x, sigma, cond = _inputs()
    with torch.no_grad():
        v_base = model(x, sigma, cond)
    model.add_adapter(lora_config(rank=4), "motion")
    model.add_adapter(lora_config(rank=4, targets="attn+ffn"), "fidelity")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; make the adapters act
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name and ".fidelity." in name)
    with torch.no_grad():
        outs = {}
        for name in ("motion", "fidelity", None):
            use_adapter(model, name)
            outs[name] = model(x, sigma, cond)
    assert torch.allclose(outs[None], v_base, atol=1e-6)
    assert (outs["motion"] - v_base).abs().max() > 1e-3 and (outs["fidelity"] - v_base).abs().max() > 1e-3
    assert (outs["motion"] - outs["fidelity"]).abs().max() > 1e-3
    # switching never changed which LoRA weights train
    assert all(p.requires_grad == (".fidelity." in n) for n, p in model.named_parameters() if "lora_" in n)
    with pytest.raises(KeyError):
        use_adapter(model, "nope")

    for name in ("motion", "fidelity"):
        model.save_lora_adapter(str(tmp_path / name), adapter_name=name)
    fresh = build_denoiser(ModelConfig()).eval()
    fresh.load_state_dict(base_state)
    for name in ("motion", "fidelity"):
        fresh.load_lora_adapter(str(tmp_path / name), adapter_name=name, prefix=None,
                                weight_name="pytorch_lora_weights.safetensors")
    with torch.no_grad():
        for name in ("motion", "fidelity", None):
            use_adapter(fresh, name)
            assert torch.equal(fresh(x, sigma, cond), outs[name]), name


def test_tiny_model_overfits_one_clip():
    """Flow matching (x_s = (1-s) x0 + s eps, v = eps - x0) on one fixed clip: loss falls >= 5x."""
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(face_injection=False))
    x0, _, cond = _inputs(face=False)
    gen = torch.Generator().manual_seed(7)
    sigmas = torch.tensor([0.3, 0.7])
    eps = torch.randn(len(sigmas), *x0.shape[1:], generator=gen)
    x_sigma = (1 - sigmas.view(-1, 1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1, 1) * eps
    target = eps - x0
    batch_cond = cond.repeat(len(sigmas))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    start = time.perf_counter()
    for _ in range(40):  # ~15 s on an idle core
        loss = (model(x_sigma, sigmas, batch_cond) - target).square().mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({losses[0] / losses[-1]:.1f}x) "
          f"in {time.perf_counter() - start:.1f}s")
    assert losses[0] / min(losses[-5:]) >= 5.0


def test_save_pretrained_round_trips_and_loads_as_a_student(tmp_path):
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig()).eval()
    _wake_zero_inits(model)
    x, sigma, cond = _inputs()
    model.save_pretrained(str(tmp_path / "teacher"))
    with torch.no_grad():
        expected = model(x, sigma, cond)
        again = AnimationDenoiser.from_pretrained(str(tmp_path / "teacher")).eval()
        assert torch.equal(again(x, sigma, cond), expected)
        built = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "teacher"))).eval()
        assert torch.equal(built(x, sigma, cond), expected)
        # the same folder seeds a student with an aux head: everything else loads, the head initialises
        student = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "teacher"), aux_head=True)).eval()
        v, x0 = student(x, sigma, cond, return_aux=True)
        assert torch.equal(v, expected) and x0.shape == x.shape


def test_loads_a_plain_wan_folder_and_starts_unchanged(tmp_path):
    """A WanTransformer3DModel folder loads by name; our zero-init paths leave Wan's output as is."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    wan_params = inspect.signature(WanTransformer3DModel.__init__).parameters
    wan_kwargs = {k: v for k, v in PRESETS["tiny"].items() if k in wan_params}
    assert wan_kwargs["num_layers"] == 4 and len(wan_kwargs) == 13
    wan = WanTransformer3DModel(**wan_kwargs).eval()
    wan.save_pretrained(str(tmp_path / "wan"))
    model = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "wan"))).eval()
    report = load_transformer_weights(model, tmp_path / "wan")
    assert "blocks.0.attn1.to_q.weight" in report.loaded and "patch_embedding.weight" in report.loaded
    assert "pose_encoder.proj.weight" in report.initialised and not report.unused
    x, sigma, cond = _inputs()
    with torch.no_grad():
        v_ours = model(x, sigma, cond)
        v_wan = wan(x, sigma * 1000, model.context_tokens[None], return_dict=False)[0]
    assert torch.allclose(v_ours, v_wan, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "wan"), overrides={"num_layers": 2}))


@pytest.mark.parametrize("preset,expected_billions", [("wan-1.3b", 1.53), ("wan-animate-14b", 15.97)])
def test_real_presets_build_on_the_meta_device(preset, expected_billions):
    with torch.device("meta"):
        model = build_denoiser(ModelConfig(preset=preset))
    params = count_parameters(model)
    wan_only = sum(p.numel() for n, p in model.named_parameters()
                   if n.startswith(("blocks.", "patch_embedding", "condition_embedder", "proj_out", "scale_shift")))
    assert params / 1e9 == pytest.approx(expected_billions, abs=0.01)
    # the Wan part is the published transformer: 1.3B -> ~1.42B, 14B -> ~14.3B parameters
    assert wan_only / 1e9 == pytest.approx({"wan-1.3b": 1.42, "wan-animate-14b": 14.29}[preset], abs=0.02)
    assert next(model.parameters()).device.type == "meta"


def test_s3_round_trip(tmp_path, s3_bucket, storage):
    """save_pretrained -> Storage.upload_dir to the moto S3 server -> build from s3:// -> same outputs."""
    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(aux_head=True)).eval()
    _wake_zero_inits(model)
    model.save_pretrained(str(tmp_path / "export"))
    uri = f"{s3_bucket}/runs/teacher/export"
    storage.upload_dir(tmp_path / "export", uri)
    with pytest.raises(ValueError, match="remote"):  # model/ reads local folders only
        build_denoiser(ModelConfig(pretrained_path=uri, aux_head=True))
    from artifacts.models import load_denoiser

    loaded = load_denoiser(ModelConfig(pretrained_path=uri, aux_head=True), storage).eval()
    x, sigma, cond = _inputs()
    with torch.no_grad():
        expected = model(x, sigma, cond, return_aux=True)
        got = loaded(x, sigma, cond, return_aux=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_bf16_model_takes_fp32_inputs_and_answers_in_their_dtype():
    """Inputs are cast to the model's dtype in one place (its forward), outputs back to the caller's."""
    from model.conditions import Conditions

    gen = torch.Generator().manual_seed(0)
    cond = Conditions(ref_latent=torch.randn(1, 16, 1, 16, 16, generator=gen),
                      pose=torch.rand(1, 3, 8, 64, 64, generator=gen) * 2 - 1,
                      audio=torch.randn(1, 8, 6, 32, generator=gen), face=torch.randn(1, 16, 1, 8, 8, generator=gen))
    x = torch.randn(1, 16, 8, 16, 16, generator=gen)
    torch.manual_seed(0)
    full = build_denoiser(ModelConfig(aux_head=True)).eval()
    _wake_zero_inits(full)  # so the comparison sees every condition
    half = build_denoiser(ModelConfig(aux_head=True)).eval()
    half.load_state_dict(full.state_dict())
    half.to(torch.bfloat16)
    with torch.no_grad():
        reference = full(x, torch.tensor([0.5]), cond)
        velocity, aux = half(x, torch.tensor([0.5]), cond, return_aux=True)
    assert velocity.dtype == aux.dtype == torch.float32
    error = (velocity - reference).abs().mean() / reference.abs().mean()
    assert 0 < error < 0.05  # bf16 rounding, not a different computation


def test_cast_model_keeps_wans_fp32_modules_and_runs_from_fp32_inputs():
    """`cast_model` puts the model in bf16 except what Wan keeps in fp32 (norms, time embedder,
    scale-shift tables, rope), as diffusers' from_pretrained(torch_dtype=bf16) does; the mixed model
    runs from fp32 inputs and answers in fp32."""
    from model.conditions import Conditions
    from model.precision import cast_model, precision_dtype

    assert precision_dtype("auto", "cpu") == torch.float32 and precision_dtype("bf16", "cpu") == torch.bfloat16
    assert precision_dtype("auto", "cuda") == torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    cond = Conditions(ref_latent=torch.randn(1, 16, 1, 16, 16, generator=gen),
                      pose=torch.rand(1, 3, 8, 64, 64, generator=gen) * 2 - 1,
                      audio=torch.randn(1, 8, 6, 32, generator=gen), face=torch.randn(1, 16, 1, 8, 8, generator=gen))
    x = torch.randn(1, 16, 8, 16, 16, generator=gen)
    full = build_denoiser(ModelConfig()).eval()
    _wake_zero_inits(full)
    mixed = cast_model(build_denoiser(ModelConfig()).eval(), torch.bfloat16)
    mixed.load_state_dict(full.state_dict())
    dtypes = {n: p.dtype for n, p in mixed.named_parameters()}
    assert dtypes["scale_shift_table"] == dtypes["blocks.0.scale_shift_table"] == torch.float32
    assert dtypes["blocks.0.norm2.weight"] == torch.float32
    assert all(d == torch.float32 for n, d in dtypes.items() if "time_embedder" in n)
    assert dtypes["patch_embedding.weight"] == dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    with torch.no_grad():
        reference = full(x, torch.tensor([0.5]), cond)
        velocity = mixed(x, torch.tensor([0.5]), cond)
    assert velocity.dtype == torch.float32
    assert 0 < ((velocity - reference).abs().mean() / reference.abs().mean()) < 0.05
