"""An offloaded KV cache whose host memory is allocated once per job, at the sequence's final length
(``kvcache=cpu``: ``kvcache.cache_implementation=host``).

transformers' own offloaded cache (``cache_implementation="offloaded"``, ``kvcache=cpu_transformers``) sends each
layer's whole cache back to the host after every use, on the compute stream, into new blocks that the CUDA host
allocator rounds up to powers of two and keeps by size class: host memory grows to several times the cache, and
every decode step copies the whole cache both ways. Here the host holds every layer's keys and values in one
buffer of the final length, page-locked at its own size, made once and reused by every ``generate`` of the job.
An update copies only the new tokens' keys and values to the host, and the next layer's cached prefix to the GPU,
both on a side stream while the current layer computes, into the other of two GPU slots of one layer each.

With ``kvcache.attention=host`` a decode step's attention runs where the cache lives instead (FlexGen's CPU
delegation): the host reads each layer's cached prefix from its own memory, and only the new tokens' keys and
values go down and the attention's queries and outputs cross the link, so that PCIe carries the weights alone.
The host buffer is then head-major, so that each head's cached tokens are one run for the host's attention.

With ``kvcache.quant=int8`` or ``int4`` (attending on the device) the host holds the cache quantized, FlexGen's
``compress_cache``: each new token's keys and values are quantized on the device in groups of 64 elements
along the head (``KV_QUANT_GROUP``; asymmetric, a minimum and a step per group in the model's dtype), go down
packed and come back up packed, so the link carries about a half (int8) or a quarter (int4) of the bytes.
A prefix comes up 64 tokens at a time and each chunk is dequantized into the slot on a second side stream
while the next one crosses the link: run after the whole copy on one stream, dequantization added 30-70% to the
copy's time (OPT-30B and OPT-66B int4 on an H200, 2026-12-06). A step attends over its own new tokens at full
width, as they were computed (the prefill over the whole prompt, so its token is the GPU cache's), and over the
cached ones dequantized: the tokens that follow are no longer exactly the GPU cache's.

With ``kvcache.gpu_layers`` some layers' caches stay in GPU memory at the host cache's width (packed when
quantized), spread evenly through the model (FlexGen's cache GPU percentage): a step sends over PCIe only the other
layers' cached tokens, and the host holds only theirs. A kept layer is stored head-major, so that its prefix is
dequantized straight into the layout attention takes, beside the new tokens at full width: no slot, no copy within
the GPU, no transposing copy. A quantized kept layer is dequantized every step, and that is where the choice of
kernels (``kvcache.dequant``) decides whether keeping it pays: PyTorch's separate unpack, convert and scale kernels
cost about as much per cached element as bringing it over the link packed (OPT-30B int4 with every layer kept at
batch 64 on H100s: 0.368 s a step, where the GPU cache's batch 32 took 0.117; ``torch.compile`` made it slower,
0.503 s), while one Triton kernel (:mod:`zi_app.run.kv_kernels`) reads each packed byte and writes each value once,
7x faster: with it the same cell's best, 36 layers kept at batch 96, ran at 253.3 tokens/s against the GPU cache's
183.8 at batch 32 in the same call (docs/benchmarks.md, seventh run).

On DeepSpeed's CPU accelerator the same path runs with plain copies (the "device" is host memory too), which is
how the CPU tests check its tokens and the bytes it moves.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from transformers.cache_utils import Cache, DynamicLayer

from zi_app.config.checks import KV_QUANT_CHUNK_TOKENS, kv_quant_group

ATTENTION = "zi_where_cached"  # the attention implementation of kvcache.attention=host (see attend_where_cached)


def quantize(x: torch.Tensor, bits: int, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """Quantize ``x`` (tokens, ..., head_dim) into ``codes`` (tokens, ..., head_dim * bits / 8; uint8, packed)
    and ``scales`` (tokens, ..., groups, 2: each group's minimum and step, in x's dtype)."""
    for x, codes, scales in _chunks(x, codes, scales):
        group = kv_quant_group(x.shape[-1])
        grouped = x.unflatten(-1, (x.shape[-1] // group, group))
        low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
        step = ((high.float() - low.float()) / (2**bits - 1)).to(x.dtype).clamp_min(torch.finfo(x.dtype).tiny)
        scales[..., :1].copy_(low)
        scales[..., 1:].copy_(step)
        # Codes from the minimum and step as stored (in x's dtype), computed in float32: in float16 the division
        # alone is off by up to a tenth of a step at code 255.
        levels = ((grouped.float() - low.float()) / step.float()).round_().clamp_(0, 2**bits - 1)
        levels = levels.to(torch.uint8).flatten(-2)
        if bits == 4:
            torch.bitwise_or(levels[..., 0::2] << 4, levels[..., 1::2], out=codes)
        else:
            codes.copy_(levels)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, out: torch.Tensor, kernel: str = "torch") -> None:
    """Write the values of :func:`quantize`'s ``codes`` and ``scales`` into ``out`` (tokens, ..., head_dim), with
    PyTorch's kernels (``kernel="torch"``) or one Triton kernel (``"triton"``: :mod:`zi_app.run.kv_kernels`)."""
    if kernel == "triton":
        from zi_app.run import kv_kernels  # Triton only where it runs (kvcache.dequant)

        kv_kernels.dequantize(codes, scales, bits, out)
        return
    for codes, scales, out in _chunks(codes, scales, out):
        if bits == 4:
            codes = torch.stack((codes >> 4, codes & 15), dim=-1).flatten(-2)
        grouped = out.unflatten(-1, (scales.shape[-2], out.shape[-1] // scales.shape[-2]))
        torch.addcmul(scales[..., :1], codes.unflatten(-1, grouped.shape[-2:]).to(out.dtype), scales[..., 1:],
                      out=grouped)


def dequantize_with_new(codes: torch.Tensor, scales: torch.Tensor, bits: int, new: torch.Tensor,
                        kernel: str = "torch") -> torch.Tensor:
    """A kept layer's keys or values for attention: its cached tokens (``codes`` and ``scales``, head-major)
    dequantized by ``kernel`` (:func:`dequantize`; PyTorch's 64 tokens at a time, so that their temporaries are a
    chunk's, as a slot's; Triton's, which makes none, at once), then ``new`` as given, contiguous."""
    cached = codes.shape[-2]
    both = new.new_empty(new.shape[:-2] + (cached + new.shape[-2], new.shape[-1]))
    for part in _token_ranges(cached, max(1, cached) if kernel == "triton" else KV_QUANT_CHUNK_TOKENS):
        dequantize(codes[:, :, :, part], scales[:, :, :, part], bits, both[:, :, :, part], kernel)
    both[:, :, :, cached:].copy_(new)
    return both


def _token_ranges(tokens: int, size: int = KV_QUANT_CHUNK_TOKENS) -> Iterator[slice]:
    """The first ``tokens`` tokens, ``size`` at a time."""
    for start in range(0, tokens, size):
        yield slice(start, min(tokens, start + size))


def _chunks(*tensors: torch.Tensor) -> Iterator[Tuple[torch.Tensor, ...]]:
    """The tensors' rows (tokens), ``KV_QUANT_CHUNK_TOKENS`` at a time."""
    for part in _token_ranges(tensors[0].shape[0]):
        yield tuple(tensor[part] for tensor in tensors)


class HostKV:
    """The host buffers, GPU slots, side stream and transfer counters of one job's offloaded KV cache.

    ``layers``: the model's decoder layers; ``max_len``: prompt + generated tokens, the most any ``generate``
    of the job holds; ``pin``: page-lock the host buffer (CUDA only), so that copies are asynchronous DMA;
    ``gpu_layers``: how many layers' caches stay on the device (:func:`on_gpu`); ``dequant``: the kernels that
    dequantize a quantized cache on the device (:func:`dequantize`'s ``kernel``, kvcache.dequant as planned).
    Buffers are made at the first update, when the keys' batch, heads, head size, dtype and device are known.
    """

    def __init__(self, layers: int, max_len: int, pin: bool = True, attend_on_host: bool = False,
                 bits: int = 16, gpu_layers: int = 0, dequant: str = "torch") -> None:
        if not 0 <= gpu_layers <= layers or (gpu_layers and attend_on_host):
            raise ValueError(f"gpu_layers={gpu_layers}: from 0 to {layers}, and 0 where the host attends")
        self.layers, self.max_len, self.pin, self.attend_on_host = layers, max_len, pin, attend_on_host
        self.bits = bits  # 16: the model's dtype; 8 or 4: quantized on the host (kvcache.quant)
        self.dequant = dequant
        # Each layer's (store, index): 0 the host buffers, 1 the device's, at the layer's index among them.
        kept = on_gpu(layers, gpu_layers)
        self.gpu_layers = gpu_layers
        self.where = [(int(keep), sum(1 for earlier in kept[:layer] if earlier == keep))
                      for layer, keep in enumerate(kept)]
        # Token-major, so that any run of tokens is one contiguous block: a strided copy between host and device
        # would stage through pageable memory and block the host thread until the stream reached it.
        # [layers, max_len, 2 (keys, values), batch, heads, head_dim]; attending on the host, head-major:
        # [layers, 2, batch, heads, max_len, head_dim]
        self.host: Optional[torch.Tensor] = None
        self.slots: Optional[torch.Tensor] = None  # [2 slots, max_len, 2, batch, heads, head_dim] on the device
        # Quantized (bits < 16): ``host`` holds the packed codes [..., head_dim * bits / 8] (uint8), ``host_scales``
        # each group's minimum and step [layers, max_len, 2, batch, heads, groups, 2], and each slot has room for
        # a layer's packed codes and scales on the device (``packed_slots``, ``scale_slots``).
        self.host_scales: Optional[torch.Tensor] = None
        # The layers kept on the device (kvcache.gpu_layers), head-major: [kept layers, 2, batch, heads, max_len,
        # head_dim], or its packed codes [..., head_dim * bits / 8] and scales [..., groups, 2]
        self.kept: Optional[torch.Tensor] = None
        self.kept_scales: Optional[torch.Tensor] = None
        self.packed_slots: Optional[torch.Tensor] = None
        self.scale_slots: Optional[torch.Tensor] = None
        self.shape: Tuple[int, int, int] = (0, 0, 0)  # batch, heads, head size the buffers were made for
        self.stream = None  # the side stream of the copies (CUDA), else None: copies run in order
        self.dequant_stream = None  # quantized: the side stream that dequantizes what the copies brought up
        self.h2d_bytes = 0  # bytes copied host -> device (cached prefixes)
        self.d2h_bytes = 0  # bytes copied device -> host (new tokens' keys and values)
        self.kept_bytes = 0  # bytes of kept layers' caches written (new tokens) and read (cached prefixes), on the device
        self.host_read_bytes = 0  # cached keys and values handed to the host's attention (kvcache.attention=host)
        self._registered: list = []  # host buffers page-locked by cudaHostRegister

    def allocate(self, key_states: torch.Tensor) -> None:
        """Make the host buffer and the device slots for keys shaped like ``key_states`` (batch, heads, *, head_dim)."""
        batch, heads, _, head_dim = key_states.shape
        self.shape = (batch, heads, head_dim)
        dtype, device = key_states.dtype, key_states.device
        if self.attend_on_host:  # no device slots: nothing cached comes up
            self.host = torch.empty((self.layers, 2, batch, heads, self.max_len, head_dim), dtype=dtype)
        else:
            streamed = self.layers - self.gpu_layers
            # token-major where the link carries it (slots and host); kept layers head-major (class docstring)
            shape, kept = (self.max_len, 2, batch, heads, head_dim), (2, batch, heads, self.max_len, head_dim)
            slots = 2 if streamed else 0  # nothing streamed: nothing to fetch into a slot
            self.slots = torch.empty((slots,) + shape, dtype=dtype, device=device)
            if self.bits < 16:
                width, groups = head_dim * self.bits // 8, head_dim // kv_quant_group(head_dim)
                packed, scales = shape[:-1] + (width,), shape[:-1] + (groups, 2)
                self.host = torch.empty((streamed,) + packed, dtype=torch.uint8)
                self.host_scales = torch.empty((streamed,) + scales, dtype=dtype)
                self.kept = torch.empty((self.gpu_layers,) + kept[:-1] + (width,), dtype=torch.uint8, device=device)
                self.kept_scales = torch.empty((self.gpu_layers,) + kept[:-1] + (groups, 2), dtype=dtype,
                                               device=device)
                self.packed_slots = torch.empty((slots,) + packed, dtype=torch.uint8, device=device)
                self.scale_slots = torch.empty((slots,) + scales, dtype=dtype, device=device)
            else:
                self.host = torch.empty((streamed,) + shape, dtype=dtype)
                self.kept = torch.empty((self.gpu_layers,) + kept, dtype=dtype, device=device)
        if key_states.is_cuda:
            self.stream = None if self.attend_on_host else torch.cuda.Stream(device=device)
            self.dequant_stream = torch.cuda.Stream(device=device) if self.bits < 16 else None
            if self.pin:
                for buffer in (self.host, self.host_scales):
                    if buffer is not None and buffer.numel():  # none when every layer's cache is kept on the GPU
                        self._register(buffer)

    def _register(self, buffer: torch.Tensor) -> None:
        nbytes = buffer.numel() * buffer.element_size()
        # cudaHostRegister locks the buffer's own pages (no power-of-two block from torch's host allocator)
        status = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        if int(status) != 0:
            raise RuntimeError(f"cudaHostRegister of the {nbytes / 2**30:.1f} GiB KV cache failed ({status})")
        self._registered.append(buffer)

    def on_host(self, layer: int, tokens: slice) -> Tuple[torch.Tensor, ...]:
        """Where ``tokens`` of ``layer`` are kept in host memory: their keys and values, or their packed codes
        and scales when quantized (token-major layout)."""
        index = self.where[layer][1]
        if self.bits < 16:
            return self.host[index, tokens], self.host_scales[index, tokens]
        return (self.host[index, tokens],)

    def is_kept(self, layer: int) -> bool:
        """Whether ``layer``'s cache stays on the GPU (kvcache.gpu_layers)."""
        return bool(self.where[layer][0])

    def in_kept(self, layer: int, tokens: slice) -> Tuple[torch.Tensor, ...]:
        """Where ``tokens`` of a kept ``layer`` are on the GPU, as :meth:`on_host` (head-major: keys and values,
        batch, heads, tokens, then the head's elements or its packed codes, and scales)."""
        index = self.where[layer][1]
        if self.bits < 16:
            return self.kept[index, :, :, :, tokens], self.kept_scales[index, :, :, :, tokens]
        return (self.kept[index, :, :, :, tokens],)

    def next_streamed(self, layer: int) -> Optional[int]:
        """The first layer after ``layer`` (wrapping to the next step) whose cache is in host memory; None: none."""
        for step in range(1, self.layers + 1):
            following = (layer + step) % self.layers
            if not self.is_kept(following):
                return following
        return None

    def on_device(self, index: int, tokens: slice) -> Tuple[torch.Tensor, ...]:
        """What crosses the link for ``tokens`` of slot ``index``, in the order of :meth:`on_host`: the slot's
        keys and values, or its packed room."""
        if self.bits < 16:
            return self.packed_slots[index, tokens], self.scale_slots[index, tokens]
        return (self.slots[index, tokens],)

    def on_side_stream(self):
        """Context in which copies go to the side stream (CUDA); without one they run in order."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def dequantizing(self) -> Iterator[None]:
        """Context in which work goes to the dequantizing stream, after every copy issued so far (CUDA)."""
        if self.dequant_stream is None:
            yield
            return
        self.dequant_stream.wait_stream(self.stream)
        with torch.cuda.stream(self.dequant_stream):
            yield

    def wait_for_copies(self, compute) -> None:
        """Make the ``compute`` stream wait for every copy and dequantization issued so far."""
        for side in (self.stream, self.dequant_stream):
            if side is not None:
                compute.wait_stream(side)

    def record_filled(self):
        """An event after the last fill of a slot: its dequantization when quantized, else its copy."""
        return (self.dequant_stream or self.stream).record_event()

    def holds(self) -> Tuple[int, int, int]:
        """(batch, heads, head size) the host buffer was made for."""
        return self.shape

    def host_bytes(self) -> int:
        """Bytes of the host buffers (0 before the first update)."""
        return _nbytes(self.host, self.host_scales)

    def kept_store_bytes(self) -> int:
        """Bytes of the device buffers of the layers kept on the GPU (0 before the first update)."""
        return _nbytes(self.kept, self.kept_scales)

    def close(self) -> None:
        """Unlock and drop the buffers."""
        for buffer in self._registered:
            torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())
        self._registered = []
        self.host = self.host_scales = self.kept = self.kept_scales = None
        self.slots = self.packed_slots = self.scale_slots = None
        self.stream = self.dequant_stream = None

    def cache(self) -> "HostKVCache":
        """A new, empty cache over this memory, for one ``generate``."""
        return HostKVCache(self)


def _nbytes(*buffers: Optional[torch.Tensor]) -> int:
    return sum(buffer.numel() * buffer.element_size() for buffer in buffers if buffer is not None)


def on_gpu(layers: int, gpu_layers: int) -> Tuple[bool, ...]:
    """Which of ``layers`` keep their cache on the GPU: ``gpu_layers`` of them, spread evenly, so that the link
    carries the other layers' prefixes while these compute instead of idling through a run of them."""
    return tuple((layer + 1) * gpu_layers // layers > layer * gpu_layers // layers for layer in range(layers))


@contextlib.contextmanager
def host_kv(layers: int, max_len: int, pin: bool, attend_on_host: bool = False, bits: int = 16,
            gpu_layers: int = 0, dequant: str = "torch") -> Iterator[HostKV]:
    """A job's :class:`HostKV`, closed (its host memory unlocked) on exit."""
    memory = HostKV(layers, max_len, pin, attend_on_host, bits, gpu_layers, dequant)
    try:
        yield memory
    finally:
        memory.close()


class HostKVLayer(DynamicLayer):
    """One layer of a :class:`HostKVCache`: how many tokens it holds, and views of the slot it was last given."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length


class HostKVCache(Cache):
    """A transformers ``Cache`` over a :class:`HostKV`, one per ``generate`` (pass it as ``past_key_values``).

    Layers update in order, so each update can fetch the next layer's prefix ahead: update ``u`` computes in slot
    ``u % 2`` and fills slot ``(u + 1) % 2`` for the next. The compute stream waits for that fill before it
    writes into a slot. The side stream waits for the compute stream before it copies a new token out of a slot,
    and before it fills a slot, only for the slot's last layer to have taken its attention's copies of it: so
    the next layer's fill starts as soon as this one's ends, and the link carries the cache back to back
    while the layers compute.
    """

    def __init__(self, memory: HostKV) -> None:
        super().__init__(layers=[HostKVLayer() for _ in range(memory.layers)])
        self.memory = memory
        self.updates = 0
        self.prefetched: Tuple[int, int] = (-1, 0)  # (layer, tokens) now in the next update's slot
        self.filled = None  # the side stream's event after the last update's copies
        self.released = None  # the compute stream's event after the last update's attention copies of its slot

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new tokens' keys and values of ``layer_idx``; return its keys and values so far (device)."""
        memory, layer = self.memory, self.layers[layer_idx]
        if memory.host is None:
            memory.allocate(key_states)
        start = layer.length
        end = start + key_states.shape[-2]
        held = memory.holds()
        if end > memory.max_len or held != (key_states.shape[0], key_states.shape[1], key_states.shape[3]):
            raise ValueError(f"the KV cache holds batch, heads, head size {held} and {memory.max_len} tokens; "
                             f"got {tuple(key_states.shape[:2]) + (key_states.shape[3],)} and {end}")
        if memory.attend_on_host:
            return self._update_on_host(key_states, value_states, layer_idx, start, end)
        if memory.is_kept(layer_idx):
            return self._update_kept(key_states, value_states, layer_idx, start, end)
        index = self.updates % 2
        slot = memory.slots[index]
        side = memory.stream
        if side is not None:
            compute = torch.cuda.current_stream(key_states.device)
            # The first update waits for any copy a previous generate left in flight; later ones for the fill.
            if self.filled is None:
                memory.wait_for_copies(compute)
            else:
                compute.wait_event(self.filled)
        if start and self.prefetched != (layer_idx, start):  # not fetched ahead (layers out of order): fetch now
            self._copy_up(layer_idx, start, index)
            if side is not None:
                memory.wait_for_copies(compute)
        following = memory.next_streamed(layer_idx)  # kept layers fetch nothing
        if following != layer_idx:  # else the only streamed layer: its next prefix once this token has gone down
            self._fetch_ahead(following, self.layers[following].length, 1 - index)
        new = slice(start, end)
        slot[new, 0].copy_(key_states.permute(2, 0, 1, 3))
        slot[new, 1].copy_(value_states.permute(2, 0, 1, 3))
        if memory.bits < 16:  # quantized into this slot's packed room to go down; attended at full width now
            quantize(slot[new], memory.bits, *memory.on_device(index, new))
        layer.length, layer.is_initialized = end, True
        # The layer keeps views of its slot (batch, heads, tokens, head_dim), no memory of their own: a copy kept
        # per layer would put the whole cache back on the GPU.
        layer.keys, layer.values = slot[:end, 0].permute(1, 2, 0, 3), slot[:end, 1].permute(1, 2, 0, 3)
        # Attention gets them contiguous, as transformers' GPU cache hands them: the same layout picks the same
        # attention kernel, hence the same greedy tokens (the strided views changed 3 of 64 rows of OPT-6.7B
        # fp16 on an H100). The copies live while this layer computes; once they are made, the slot is free.
        keys, values = layer.keys.contiguous(), layer.values.contiguous()
        with memory.on_side_stream():
            if side is not None:
                self.released = compute.record_event()
                side.wait_event(self.released)
            for down, made in zip(memory.on_host(layer_idx, new), memory.on_device(index, new)):
                down.copy_(made, non_blocking=True)
                memory.d2h_bytes += down.numel() * down.element_size()
        if following == layer_idx:
            self._fetch_ahead(layer_idx, end, 1 - index)
        self.updates += 1
        return keys, values

    def _fetch_ahead(self, layer_idx: int, tokens: int, index: int) -> None:
        """Copy ``tokens`` cached tokens of ``layer_idx``, the next layer to stream, into slot ``index`` on the
        side stream, once the layer that used the slot last has released it."""
        memory, side = self.memory, self.memory.stream
        with memory.on_side_stream():
            if self.released is not None:
                side.wait_event(self.released)
            elif side is not None:
                side.wait_stream(torch.cuda.current_stream(side.device))
            self._copy_up(layer_idx, tokens, index)
            self.filled = memory.record_filled() if side is not None else None
        self.prefetched = (layer_idx, tokens)

    def _update_kept(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, start: int,
                     end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A layer kept on the GPU (kvcache.gpu_layers): the new tokens' keys and values stored (quantized as the
        host stores them, 64 tokens at a time like a slot's); attention gets the cached ones dequantized and the
        new ones at full width, contiguous, as a streamed layer's slot gives them."""
        memory, layer = self.memory, self.layers[layer_idx]
        new = torch.stack((key_states, value_states))  # keys and values, batch, heads, tokens, head_dim
        stored = memory.in_kept(layer_idx, slice(start, end))
        if memory.bits < 16:
            for part in _token_ranges(end - start):
                quantize(new[:, :, :, part], memory.bits, *(kept[:, :, :, part] for kept in stored))
        else:
            stored[0].copy_(new)
        memory.kept_bytes += _nbytes(*stored)
        cached = memory.in_kept(layer_idx, slice(0, start))
        memory.kept_bytes += _nbytes(*cached)
        if not start:
            both = new
        elif memory.bits == 16:
            both = torch.cat((cached[0], new), dim=-2)
        else:
            both = dequantize_with_new(*cached, memory.bits, new, memory.dequant)
        layer.length, layer.is_initialized = end, True
        # No memory of its own between steps: what attention gets lives while this layer computes.
        layer.keys = layer.values = key_states.new_empty(0)
        return both[0], both[1]

    def _update_on_host(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, start: int,
                        end: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """kvcache.attention=host: the new tokens' keys and values go down now (the host attends over them next);
        the prefill attends on the device over the prompt's, which it has, and a decode step where they are."""
        memory, layer = self.memory, self.layers[layer_idx]
        keys, values = memory.host[layer_idx, 0, :, :, :end], memory.host[layer_idx, 1, :, :, :end]
        if start:
            keys[:, :, start:end].copy_(key_states)
            values[:, :, start:end].copy_(value_states)
            memory.d2h_bytes += 2 * key_states.numel() * key_states.element_size()
        else:
            # The prompt's tokens are a strided block of the head-major buffer, which torch copies from the GPU
            # through a pageable bounce buffer (OPT-30B int4 batch 64 on an H100: a 32.8 s prefill, 3.3 s copying
            # up). Padded to the final length on the device, the layer's block goes down as one DMA; the padding
            # is overwritten by the decode steps' tokens before anything reads it.
            padded = key_states.new_empty(memory.host.shape[1:])
            padded[0, :, :, :end].copy_(key_states)
            padded[1, :, :, :end].copy_(value_states)
            memory.host[layer_idx].copy_(padded, non_blocking=True)
            memory.d2h_bytes += padded.numel() * padded.element_size()
        layer.length, layer.is_initialized = end, True
        layer.keys, layer.values = keys, values
        if not start:
            return key_states, value_states
        memory.host_read_bytes += 2 * keys.numel() * keys.element_size()
        return keys, values

    def _copy_up(self, layer_idx: int, tokens: int, index: int) -> None:
        """Copy ``tokens`` cached tokens of ``layer_idx`` into slot ``index`` (on the side stream where there is
        one), through the slot's packed room when the host holds them quantized."""
        if not tokens:
            return
        memory = self.memory
        with memory.on_side_stream():  # quantized, a chunk at a time, each dequantized while the next comes up
            for cached in _token_ranges(tokens, KV_QUANT_CHUNK_TOKENS if memory.bits < 16 else tokens):
                for into, up in zip(memory.on_device(index, cached), memory.on_host(layer_idx, cached)):
                    into.copy_(up, non_blocking=True)
                    memory.h2d_bytes += up.numel() * up.element_size()
                if memory.bits < 16:
                    with memory.dequantizing():
                        dequantize(*memory.on_device(index, cached), memory.bits, memory.slots[index, cached],
                                   memory.dequant)


def attend_where_cached(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], **kwargs):
    """transformers' SDPA attention, run on the device that holds ``key`` and ``value``: a decode step's
    queries (and mask) go to the host cache of kvcache.attention=host and its output comes back; elsewhere
    (the prefill, a cache on the device) it is SDPA as it was."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if key.device == query.device:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    host = key.device
    mask = attention_mask.to(host) if attention_mask is not None else None
    output, weights = sdpa_attention_forward(module, query.to(host), key, value, mask, **kwargs)
    return output.to(query.device), weights


def attend_on_host(model: torch.nn.Module) -> None:
    """Make ``model``'s attention :func:`attend_where_cached` (masks made as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTENTION, attend_where_cached)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(ATTENTION)
