"""The DeepSpeed config generator: every group option's settings, and equality with the reference script.

The reference is DeepSpeedExamples' inference/huggingface/zero_inference/run_model.py; its ds_config is
written out below from its source (not imported), flag by flag. Configs come from real Hydra composition
of the packaged groups, validated, then passed to :func:`zi_app.build_ds_config` (pure, no DeepSpeed).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List

import pytest

from zi_app import build_ds_config, validate

pytestmark = pytest.mark.quick  # the quick tier (pyproject.toml's markers)

GiB = 2**30
# What run_model.py reads from each real checkpoint: hidden size h and config.torch_dtype (float16 when
# unset). opt-175b is opt-66b's config with h = 12288. The tiny presets are ours; a float32
# save_pretrained gives float32.
REFERENCE_MODELS = {
    "opt-1.3b": (2048, "float16"),
    "opt-6.7b": (4096, "float16"),
    "opt-13b": (5120, "float16"),
    "opt-30b": (7168, "float16"),
    "opt-66b": (9216, "float16"),
    "opt-175b": (12288, "float16"),
    "bloom-176b": (14336, "bfloat16"),
    "llama-2-70b": (8192, "float16"),
    "tiny-opt": (128, "float32"),
    "tiny-llama": (128, "float32"),
}
REFERENCE_AIO = {"block_size": 16 * 2**20, "queue_depth": 64, "intra_op_parallelism": 8, "single_submit": False,
                 "overlap_events": True, "use_gds": False}
OFFLOADS = ("gpu", "cpu", "disk")  # no flag, --cpu-offload, --disk-offload --offload-dir


def reference_ds_config(h: int, dtype: str, batch: int, pin: int, offload: str, offload_dir: str,
                        bloom: bool, quant_bits: int, quant_group_size: int) -> Dict[str, Any]:
    """The ds_config run_model.py builds for these flags (--pin-memory is 0/1, --quant_bits 16 = off).

    run_model.py itself emits the weight_quantization block only for --quant_bits 4 and silently drops
    8; DeepSpeed accepts both and so do we, so 8 is expected to give the same block with num_bits 8.
    Its aio block uses the pre-0.16.4 name thread_count, which DeepSpeed 0.19 ignores: the expected
    dict carries the current name, intra_op_parallelism.
    """
    ds: Dict[str, Any] = {
        "fp16": {"enabled": dtype == "float16"},
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_optimization": {
            "stage": 3,
            "stage3_prefetch_bucket_size": 2 * h * h,
            "stage3_param_persistence_threshold": h,
            "stage3_max_live_parameters": 2 * h * h,
        },
        "steps_per_print": 2000,
        "train_batch_size": batch,
        "wall_clock_breakdown": False,
    }
    if quant_bits in (4, 8):
        ds["weight_quantization"] = {"quantized_initialization": {
            "num_bits": quant_bits, "group_size": quant_group_size, "group_dim": 1, "symmetric": False}}
    if offload == "cpu":
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": bool(pin)}
    if offload == "disk":
        ds["zero_optimization"]["offload_param"] = {
            "device": "nvme", "pin_memory": bool(pin), "nvme_path": offload_dir, "buffer_count": 5,
            "buffer_size": (9 if bloom else 2) * GiB}
        ds["aio"] = dict(REFERENCE_AIO)
    return ds


def app_overrides(preset: str, batch: int, pin: int, offload: str, offload_dir: str,
                  quant_bits: int, quant_group_size: int) -> List[str]:
    """The Hydra overrides that express the same flags. ``offload.buffer_size`` is set explicitly: by
    default we derive it from the model's largest parameter instead of the reference's fixed 2 (9) GiB
    (see test_nvme_buffer_size_holds_the_largest_parameter)."""
    overrides = [f"model={preset}", "memory=reference", f"batch={batch}", f"pin={'true' if pin else 'false'}",
                 {"gpu": "offload=none", "cpu": "offload=cpu", "disk": "offload=nvme"}[offload]]
    if offload == "disk":
        overrides += [f"offload.nvme_path={offload_dir}",
                      f"offload.buffer_size={(9 if preset.startswith('bloom') else 2) * GiB}"]
    if quant_bits != 16:
        overrides += [f"quant=int{quant_bits}", f"quant.group_size={quant_group_size}"]
    return overrides


# Every combination of the reference's flags on its default model; on every other preset each offload
# once, with and without quantization.
FLAG_COMBINATIONS = [("opt-1.3b", *flags) for flags in itertools.product(
    (1, 16), (0, 1), OFFLOADS, ((16, 64), (4, 64), (8, 64), (4, 128)))]
FLAG_COMBINATIONS += [(preset, 8, 1, offload, quant) for preset in REFERENCE_MODELS if preset != "opt-1.3b"
                      for offload, quant in (("gpu", (16, 64)), ("cpu", (4, 64)), ("disk", (8, 64)))]


@pytest.mark.parametrize("preset", list(REFERENCE_MODELS))
def test_equals_reference_for_its_flag_combinations(preset, compose, tmp_path):
    """For every flag combination, the generated config equals the reference's, pin_memory explicit."""
    h, dtype = REFERENCE_MODELS[preset]
    combinations = [c for c in FLAG_COMBINATIONS if c[0] == preset]
    for _, batch, pin, offload, (bits, group) in combinations:
        cfg = validate(compose(*app_overrides(preset, batch, pin, offload, str(tmp_path), bits, group)))
        expected = reference_ds_config(h, dtype, batch, pin, offload, str(tmp_path), preset.startswith("bloom"),
                                       bits, group)
        assert build_ds_config(cfg) == expected, (batch, pin, offload, bits, group)


def largest_parameter(arch: Dict[str, Any]) -> int:
    """Elements in the architecture's largest parameter, counted on the meta device (allocates nothing)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = dict(arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
    return max(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", list(REFERENCE_MODELS))
def test_nvme_buffer_size_holds_the_largest_parameter(preset, compose, model_arch, tmp_path):
    """Our one documented difference: with offload.buffer_size unset, each NVMe staging buffer is sized
    from the model (in elements) and must hold its largest parameter, or DeepSpeed cannot swap it in."""
    cfg = validate(compose(f"model={preset}", "memory=reference", "offload=nvme", f"offload.nvme_path={tmp_path}"))
    offload = build_ds_config(cfg)["zero_optimization"]["offload_param"]
    assert offload["buffer_size"] >= largest_parameter(model_arch(preset))
    assert offload["buffer_count"] == 5


def zero(ds: Dict[str, Any]) -> Dict[str, Any]:
    return ds["zero_optimization"]


def test_offload_group(compose, tmp_path):
    """none: no offload_param; cpu and nvme: the device with pin_memory always present and equal to ``pin``
    (DeepSpeed >= 0.19.5 would default it to true); nvme also sets the aio block with 0.16.4+ key names."""
    assert "offload_param" not in zero(build_ds_config(compose("offload=none")))
    for pin in (True, False):
        ds = build_ds_config(compose("offload=cpu", f"pin={pin}"))
        assert zero(ds)["offload_param"] == {"device": "cpu", "pin_memory": pin}
        assert "aio" not in ds
        ds = build_ds_config(validate(compose("offload=nvme", f"offload.nvme_path={tmp_path}", f"pin={pin}")))
        offload = zero(ds)["offload_param"]
        assert (offload["device"], offload["pin_memory"], offload["nvme_path"]) == ("nvme", pin, str(tmp_path))
        assert ds["aio"] == REFERENCE_AIO


@pytest.mark.parametrize("option,bits", [("int4", 4), ("int8", 8)])
def test_quant_init_options(option, bits, compose):
    """int4/int8 quantize inside zero.Init: a quantized_initialization block, asymmetric, groups of 64 on dim 1."""
    ds = build_ds_config(compose("model.dtype=bfloat16", f"quant={option}"))
    assert ds["weight_quantization"] == {"quantized_initialization": {
        "num_bits": bits, "group_size": 64, "group_dim": 1, "symmetric": False}}


@pytest.mark.parametrize("option,bits", [("int4-post", 4), ("int8-post", 8)])
def test_quant_post_options(option, bits, compose):
    """The -post options quantize after loading: one post_init_quant entry per module-name substring."""
    cfg = validate(compose("model=opt-1.3b", f"quant={option}"))
    spec = {"num_bits": bits, "group_size": 64, "group_dim": 1, "symmetric": False}
    post = build_ds_config(cfg)["weight_quantization"]
    assert list(post) == ["post_init_quant"]
    assert post["post_init_quant"] == {name: spec for name in cfg.quant.modules}
    assert {"fc1", "q_proj", "down_proj"} <= set(cfg.quant.modules)


def test_quant_none_adds_nothing(compose):
    assert "weight_quantization" not in build_ds_config(compose("quant=none"))


@pytest.mark.parametrize("dtype,fp16,bf16", [("float16", True, False), ("bfloat16", False, True),
                                             ("float32", False, False)])
def test_model_dtype_sets_deepspeed_precision(dtype, fp16, bf16, compose):
    ds = build_ds_config(compose(f"model.dtype={dtype}"))
    assert (ds["fp16"]["enabled"], ds["bf16"]["enabled"]) == (fp16, bf16)


def test_kvcache_group_leaves_the_deepspeed_config_alone(compose):
    """The KV cache is transformers' business (generate's cache_implementation), not DeepSpeed's."""
    assert build_ds_config(compose("kvcache=cpu")) == build_ds_config(compose("kvcache=gpu"))


def test_memory_reference_and_its_persistence_settings(compose):
    """reference = run_model.py's residency; persistence hh keeps h x h matrices resident (h*h+1), an
    integer is taken as is; max_reuse_distance passes through."""
    h = 2048
    ds = zero(build_ds_config(compose("model=opt-1.3b", "memory=reference")))
    assert (ds["stage3_prefetch_bucket_size"], ds["stage3_max_live_parameters"],
            ds["stage3_param_persistence_threshold"]) == (2 * h * h, 2 * h * h, h)
    assert "leaf_module" not in ds and "stage3_max_reuse_distance" not in ds
    hh = zero(build_ds_config(compose("model=opt-1.3b", "memory=reference", "memory.persistence=hh")))
    assert hh["stage3_param_persistence_threshold"] == h * h + 1
    fixed = zero(build_ds_config(compose("model=opt-1.3b", "memory=reference", "memory.persistence=12345",
                                         "memory.max_reuse_distance=777")))
    assert (fixed["stage3_param_persistence_threshold"], fixed["stage3_max_reuse_distance"]) == (12345, 777)


def test_memory_tuned(compose):
    """tuned: 32 h*h in flight, the decoder layer as ZeRO-3 leaf module, a reuse distance that spans the
    whole model (a tied embedding/LM head is fetched once per step), thresholds at least the reference's."""
    h = 2048
    ds = zero(build_ds_config(compose("model=opt-1.3b", "memory=tuned")))
    assert (ds["stage3_prefetch_bucket_size"], ds["stage3_max_live_parameters"]) == (32 * h * h, 32 * h * h)
    assert ds["leaf_module"] == {"classes": ["transformers.models.opt.modeling_opt.OPTDecoderLayer"]}
    opt_1_3b_parameters = 1_315_758_080
    assert ds["stage3_max_reuse_distance"] >= opt_1_3b_parameters
    assert ds["stage3_param_persistence_threshold"] >= h


def test_batch_is_the_train_batch_size(compose):
    assert build_ds_config(compose("batch=24"))["train_batch_size"] == 24


def test_the_train_batch_size_is_every_ranks_batch(compose):
    """DeepSpeed refuses a train_batch_size that is not the micro batch times the world size."""
    assert build_ds_config(compose("batch=3", "devices=4"))["train_batch_size"] == 12
