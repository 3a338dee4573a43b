"""Build DeepSpeed's JIT-compiled ops now, into this environment's own folder (:func:`engine.extensions_dir`),
instead of in the first job that needs each: ``shm_comm`` (every job on DeepSpeed's CPU accelerator),
``pin_memory`` (``memory.pin_backend=native``) and ``async_io`` (``offload=nvme``; only where libaio is
installed). install.sh runs it; an op already built is only loaded. Usage: ``python -m zi_app.run.build_ops``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import torch

from zi_app.plan import preflight
from zi_app.run import engine

log = logging.getLogger("zi_app.build_ops")


def _build(name: str, builder_name: str) -> None:
    from deepspeed.ops import op_builder

    started = time.monotonic()
    getattr(op_builder, builder_name)().load(verbose=False)
    log.info("%s: ready (%.0f s)", name, time.monotonic() - started)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="build_ops: %(message)s")
    engine.use_own_extensions_dir()
    log.info("DeepSpeed's ops into %s (once per environment; a built op is only loaded)",
             os.environ["TORCH_EXTENSIONS_DIR"])
    started = time.monotonic()
    engine.init_distributed()  # a rank of one, as a job starts: on a CPU this builds or loads shm_comm
    if not torch.cuda.is_available():
        log.info("shm_comm: ready (%.0f s)", time.monotonic() - started)
    _build("pin_memory", "PinMemoryBuilder")
    if preflight.libaio_available():
        _build("async_io", "AsyncIOBuilder")
    else:
        log.info("async_io: not built, libaio is missing (apt-get install libaio-dev); the first offload=nvme "
                 "job builds it once libaio is installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
