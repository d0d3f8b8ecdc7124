"""Loading without a full copy per rank (model/loading.py): meta-device and ZeRO-3 builds filled from
safetensors one tensor at a time, the same tensors as a full load, bounded peak memory (measured in real
processes), Wan I2V / Animate patch embeddings starting ``ref_embedding``, and prompts of any length."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from model.denoiser import AnimationDenoiser
from model.loading import SafetensorsSource, build_on_meta, load_dtype
from model.presets import ModelConfig, build_denoiser, preset_kwargs

# ~298 MB of fp32 parameters: the tiny preset's class with dim 512, ffn 2048, 12 blocks (largest tensor 6 MB).
BIG = {"num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048, "num_layers": 12}
DS_ZERO3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _woken_tiny(**switches) -> AnimationDenoiser:
    """A tiny denoiser whose zero-init paths carry seeded values, so every tensor is distinguishable."""
    from conftest import wake_zero_inits

    torch.manual_seed(0)
    model = build_denoiser(ModelConfig(**switches))
    wake_zero_inits(model)
    return model


def _old_full_load(folder: Path) -> dict[str, torch.Tensor]:
    return _old_full_load_model(folder).state_dict()


def _old_full_load_model(folder: Path) -> AnimationDenoiser:
    """The previous loader: the model built in fp32 on CPU, the whole folder read into a dict, load_state_dict."""
    from safetensors.torch import load_file

    config = {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}
    model = AnimationDenoiser(**config)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
              else ["diffusion_pytorch_model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("shard_size", [None, "300KB"])
def test_meta_load_equals_the_full_load_bitwise(tmp_path, shard_size):
    """Single file and sharded (index json): every tensor bitwise equal to the old full load; a new module
    (aux head) initialises for real; nothing stays on the meta device."""
    model = _woken_tiny()
    model.save_pretrained(str(tmp_path / "m"), **({"max_shard_size": shard_size} if shard_size else {}))
    sharded = (tmp_path / "m" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert sharded == (shard_size is not None)
    expected = _old_full_load(tmp_path / "m")
    loaded = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "m"))).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) and loaded[k].dtype == torch.float32 for k in expected)
    student = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "m"), aux_head=True))
    assert torch.equal(student.blocks[1].ffn.net[2].weight, expected["blocks.1.ffn.net.2.weight"])
    assert 0.01 < student.aux_proj.weight.std() < 0.2 and student.aux_proj.weight.device.type == "cpu"


def test_init_rules_match_init():
    """Every tensor initialised by the loaders (meta build, nothing in the checkpoint) looks like __init__'s:
    the same zeros (zero-init paths stay zero), the same constants, the same spread."""
    kwargs = {**preset_kwargs(ModelConfig(aux_head=True, ref_as_frame=True))}
    torch.manual_seed(0)
    fresh = dict(AnimationDenoiser(**kwargs).named_parameters())
    built, report = build_on_meta(kwargs, SafetensorsSource({}))
    assert sorted(report.initialised) == sorted(fresh) and not report.loaded
    for name, param in built.named_parameters():
        param, reference = param.detach(), fresh[name].detach()
        assert (param == 0).all() == (reference == 0).all(), name
        if (reference == reference.flatten()[0]).all():
            assert torch.equal(param, reference), name  # constants: norms' ones, zero inits
        elif reference.numel() >= 100:
            assert param.std() == pytest.approx(float(reference.std()), rel=0.3), name
    assert built.ref_embedding.weight.abs().max() == 0 and built.face_attn[0].to_out.weight.abs().max() == 0


def test_bf16_load_keeps_wans_fp32_modules(tmp_path):
    """Loaded straight into bf16: the fp32 checkpoint's values rounded once, Wan's fp32 modules kept in fp32,
    the same dtypes as `model.precision.cast_model` gives."""
    from model.precision import cast_model

    model = _woken_tiny()
    model.save_pretrained(str(tmp_path / "m"))
    bf16 = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "m")), dtype=torch.bfloat16)
    cast = cast_model(_woken_tiny(), torch.bfloat16)
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    assert dtypes == {n: p.dtype for n, p in cast.named_parameters()}
    assert dtypes["blocks.0.scale_shift_table"] == torch.float32 and dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    for name, param in model.named_parameters():
        assert torch.equal(dict(bf16.named_parameters())[name], param.detach().to(load_dtype(model, name, torch.bfloat16)))


def test_shape_mismatch_is_loud(tmp_path):
    _woken_tiny().save_pretrained(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="checkpoint shape"):
        from model.loading import plan_fills

        plan_fills({"blocks.0.attn1.to_q.weight": (64, 128)}, SafetensorsSource.folder(tmp_path / "m"), 16)


def test_loaded_parameters_do_not_keep_the_files_mapped(tmp_path):
    """Loaded tensors are copies, not views of the mmapped files: once the folder is deleted (as the
    temporary copy of a remote folder is) no mapping of it remains and the model still runs."""
    import shutil

    _woken_tiny().save_pretrained(str(tmp_path / "m"), max_shard_size="300KB")
    model = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "m")))
    shutil.rmtree(tmp_path / "m")
    gc.collect()
    assert str(tmp_path / "m") not in Path("/proc/self/maps").read_text()
    assert torch.isfinite(sum(p.sum() for p in model.parameters()))


# ---------------------------------------------------------------------- Wan I2V / Animate reference channels
def _tiny_wan_animate(seed: int = 0):
    """A real diffusers `WanAnimateTransformer3DModel` at the tiny preset's dims (36-channel patch embedding)."""
    from diffusers import WanAnimateTransformer3DModel

    torch.manual_seed(seed)
    return WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=32, freq_dim=64, ffn_dim=512, num_layers=4, image_dim=32, rope_max_seq_len=256,
        motion_encoder_size=16, motion_encoder_channel_sizes={"4": 32, "8": 32, "16": 32}, motion_style_dim=32,
        motion_dim=8, motion_encoder_dim=32, face_encoder_hidden_dim=32, face_encoder_num_heads=2,
        inject_face_latents_blocks=2).eval()


def test_wan_animate_image_channels_start_ref_embedding(tmp_path):
    """[16 noisy | 4 mask | 16 image latent]: the noisy channels load into patch_embedding, the image channels
    into ref_embedding (derived), so our additive form equals Wan's conv on the concat (mask zero); its own
    encoders are unused; a meta and a ZeRO-free real load agree."""
    from model.denoiser import load_transformer_weights

    wan = _tiny_wan_animate()
    wan.save_pretrained(str(tmp_path / "animate"))
    model = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "animate"))).eval()
    report = load_transformer_weights(build_denoiser(ModelConfig()), tmp_path / "animate")
    assert report.sliced == ["patch_embedding.weight"] and "ref_embedding.weight" in report.derived
    assert "ref_embedding.weight" not in report.initialised and "ref_embedding.bias" in report.initialised
    assert any(n.startswith("motion_encoder.") for n in report.unused) and "pose_patch_embedding.weight" in report.unused
    gen = torch.Generator().manual_seed(0)
    x, ref = torch.randn(1, 16, 3, 8, 8, generator=gen), torch.randn(1, 16, 1, 8, 8, generator=gen)
    with torch.no_grad():
        theirs = wan.patch_embedding(torch.cat([x, torch.zeros(1, 4, 3, 8, 8), ref.expand(-1, -1, 3, -1, -1)], 1))
        ours = model.patch_embedding(x) + model.ref_embedding(ref)
    assert torch.allclose(ours, theirs, atol=1e-5) and model.ref_embedding.weight.abs().max() > 0


def test_other_widths_slice_without_deriving(tmp_path):
    """A patch embedding wider than 16 but not [C | 4 | C] (here 24 channels): sliced, ref_embedding stays zero."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    kwargs = {k: v for k, v in preset_kwargs(ModelConfig()).items()
              if k in ("patch_size", "num_attention_heads", "attention_head_dim", "out_channels", "text_dim",
                       "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len")}
    WanTransformer3DModel(**kwargs, in_channels=24).save_pretrained(str(tmp_path / "w"))
    from model.denoiser import load_transformer_weights

    model = build_denoiser(ModelConfig())
    report = load_transformer_weights(model, tmp_path / "w")
    assert report.sliced == ["patch_embedding.weight"] and not report.derived
    assert model.ref_embedding.weight.abs().max() == 0


# ---------------------------------------------------------------------- prompts of any length
def _prompt_file(path: Path, length: int, dim: int = 32) -> torch.Tensor:
    from safetensors.torch import save_file

    embeds = torch.randn(length, dim, generator=torch.Generator().manual_seed(length))
    save_file({"prompt_embeds": embeds}, str(path))
    return embeds


def test_a_512_token_prompt_reloads(tmp_path):
    """set_context_tokens records the length: the folder reloads through build_denoiser and from_pretrained;
    a folder whose config still says 4 (saved before) loads at the weights' 512 tokens."""
    model = _woken_tiny()
    embeds = _prompt_file(tmp_path / "p.safetensors", 512)
    model.set_context_tokens(embeds)
    model.save_pretrained(str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_context_tokens"] == 512
    for loaded in (build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "m"))),
                   AnimationDenoiser.from_pretrained(str(tmp_path / "m"))):
        assert torch.equal(loaded.context_tokens, embeds)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "num_context_tokens": 4}))
    stale = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "m")))
    assert torch.equal(stale.context_tokens, embeds) and stale.config.num_context_tokens == 512


def test_prompt_embedding_starts_the_prompt(tmp_path):
    """Random init and a Wan folder start from the file's tokens (any length); a folder of ours keeps its
    own (trained) tokens; a wrong width or an override of the length is loud."""
    from diffusers import WanTransformer3DModel

    embeds = _prompt_file(tmp_path / "p.safetensors", 77)
    prompt = str(tmp_path / "p.safetensors")
    torch.manual_seed(0)
    fresh = build_denoiser(ModelConfig(prompt_embedding=prompt))
    assert torch.equal(fresh.context_tokens, embeds) and fresh.config.num_context_tokens == 77
    kwargs = {k: v for k, v in preset_kwargs(ModelConfig()).items()
              if k in inspect_params(WanTransformer3DModel)}
    WanTransformer3DModel(**kwargs).save_pretrained(str(tmp_path / "wan"))
    from_wan = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "wan"), prompt_embedding=prompt))
    assert torch.equal(from_wan.context_tokens, embeds)
    ours = _woken_tiny()
    ours.save_pretrained(str(tmp_path / "ours"))
    kept = build_denoiser(ModelConfig(pretrained_path=str(tmp_path / "ours"), prompt_embedding=prompt))
    assert torch.equal(kept.context_tokens, ours.context_tokens) and kept.context_tokens.shape == (4, 32)
    _prompt_file(tmp_path / "wide.safetensors", 8, dim=48)
    with pytest.raises(ValueError, match="text_dim=32"):
        build_denoiser(ModelConfig(prompt_embedding=str(tmp_path / "wide.safetensors")))
    with pytest.raises(ValueError, match="num_context_tokens"):
        ModelConfig(prompt_embedding=prompt, overrides={"num_context_tokens": 8})


def inspect_params(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters) - {"self"}


# ---------------------------------------------------------------------- peak memory, real processes
def _status_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _load_worker(rank: int, world: int, mode: str, folder: str, out: str) -> None:
    """One process: load ``folder`` the ``mode`` way and write {peak RSS above the RSS before the load, MB;
    whether every parameter equals the file's tensor (zero3 only: the other modes are checked in-process
    above)} to ``out/rank{rank}.json``.

    glibc's mmap threshold is fixed at 256 KiB first, for every mode alike: by default it rises to the
    largest block freed so far, after which freed multi-MB blocks stay resident in the heap, and peak RSS
    then measures the allocator's history (+50-120 MB here) rather than what the load keeps alive."""
    import ctypes

    import torch.distributed as dist

    ctypes.CDLL("libc.so.6").mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's zero.Init picks its device by it (Ray Train sets it)
    torch.set_num_threads(1)
    if world > 1:
        import deepspeed

        dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank, world_size=world)
        deepspeed.init_distributed(dist_backend="gloo")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _status_mb("VmRSS")
    model = _load(mode, Path(folder))
    peak = _status_mb("VmHWM") - before
    equal = _equals_file(model, Path(folder)) if mode == "zero3" else None
    Path(out, f"rank{rank}.json").write_text(json.dumps({"peak_mb": peak, "rss_before_mb": before, "equal": equal}))


def _load(mode: str, folder: Path) -> torch.nn.Module:
    """"meta": build_denoiser; "zero3": build_denoiser inside zero3_build; "full": the old full load (what
    every rank did before deepspeed.initialize partitioned the model under ZeRO-3)."""
    from model.loading import zero3_build

    if mode == "meta":
        return build_denoiser(ModelConfig(pretrained_path=str(folder)))
    if mode == "zero3":
        with zero3_build(DS_ZERO3) as built:
            model = build_denoiser(ModelConfig(pretrained_path=str(folder)))
        built.check()
        return model
    return _old_full_load_model(folder)


def _equals_file(model: torch.nn.Module, folder: Path) -> bool:
    """Every parameter (gathered when partitioned: a collective) bitwise equal to the file's tensor."""
    import deepspeed

    source = SafetensorsSource.folder(folder)
    equal = True
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            equal &= torch.equal(param.data, source.read(name))
    return bool(equal)


def _run_groups(groups: dict[str, tuple[str, int]], folder: Path, out: Path) -> dict[str, list[dict]]:
    """Start every group's processes at once (peaks are per process), wait, read their results."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = []
    for label, (mode, world) in groups.items():
        (out / label).mkdir(parents=True)
        procs += [ctx.Process(target=_load_worker, args=(rank, world, mode, str(folder), str(out / label)))
                  for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
    return {label: [json.loads((out / label / f"rank{r}.json").read_text()) for r in range(world)]
            for label, (_, world) in groups.items()}


def test_peak_memory_meta_and_zero3_vs_full_copy(tmp_path):
    """~298 MB model, real processes started together (peaks are per process). The old full load (model +
    source dict) peaks near 2 models; the meta load near one; each of two ZeRO-3 workers (gloo), built under
    zero.Init and filled tensor by tensor, near half a model, and its partitions hold the file's tensors."""
    torch.manual_seed(0)
    big = build_denoiser(ModelConfig(overrides=BIG))
    model_mb = sum(p.numel() for p in big.parameters()) * 4 / 2**20
    big.save_pretrained(str(tmp_path / "big"))
    del big
    groups = {"full": ("full", 1), "meta": ("meta", 1), "zero3": ("zero3", 2)}
    results = _run_groups(groups, tmp_path / "big", tmp_path / "runs")
    full, meta = results["full"][0]["peak_mb"], results["meta"][0]["peak_mb"]
    zero3 = max(r["peak_mb"] for r in results["zero3"])
    assert all(r["equal"] for r in results["zero3"]), results
    assert 280 < model_mb < 320 and full > 1.8 * model_mb, (model_mb, full)  # the baseline: model + source
    assert meta < 1.15 * model_mb, (meta, model_mb)
    assert zero3 < 0.75 * model_mb and zero3 < 0.4 * full, (zero3, model_mb, full)


def test_prompt_embedding_from_s3_loads_through_the_storage(tmp_path, s3_bucket, s3_server):
    """`artifacts.models.load_denoiser` fetches an ``s3://`` prompt file (model/ itself reads local files only)."""
    from artifacts.models import load_denoiser
    from core.storage import Storage, StorageConfig

    embeds = _prompt_file(tmp_path / "p.safetensors", 12)
    storage = Storage(StorageConfig(endpoint_url=s3_server.endpoint_url))
    storage.upload_file(str(tmp_path / "p.safetensors"), f"{s3_bucket}/prompts/p.safetensors")
    model = load_denoiser(ModelConfig(prompt_embedding=f"{s3_bucket}/prompts/p.safetensors"), storage)
    assert torch.equal(model.context_tokens, embeds) and model.config.num_context_tokens == 12
    with pytest.raises(ValueError, match="remote"):
        build_denoiser(ModelConfig(prompt_embedding=f"{s3_bucket}/prompts/p.safetensors"))
