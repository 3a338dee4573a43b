"""ZeRO-3's linear layers without autograd's per-call bookkeeping in inference (part of ``memory.fetch=overlap``).

What DeepSpeed 0.19.8 does. zero.Init replaces ``torch.nn.functional.linear`` for the whole process with
``zero3_linear_wrap`` (``zero_optimization.memory_efficient_linear``, on by default), which runs every linear
through ``LinearFunctionForZeroStage3.apply``, an autograd Function; with init-time weight quantization, a
wrapper around that dequantizes the packed weight first. Under ``torch.no_grad`` the Function records nothing,
yet each ``apply`` still binds its arguments with ``inspect.signature`` and dispatches through autograd: host
time that a decode step pays for every linear of every layer, and that a step streaming small (int4) weights
cannot hide behind its copies (docs/results/opt13b_int4_step_2026-12-07.md).

What we do instead, for one engine's ``nn.Linear`` modules: without autograd, compute exactly what that chain
computes, the same dequantization of the same packed weight and then the Function's own ``forward``, so the
outputs are the chain's bit for bit; with autograd on, call the chain. It is installed only where
``torch.nn.functional.linear`` is that chain (DeepSpeed's replacement, possibly inside its dequantizing
wrapper); other engines and modules keep it.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
from deepspeed.runtime.zero.linear import LinearFunctionForZeroStage3, zero3_linear_wrap

log = logging.getLogger(__name__)


def _inference_linear(module: torch.nn.Linear, chain: Callable, input: torch.Tensor) -> torch.Tensor:
    weight, bias = module.weight, module.bias
    if torch.is_grad_enabled():
        return chain(input, weight, bias)
    if getattr(weight, "weight_quantized", False):  # as DeepSpeed's wrap_quantized_functional
        packed, scale, minimum = weight.deconcat(weight)
        weight = weight.dequantizer.dequantize(packed.view(torch.uint8), scale, minimum)
    return LinearFunctionForZeroStage3.forward(input, weight, bias)


def install(model: torch.nn.Module) -> int:
    """Give the ``nn.Linear`` modules of ``model`` (exactly that class: a subclass may compute otherwise) the
    path above; returns how many, 0 where ``torch.nn.functional.linear`` is not DeepSpeed's chain."""
    chain = torch.nn.functional.linear
    if getattr(chain, "__wrapped__", chain) is not zero3_linear_wrap:
        return 0
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    for module in linears:
        module.forward = functools.partial(_inference_linear, module, chain)
    log.info("%d linear layers run without autograd's bookkeeping in inference", len(linears))
    return len(linears)
