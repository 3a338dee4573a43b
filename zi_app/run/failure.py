"""What a failed job's or rank's message says about its cause: an allocation that ran out of memory (the
GPU's caching allocator, or the host's). Plain strings: the recording stage classifies failures with it too.
"""

from __future__ import annotations

OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def out_of_memory(message: str) -> bool:
    """Whether an error's message says a GPU or host allocation failed."""
    return any(m in message.lower() for m in OOM_MESSAGES)
