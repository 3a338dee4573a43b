"""Progress of long work (loading a model, the decode steps of a generate): a tqdm bar when stderr is a
terminal; otherwise a plain log line at most every ``INTERVAL_S`` seconds and a final one, so that CI logs
and a sweep job's log file stay readable. Only rank 0 of a job spanning several processes shows progress.
And the job's last word, its result line (:func:`result_line`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Iterator, Optional

from tqdm import tqdm

if TYPE_CHECKING:
    from zi_app.config.schema import JobSpec

log = logging.getLogger(__name__)

INTERVAL_S = 10.0  # least seconds between two plain lines of one piece of work


def shown() -> bool:
    """Whether this process shows progress: rank 0 of its job (``RANK`` unset or 0); the others would
    repeat it."""
    return os.environ.get("RANK", "0") in ("", "0")


def human_seconds(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``: a duration as a person reads it."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 90 else f"{minutes // 60} h {minutes % 60:02d} min"


class Progress:
    """One piece of work counted up to ``total`` (bytes when ``in_bytes``, else ``unit``s)."""

    def __init__(self, label: str, total: float, unit: str = "it", in_bytes: bool = False) -> None:
        self.label, self.total, self.unit, self.in_bytes = label, total, unit, in_bytes
        self.done = 0.0
        self.start = self.last_line = time.monotonic()
        self.visible = shown()
        self.bar: Optional[tqdm] = None
        if self.visible and sys.stderr.isatty():
            self.bar = tqdm(total=total, desc=label, unit="B" if in_bytes else unit, unit_scale=in_bytes,
                            unit_divisor=1000, file=sys.stderr, dynamic_ncols=True)

    def _amount(self, value: float) -> str:
        return tqdm.format_sizeof(value, suffix="B", divisor=1000) if self.in_bytes else f"{value:.0f}"

    def _line(self, final: bool) -> str:
        elapsed = time.monotonic() - self.start
        unit = "" if self.in_bytes else f" {self.unit}{'' if self.total == 1 else 's'}"
        counts = f"{self._amount(self.done)}/{self._amount(self.total)}{unit}"
        if final:
            return f"{self.label}: {counts} in {elapsed:.1f} s"
        left = f", about {human_seconds(elapsed * (self.total - self.done) / self.done)} left" if self.done else ""
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.label}: {counts}{share}, {elapsed:.0f} s{left}"

    def set_total(self, total: float) -> None:
        """Change what the work counts up to (known only once it started, e.g. a checkpoint's bytes)."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, amount: float = 1) -> None:
        """Count ``amount`` more done; a plain line when ``INTERVAL_S`` passed since the last one."""
        self.done += amount
        if self.bar is not None:
            self.bar.update(amount)
        elif self.visible and time.monotonic() - self.last_line >= INTERVAL_S:
            self.last_line = time.monotonic()
            log.info("%s", self._line(final=False))

    def close(self, finished: bool = True) -> None:
        """End the work; ``finished``: it all got done (the count is completed and the final line shown)."""
        if finished:
            self.done = self.total
            if self.bar is not None:
                self.bar.n = self.total
                self.bar.refresh()
            if self.bar is None and self.visible:
                log.info("%s", self._line(final=True))
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def progress(label: str, total: float, unit: str = "it", in_bytes: bool = False) -> Iterator[Progress]:
    """A :class:`Progress` for the block: finished when the block ends normally, only closed when it raises."""
    work = Progress(label, total, unit, in_bytes)
    try:
        yield work
    except BaseException:
        work.close(finished=False)
        raise
    work.close()


def roofline_text(m: dict) -> str:
    """The decode step against the PCIe roofline, as the result line and the job's log say it: no ratio where
    nothing crossed the link in a step (every weight and the KV cache on the GPU)."""
    streamed = f"{m['streamed_bytes_per_step'] / 1e9:.2f} GB/step at {m['h2d_gbps']:.1f} GB/s"
    if not m["streamed_bytes_per_step"]:
        return f"no roofline: nothing crossed the link in a decode step ({streamed})"
    return f"{m['roofline_ratio']:.2f}x the roofline ({streamed})"


def result_line(spec: JobSpec, m: dict, offload_needed: Optional[bool] = None) -> str:
    """One line with a job's headline numbers (a job of several devices: its ranks' count, the whole job's
    tokens/s, the largest rank's GPU peak); the GPU and roofline figures where they were measured, and
    whether the model would fit the GPU budget without offloading where that is known."""
    predicted = f" (predicted {m['predicted_tokens_per_sec']:.2f})" if "predicted_tokens_per_sec" in m else ""
    ranks = f" x {spec.devices} devices" if spec.devices > 1 else ""
    parts = [f"{spec.model.name} batch={spec.batch}{ranks} {m['tokens_per_sec']:.2f} tokens/s{predicted}",
             f"decode step {m.get('decode_step_s', float('nan')):.4f} s", f"prefill {m['prefill_s']:.3f} s",
             f"peak host {m['peak_host_rss_bytes'] / 2**30:.2f} GiB"]
    if "peak_gpu_allocated_bytes" in m:
        parts.append(f"peak GPU {m['peak_gpu_allocated_bytes'] / 2**30:.2f} GiB{' (largest rank)' if ranks else ''} "
                     f"(predicted {m['predicted_peak_gpu_bytes'] / 2**30:.2f})")
    if "roofline_ratio" in m:
        parts.append(roofline_text(m))
    if offload_needed is False:
        parts.append("offload not needed: every weight fits the GPU budget with offload=none")
    return ", ".join(parts)
