"""Real weights read into the ZeRO-3 model one checkpoint file at a time (``model.loader=files``).

transformers' ZeRO-3 loader (5.17-5.23) merges every file of a sharded checkpoint into one state dict before it
copies anything, so every file stays mapped until the last module is loaded and the pages it touched stay in
the job's RSS. Here each file is opened, its tensors are copied into their (gathered, then re-partitioned and
re-quantized) parameters, and it is closed before the next is opened: the host holds the partitioned model and
one file. Only rank 0 reads tensor values; every rank walks the same keys so that the gathers pair up.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterator, List, Protocol

import torch

from zi_app.config.paths import weight_files


class WeightFile(Protocol):
    def keys(self) -> List[str]: ...
    def get_tensor(self, key: str) -> torch.Tensor: ...


class _TorchFile:
    """A ``torch.save``d state dict read lazily (memory-mapped), with safetensors' reading interface."""

    def __init__(self, path: Path) -> None:
        self.state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def keys(self) -> List[str]:
        return list(self.state)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.state[key]


@contextlib.contextmanager
def open_weights(path: Path) -> Iterator[WeightFile]:
    """One weight file, mapped while open and released on exit."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
        return
    weights = _TorchFile(path)
    try:
        yield weights
    finally:
        del weights.state


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@torch.no_grad()
def _copy_in(module: torch.nn.Module, name: str, target: torch.Tensor, weights: WeightFile, key: str,
             reads: bool) -> None:
    """Copy checkpoint tensor ``key`` into ``module``'s ``target``, named ``name`` in the model, through the
    module's own ``_load_from_state_dict``: DeepSpeed's init-time quantization wraps it for its layers to
    quantize the value into the packed parameter. A ZeRO-3 parameter is gathered for it, and partitioned again on
    exit with rank 0's values; a buffer (never partitioned) is copied on every rank."""
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, is_zero_param

    zero, errors = is_zero_param(target), []
    prefix = name[:name.rfind(".") + 1]  # the module's, as _load_from_state_dict expects it: "" at the top
    # DeepSpeed's wrapper (0.19.8, inference/quantization/utils.py) quantizes the value on a layer's first load
    # only, flagging the weight so that nested wrappers of one call do not quantize twice; we load one tensor per
    # call (a bias may come first, or from another file), so each call starts unflagged.
    weight = getattr(module, "weight", None)
    if hasattr(weight, "state_dict_quantized"):
        del weight.state_dict_quantized
    with GatheredParameters([target], modifier_rank=0) if zero else contextlib.nullcontext():
        if reads or not zero:
            module._load_from_state_dict({name: weights.get_tensor(key)}, prefix, {}, False, [], [], errors)
    if errors:
        raise ValueError(f"checkpoint tensor {key}: {errors[0]}")


def load_file_by_file(model: torch.nn.Module, directory: str) -> None:
    """Copy the weights of the checkpoint in ``directory`` into ``model`` (built under ZeRO-3), file by file.

    Checkpoint keys match the model's names, or the names under its ``base_model_prefix`` (checkpoints saved from
    the base model, as OPT's on the hub). Raises ``ValueError`` naming the model's weights no file held and the
    checkpoint's keys that match nothing, so a checkpoint of another architecture never loads silently.
    """
    # remove_duplicate=False: a tied LM head is found under either name, as checkpoints store one or both
    targets: Dict[str, torch.Tensor] = {**dict(model.named_parameters(remove_duplicate=False)),
                                        **dict(model.named_buffers())}
    modules = dict(model.named_modules(remove_duplicate=False))
    prefix = getattr(model, "base_model_prefix", "")
    files = weight_files(directory)
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {directory}")
    reads, loaded, unmatched = _rank() == 0, set(), []
    for path in files:
        with open_weights(path) as weights:
            for key in weights.keys():
                name = key if key in targets else f"{prefix}.{key}"
                if name not in targets:
                    unmatched.append(key)
                elif id(targets[name]) not in loaded:  # a tied weight's value comes once, under either name
                    _copy_in(modules[name.rpartition(".")[0]], name, targets[name], weights, key, reads)
                    loaded.add(id(targets[name]))
    missing = [name for name, param in model.named_parameters() if id(param) not in loaded]
    if missing:
        raise ValueError(f"checkpoint {directory} holds no weights for {len(missing)} of the model's parameters "
                         f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); its keys that match "
                         f"no parameter: {', '.join(unmatched[:5]) or 'none'} (model.loader=transformers applies "
                         f"transformers' key conversions)")
