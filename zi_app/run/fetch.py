"""ZeRO-3 parameter fetching that keeps the host-to-device link busy (``memory.fetch=overlap``).

What DeepSpeed 0.19.8 does. Before each module runs, ZeRO-3's ``PartitionedParameterCoordinator``
fetches the module's parameters, waits for them, and only then prefetches the next modules'. The wait
costs the host far more than the copy: with one rank a fetch's handle completes by synchronising the
all-gather stream (``Stream.synchronize``), i.e. the host blocks until every copy queued so far has
landed, prefetches included; beyond two outstanding fetch events it also blocks on the oldest one
(``Event.synchronize``); and the compute stream then waits on the whole all-gather stream
(``wait_stream``), prefetches of later modules included. The next prefetch is issued only after all
that, so the copy queue runs dry while the host waits (docs/benchmarks.md, "Where a decode step's
time goes").

What we do instead, for forward passes without autograd (inference): issue this module's missing
parameters and, at once, the prefetch of the next modules, one fetch per module; record a CUDA event after
each fetch's own copies; make the compute stream ``wait_event`` on the events of the fetches that brought this module's
parameters (never ``wait_stream``); and block the host only when more than ``max_inflight_fetches``
fetches are in flight, on the oldest one. Parameters read from NVMe are the exception: the host waits
for their own copies, because DeepSpeed hands the pinned swap buffer they were copied from back to
its pool as soon as the parameter is released. Handles are completed on a stream of our own with no
work queued, so that DeepSpeed's stream synchronisation inside them returns at once; the data
dependency is the event's. Backward passes and forwards under autograd keep DeepSpeed's path.

When every parameter is persistent (the plan keeps every weight on the GPU), nothing is ever fetched
or released, yet each module's hooks still run ZeRO-3's bookkeeping every step: :func:`install` then
gathers every parameter once and removes ZeRO-3's module hooks from that engine.

Everything here is scoped to one engine: :func:`install` replaces the coordinator instance held by
that engine's parameter offload object; DeepSpeed's classes are never modified, so other engines in
the same process keep DeepSpeed's own behaviour. It reads private state of DeepSpeed's coordinator
(name-mangled attributes), so it is allowed only with the DeepSpeed version it was tested with
(:func:`zi_app.plan.preflight.check_fetch_supported`).
"""

from __future__ import annotations

import collections
import logging
from typing import Deque, Dict, Iterable, List, Set

import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus, free_param
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import PartitionedParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator, iter_params
from deepspeed.utils import z3_leaf_module

log = logging.getLogger(__name__)
_BASE = "_PartitionedParameterCoordinator__"  # DeepSpeed's name-mangled private attributes


class OverlapCoordinator(PartitionedParameterCoordinator):
    """DeepSpeed's coordinator with a forward fetch path that waits per fetch, on the device (module docstring)."""

    @classmethod
    def adopt(cls, shipped: PartitionedParameterCoordinator, max_inflight_fetches: int) -> "OverlapCoordinator":
        """A coordinator that takes over ``shipped``'s state (streams, registry, trace, settings)."""
        ours = cls.__new__(cls)
        ours.__dict__.update(shipped.__dict__)
        accelerator = get_accelerator()
        # On a synchronized device (DeepSpeed's CPU accelerator) copies are done when issued: no streams, no events.
        ours._ordered = not accelerator.is_synchronized_device()
        ours._max_inflight = max_inflight_fetches
        ours._inflight: Deque = collections.deque()  # events of fetches issued, oldest first
        ours._fetched_by: Dict[torch.nn.Parameter, object] = {}  # parameter -> event after the copies that bring it
        ours._completion_stream = accelerator.Stream() if ours._ordered else None
        return ours

    def _private(self, name: str):
        return getattr(self, _BASE + name)

    def reset_step(self) -> None:
        super().reset_step()
        self._fetched_by.clear()

    def _fetch_sub_module_impl(self, current_submodule, forward: bool, is_leaf: bool) -> None:
        if not forward or torch.is_grad_enabled():
            return super()._fetch_sub_module_impl(current_submodule, forward, is_leaf)
        params = set(iter_params(current_submodule, recurse=is_leaf))
        self._gather(p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        if self.is_complete_trace():
            self._pop_from_trace(current_submodule, params)
            self._prefetch()
        self._make_available(current_submodule, params)
        setattr(self, _BASE + "step_id", self._private("step_id") + 1)

    def _gather(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Issue one fetch of ``params`` and record the event that marks its copies done."""
        params = set(params)
        if not params:
            return
        if self._ordered:
            while self._inflight and self._inflight[0].query():
                self._inflight.popleft()
            while len(self._inflight) >= self._max_inflight:
                self._inflight.popleft().synchronize()
        self._private("all_gather_params")(params, True)
        if self._ordered:
            event = get_accelerator().Event()
            event.record(self._private("allgather_stream"))
            self._inflight.append(event)
            self._fetched_by.update(dict.fromkeys(params, event))

    def _pop_from_trace(self, module, params: Set[torch.nn.Parameter]) -> None:
        """Take this module's parameters off the head of the trace's fetch queue (DeepSpeed's bookkeeping)."""
        step_id = self._private("step_id")
        last_fetched_for = self._private("most_recent_step_id_param_fetched_for")
        queue = self._private("param_queue")
        expected = {p for p in params if last_fetched_for[p] < step_id}
        popped = set()
        while queue and len(popped) < len(expected):
            entry = queue.popleft()
            last_fetched_for[entry.param] = entry.step_id_last_used_at
            popped.add(entry.param)
        if popped != expected:
            raise RuntimeError(f"ZeRO-3 trace mismatch at step {step_id}, module {module.ds_id}: expected "
                               f"parameters {sorted(p.ds_id for p in expected)}, the trace has "
                               f"{sorted(p.ds_id for p in popped)}")

    def _prefetch(self) -> None:
        """Fetch the next modules' parameters, up to the prefetch bucket and the live-parameter limit."""
        bucket = self._private("prefetch_bucket_sz")
        if bucket <= 0:
            return
        queue = self._private("param_queue")
        last_fetched_for = self._private("most_recent_step_id_param_fetched_for")
        room = min(self._private("max_n_available_params") - self._private("n_available_params"), bucket)
        chosen: Set[torch.nn.Parameter] = set()
        # One fetch per module of the trace (its entries share the step that uses them), so that a module waits
        # for its own copies only: a bucket fetched as one would hold the first module (and the host, at the
        # step's first synchronisation) until the whole bucket has landed.
        by_module: Dict[int, List[torch.nn.Parameter]] = collections.defaultdict(list)
        numel = 0
        while queue and numel < room:
            entry = queue.popleft()
            param = entry.param
            if _on_nvme(param):  # DeepSpeed swaps these in below, in trace order
                queue.appendleft(entry)
                break
            last_fetched_for[param] = max(last_fetched_for[param], entry.step_id_last_used_at)
            if param.ds_status == ZeroParamStatus.NOT_AVAILABLE and param not in chosen:
                chosen.add(param)
                by_module[entry.step_id_last_used_at].append(param)
                numel += param.ds_numel
        for params in by_module.values():
            self._gather(params)
        if self._private("prefetch_nvme"):
            self._private("prefetch_nvme_param_partitions")()

    def _make_available(self, module, params: Set[torch.nn.Parameter]) -> None:
        """Complete the fetches of ``params``; the compute stream waits for their own copies only."""
        registry = self._private("inflight_param_registry")
        events, host_wait = set(), False
        for param in params:
            param.ds_active_sub_modules.add(module.ds_id)
            handle = registry.pop(param, None)
            if handle is None:
                continue
            if self._ordered:
                with get_accelerator().stream(self._completion_stream):
                    handle.wait()
            else:
                handle.wait()
            event = self._fetched_by.pop(param, None)
            if event is not None:
                events.add(event)
                host_wait = host_wait or param.nvme_swapper is not None
        for param in params:
            assert param.ds_status == ZeroParamStatus.AVAILABLE, param.ds_summary()
        if not self._ordered or not events:
            return
        compute = get_accelerator().current_stream()
        for event in events:
            if host_wait:
                event.synchronize()
            compute.wait_event(event)
        # Multi-rank handles finish on the completion stream (concatenating the gathered shards).
        done = get_accelerator().Event()
        done.record(self._completion_stream)
        compute.wait_event(done)

    def release_sub_module(self, submodule, forward: bool = False) -> None:
        """After a module's forward without autograd, free the GPU copies of its parameters that the trace says
        are not used again soon, as DeepSpeed does, without its repartitioning call chain: inference never
        changes a weight, so releasing one is freeing its gathered copy (and an NVMe partition's swap buffer).
        That chain formats debug strings and walks checks per parameter, host time a decode step pays once per
        streamed parameter (OPT-13B int4: the post-forward hook was the host's largest cost after the fetch).
        Backward passes, forwards under autograd, leaf modules sharded for speed and parameters with a secondary
        (hpZ) partition keep DeepSpeed's path."""
        leaf = z3_leaf_module(submodule)
        if not forward or torch.is_grad_enabled() or (leaf and self.fast_sharding_for_leaf_module):
            return super().release_sub_module(submodule, forward)
        step_id = self._private("step_id")
        to_release = (self._private("params_to_release")(submodule, step_id) if self.is_complete_trace()
                      else {p.ds_id for p in iter_params(submodule, recurse=leaf)})
        released = 0
        for param in iter_params(submodule, recurse=leaf):
            param.ds_active_sub_modules.discard(submodule.ds_id)
            if (param.ds_id not in to_release or param.is_external_param or param.ds_active_sub_modules
                    or param.ds_status != ZeroParamStatus.AVAILABLE):
                continue
            if param.ds_tensor is None or param.ds_secondary_tensor is not None:
                param.partition(free_data=True)
            else:
                free_param(param)
                if param.ds_tensor.final_location == OffloadDeviceEnum.nvme:
                    param.nvme_swapper.remove_partition_and_release_buffers([param])
            released += param.ds_numel
        setattr(self, _BASE + "n_available_params", self._private("n_available_params") - released)

    def make_resident(self, module: torch.nn.Module) -> None:
        """Fetch every parameter of ``module`` now, one at a time (NVMe has few swap buffers)."""
        for param in iter_params(module, recurse=True):
            if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                self._gather([param])
                self._make_available(module, {param})
                if self._ordered:
                    self._inflight.pop().synchronize()
                param.ds_active_sub_modules.discard(module.ds_id)


def _on_nvme(param: torch.nn.Parameter) -> bool:
    """Whether the parameter's partition is still on NVMe (not yet swapped into host memory)."""
    return (param.nvme_swapper is not None and param.ds_tensor.final_location == OffloadDeviceEnum.nvme
            and param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE)


def parameter_offload(engine):
    """The ZeRO-3 parameter offload object (hooks and coordinator) of a DeepSpeed engine."""
    return getattr(engine.optimizer, "parameter_offload", engine.optimizer)


def install(engine, max_inflight_fetches: int) -> bool:
    """Give ``engine`` (and only it) the overlapping fetch path; returns whether ZeRO-3's module hooks were
    removed because every parameter is persistent (resident on the accelerator for good)."""
    offload = parameter_offload(engine)
    shipped = offload.param_coordinator
    if type(shipped) is not PartitionedParameterCoordinator:
        raise TypeError(f"expected DeepSpeed's PartitionedParameterCoordinator, found {type(shipped).__name__}")
    ours = OverlapCoordinator.adopt(shipped, max_inflight_fetches)
    offload.param_coordinator = ours
    params = list(iter_params(offload.module, recurse=True))
    if not all(p.ds_persist for p in params):
        return False
    ours.make_resident(offload.module)
    offload.destroy()  # removes ZeRO-3's forward/backward module hooks, this engine's only
    log.info("every parameter is resident: ZeRO-3's per-module fetch/release hooks removed")
    return True
