"""Build or load the causal LM so that ZeRO-3 partitions it as it is constructed.

Imports transformers and torch; DeepSpeed's config must already be registered through
:class:`HfDeepSpeedConfig` (see :func:`zero3_construction`) for construction-time partitioning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

import torch

from zi_app.config.schema import JobSpec
from zi_app.plan.facts import ModelFacts, auto_config
from zi_app.plan.workload import DTYPE_BYTES
from zi_app.run import checkpoint
from zi_app.run.progress import Progress

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INIT_STD = 0.02  # the initializer_range of OPT, LLaMA and BLOOM
GENERATION_CONFIG = "generation_config.json"  # a checkpoint's generation defaults, as from_pretrained reads them


class SeededValues:
    """Seeded random weights, parameter by parameter: biases 0, other vectors (norm scales) 1, matrices
    N(0, INIT_STD) drawn in float32, then cast. Finite, and the scheme transformers uses. Matrices are drawn
    where the parameter lives, from one generator per device seeded alike (a CPU draws a 30B model for
    minutes, a GPU in seconds): the same seed gives the same weights on the same kind of device."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generators: Dict[torch.device, torch.Generator] = {}

    @torch.no_grad()
    def fill(self, name: str, param: torch.Tensor) -> None:
        """Give ``param`` (named ``name`` in its module) its value, the next draw of its device's generator."""
        if name.endswith("bias"):
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            if param.device not in self.generators:
                self.generators[param.device] = torch.Generator(device=param.device).manual_seed(self.seed)
            generator = self.generators[param.device]
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32, device=param.device)
                        * INIT_STD)


def seed_weights(model: torch.nn.Module, seed: int) -> None:
    """A plain (unpartitioned) model's seeded random weights: what :func:`load_model` gives the same
    architecture under ZeRO-3 on the same device, parameter by parameter in the same order."""
    values = SeededValues(seed)
    for name, param in model.named_parameters():
        values.fill(name.rpartition(".")[2], param)


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


@contextlib.contextmanager
def filled_construction(fill: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """While open (inside :func:`zero3_construction`), each module's new parameters get their values from
    ``fill(name, param)`` as ZeRO-3 takes the module, before zero.Init quantizes and partitions them, and
    transformers' own init then skips the module. So init-time quantization packs real values (transformers'
    init would write into packed storage), and no full-width copy of the model is ever built or written to disk.

    Like :func:`loading_progress`, it wraps zero.Init's per-module step (``Init._post_init_method``,
    DeepSpeed 0.19.8) and undoes that on exit.
    """
    from deepspeed.runtime.zero.partition_parameters import Init, is_zero_param

    original = Init._post_init_method

    def filled(init, module):
        for name, param in module.named_parameters(recurse=False):
            if not is_zero_param(param):
                fill(name, param)
        module._is_hf_initialized = True  # transformers' initialize_weights skips flagged modules
        original(init, module)

    Init._post_init_method = filled
    try:
        yield
    finally:
        Init._post_init_method = original


@torch.no_grad()
def _zero(name: str, param: torch.Tensor) -> None:
    param.zero_()


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


def load_model(spec: JobSpec):
    """Build the model: seeded random weights (:class:`SeededValues`, drawn across the model in construction
    order) or real ones from ``model.path``, read file by file into the partitioned model
    (:mod:`zi_app.run.checkpoint`) or by transformers' ``from_pretrained`` (``model.loader=transformers``).

    Call inside :func:`zero3_construction` so that ZeRO-3 partitions it as it is constructed.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = TORCH_DTYPES[spec.model.dtype]
    if spec.model.weights == "pretrained" and spec.model.loader == "transformers":
        return AutoModelForCausalLM.from_pretrained(spec.model.path, dtype=dtype).eval()
    fill = SeededValues(spec.seed).fill if spec.model.weights == "random" else _zero
    with filled_construction(fill):
        model = AutoModelForCausalLM.from_config(auto_config(spec.model.arch), dtype=dtype).eval()
    if spec.model.weights == "pretrained":
        checkpoint.load_file_by_file(model, spec.model.path)
        if (Path(spec.model.path).expanduser() / GENERATION_CONFIG).exists():
            model.generation_config = GenerationConfig.from_pretrained(spec.model.path)
    return model
