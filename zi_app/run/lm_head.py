"""The LM head's input, made contiguous before the head multiplies it by its weight.

generate hands the LM head the last token's hidden states of each sequence, a slice whose rows are
``prompt_len`` tokens apart. torch's matmul folds such a 3-D input into one matrix product only when its weight
requires a gradient (an ordinary parameter); ZeRO-3's linear then gets a temporary weight from init-time
quantization's dequantization, which does not, so torch instead broadcasts that weight to every sequence and
multiplies batch by batch, and DeepSpeed's CPU accelerator materialises the broadcast: batch x vocabulary x
hidden elements (1.6 GB for opt-1.3b int4 at batch 8, most of that job's host peak). A contiguous input
(batch x hidden elements, copied once) folds whatever the weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.hooks import RemovableHandle


def fold_batch(model: torch.nn.Module) -> Optional[RemovableHandle]:
    """Make ``model``'s LM head fold its input's sequences into one product; None where it has no LM head."""
    head = model.get_output_embeddings()
    return head.register_forward_pre_hook(_contiguous_input) if head is not None else None


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    hidden, *rest = args
    return (hidden.contiguous(), *rest)
