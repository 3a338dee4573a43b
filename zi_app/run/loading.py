"""Build or load the causal LM so that ZeRO-3 partitions it as it is constructed.

Imports transformers and torch; DeepSpeed's config must already be registered through
:class:`HfDeepSpeedConfig` (see :func:`zero3_construction`) for construction-time partitioning.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional

import torch

from zi_app.config.schema import JobSpec
from zi_app.plan.facts import ModelFacts, auto_config
from zi_app.plan.workload import DTYPE_BYTES
from zi_app.run.progress import Progress

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INIT_STD = 0.02  # the initializer_range of OPT, LLaMA and BLOOM


def _random_checkpoint_dir(arch: Mapping[str, Any], dtype: str, seed: int, cache_dir: str) -> Path:
    # format 2: checkpoints written before it could hold empty or untied tensors; never reuse those.
    key = json.dumps({"arch": arch, "dtype": dtype, "seed": seed, "format": 2}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"random-{arch['model_type']}-{digest}"


@torch.no_grad()
def materialize_random_checkpoint(arch: Mapping[str, Any], dtype: str, seed: int, cache_dir: str) -> Path:
    """Write (once, cached) a checkpoint of seeded random weights and return its directory.

    Needed where weights must exist *before* ZeRO-3 sees them: init-time quantization quantizes each
    weight inside ``zero.Init``, so a random init that runs afterwards would write into packed storage.
    Matrices ~ N(0, 0.02), norm scales 1, biases 0: finite, and the same scheme transformers uses.
    """
    from transformers import AutoModelForCausalLM

    target = _random_checkpoint_dir(arch, dtype, seed, cache_dir)
    if (target / "config.json").is_file():
        return target
    log.info("writing random %s weights to %s (once)", arch["model_type"], target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(auto_config(arch), dtype=TORCH_DTYPES[dtype])
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied weights (embedding / LM head) separate storage again
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * INIT_STD)
    # Jobs running at once (one per GPU, or parallel tests) may write the same checkpoint: each writes its
    # own folder, the first rename wins and the others drop theirs.
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(tmp, max_shard_size="2GB")
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp)
    return target


@contextlib.contextmanager
def zero3_construction(ds_config: Dict[str, Any]) -> Iterator[None]:
    """While open, every model transformers builds is partitioned by ZeRO-3 as it is constructed."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def weights_path(spec: JobSpec) -> Optional[str]:
    """The checkpoint :func:`load_model` reads: ``model.path``, the seeded random checkpoint that
    init-time quantization needs (written now if not cached), or None for a random init.

    Call it before :func:`zero3_construction`: a model built while ZeRO-3 is armed is partitioned, and
    ``save_pretrained`` of it writes empty tensors.
    """
    if spec.model.weights == "random" and spec.quant.mode == "init":
        return str(materialize_random_checkpoint(spec.model.arch, spec.model.dtype, spec.seed, spec.cache_dir))
    return spec.model.path


@contextlib.contextmanager
def loading_progress(spec: JobSpec, facts: ModelFacts) -> Iterator[None]:
    """Around :func:`load_model` inside :func:`zero3_construction`: zero.Init's partitioning of each module
    as it is built, then the copy of each module's checkpoint weights, show as progress in bytes done/total
    (:mod:`zi_app.run.progress`). ``facts`` are read before ZeRO-3 is armed: building the meta model under
    zero.Init would run transformers' ZeRO-3 weight init on meta tensors.

    The one place that changes DeepSpeed for it: zero.Init's per-module step (``Init._post_init_method``,
    DeepSpeed 0.19.8) is wrapped to count the module's new parameters and to give the module a
    load-state-dict pre-hook, which transformers' ZeRO-3 loader runs for each module with weights in the
    checkpoint (once it gathered them); both are undone on exit.
    """
    from deepspeed.runtime.zero.partition_parameters import Init, is_zero_param

    element_bytes = DTYPE_BYTES[spec.model.dtype]
    original, hooks, loading = Init._post_init_method, [], False
    work = Progress("partitioning under ZeRO-3", facts.constructed_numel * element_bytes, in_bytes=True)

    def count_load(numels, module, state_dict, prefix, *args):
        nonlocal work, loading
        if not loading:  # the first module to load: construction is over
            loading = True
            work.close()
            work = Progress("loading weights", sum(facts.param_numels) * element_bytes, in_bytes=True)
        # Sizes as built, not the checkpoint tensors': init-time quantization packs them before this hook.
        work.update(sum(numel for name, numel in numels.items() if prefix + name in state_dict) * element_bytes)

    def partition_counted(init, module):
        numels = {name: p.numel() for name, p in module.named_parameters(recurse=False) if not is_zero_param(p)}
        original(init, module)
        work.update(sum(numels.values()) * element_bytes)
        hooks.append(module.register_load_state_dict_pre_hook(functools.partial(count_load, numels)))

    Init._post_init_method = partition_counted
    finished = False
    try:
        yield
        finished = True
    finally:
        Init._post_init_method = original
        for hook in hooks:
            hook.remove()
        work.close(finished)


def load_model(spec: JobSpec, path: Optional[str]):
    """Build the model: real weights via ``from_pretrained`` of ``path`` (from :func:`weights_path`),
    or a random init when it is None.

    Call inside :func:`zero3_construction` so that ZeRO-3 partitions it as it is constructed.
    """
    from transformers import AutoModelForCausalLM

    dtype = TORCH_DTYPES[spec.model.dtype]
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(auto_config(spec.model.arch), dtype=dtype)
    return model.eval()
