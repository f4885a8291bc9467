"""The routed K/V cache: each decoder layer caches only the tokens that ran in it.

A routed prefill fills one `RoutedLayer` per decoder layer: a buffer preallocated with the compact prompt entries
of the tokens that ran in that layer (right-padded per sample) and room for the tokens `generate` will decode,
filled in place, with a validity mask. The cache reports the logical (unrouted) sequence length so that
`generate()` and M-RoPE continue from it. `visroute.engine` builds and fills it; this module only holds it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import BaseQuantizedLayer, CacheLayerMixin, DynamicLayer, StaticLayer


class Progress:
    """What the layers of one routed cache share: the prompt's (logical) length and how many decode entries each
    layer holds, on the host (shapes of the eager step) and on the device (positions of the fixed-shape step)."""

    def __init__(self, prompt_length: int, device: torch.device, static_length: int | None):
        self.prompt_length = prompt_length
        self.written = 0
        self.step = torch.zeros((), dtype=torch.long, device=device)
        static_address(self.step)
        self.static_length = static_length  # a static cache's max_cache_len: the capacity never grows
        self.fixed_shapes = False  # set while the fixed-shape (compilable) decode step runs

    def advance(self, q: int) -> None:
        self.written += q
        self.step.add_(q)


def static_address(*tensors: torch.Tensor) -> None:
    # Buffers that decode writes in place keep their address, so CUDA graphs of a compiled step can replay.
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class RoutedLayer(CacheLayerMixin):
    """One layer of a routed K/V cache: a preallocated compact buffer (B, kv heads, C + room, hd) holding the C
    prompt entries that ran in this layer (right-padded per sample), then room for decode entries, filled in
    place; `valid` (B, C + room) marks the real entries. The eager decode step attends over the entries written
    so far; the fixed-shape step (`Router.compile_decode`) over the whole capacity, invalid entries masked."""

    is_compileable = False  # generate compiles no routed forward itself (see Router.compile_decode)
    is_croppable = False
    is_sliding = False

    def __init__(self, prompt_valid: torch.Tensor, room: int, progress: Progress):
        super().__init__()
        self.prompt_valid: torch.Tensor | None = prompt_valid  # (B, C) until the prefill writes the layer
        self.offset = prompt_valid.shape[1]  # where decode entries start
        self.room = room
        self.progress = progress
        self.valid: torch.Tensor | None = None
        if progress.static_length is not None:
            self.max_cache_len = progress.static_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, heads, c, _ = key_states.shape
        if c != self.offset:
            raise RuntimeError(f"A routed layer expected {self.offset} prefill entries, got {c}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, heads, c + self.room, key_states.shape[-1])
        self.values = value_states.new_zeros(b, heads, c + self.room, value_states.shape[-1])
        self.keys[:, :, :c] = key_states
        self.values[:, :, :c] = value_states
        self.valid = torch.zeros(b, c + self.room, dtype=torch.bool, device=key_states.device)
        self.valid[:, :c] = self.prompt_valid.to(key_states.device)
        self.prompt_valid = None
        static_address(self.keys, self.values, self.valid)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:  # the prefill: the compact entries of the tokens that ran in this layer
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        p, q = self.progress, key_states.shape[-2]
        if p.fixed_shapes:
            at = torch.arange(q, device=self.device) + (p.step.to(self.device) + self.offset)
            self.keys.index_copy_(2, at, key_states)
            self.values.index_copy_(2, at, value_states)
            return self.keys, self.values
        end = self.offset + p.written + q
        self.keys[:, :, end - q:end] = key_states
        self.values[:, :, end - q:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]

    def decode_mask(self, new_valid: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
        """Marks the validity of the q entries this decode step writes and returns the step's (B, 1, q, K) mask
        over this layer's keys: the valid entries, causal among the new ones. Bool for SDPA, additive for eager."""
        p, q = self.progress, new_valid.shape[1]
        new_valid = new_valid.to(self.device)  # a no-op unless layers sit on several devices
        if p.fixed_shapes:
            first = p.step.to(self.device) + self.offset
            self.valid.index_copy_(1, torch.arange(q, device=self.device) + first, new_valid)
            keys = self.valid
        else:
            first = self.offset + p.written
            self.valid[:, first:first + q] = new_valid
            keys = self.valid[:, :first + q]
        allowed = keys[:, None, None, :]
        if q > 1:
            k_index = torch.arange(keys.shape[1], device=self.device)
            q_index = torch.arange(q, device=self.device) + first
            allowed = allowed & (k_index[None, :] <= q_index[:, None])[None, None]
        if eager:
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    def grow(self, room: int) -> None:
        """Reallocate with room for `room` decode entries (a cache without a fixed capacity)."""
        extra = room - self.room
        if extra <= 0:
            return
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], 2)  # noqa: E731
        self.keys, self.values = pad(self.keys), pad(self.values)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.valid.shape[0], extra)], 1)
        self.room = room
        static_address(self.keys, self.values, self.valid)

    def get_seq_length(self) -> int:
        return self.progress.prompt_length + self.progress.written

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        s = self.progress.static_length
        return -1 if s is None else s

    def reset(self) -> None:
        self.keys = self.values = self.valid = None
        self.is_initialized = False
        self.progress.prompt_length = self.progress.written = 0
        self.progress.step.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A routed K/V cache cannot be cropped: assisted / speculative decoding is not supported under routing")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        idx = beam_idx.to(self.device)
        for t in (self.keys, self.values, self.valid):  # in place: the buffers keep their address
            t.copy_(t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys, self.values, self.valid = (t.repeat_interleave(repeats, dim=0)
                                                  for t in (self.keys, self.values, self.valid))
            static_address(self.keys, self.values, self.valid)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys, self.values, self.valid = (t[indices] for t in (self.keys, self.values, self.valid))
            static_address(self.keys, self.values, self.valid)


def routed_layers(cache) -> list[RoutedLayer] | None:
    """The layers of a cache a routed prefill filled, or None."""
    layers = getattr(cache, "layers", None)
    if layers and all(isinstance(layer, RoutedLayer) for layer in layers):
        return layers
    return None


class RoutedCache(DynamicCache):
    """The K/V cache of a routed prefill: every layer a `RoutedLayer`, holding only the tokens that ran in that
    layer (compact, right-padded per sample) and room for decode entries, with its validity mask `kv_valid[l]`
    (B, capacity). `get_seq_length` reports the logical sequence length (prompt + generated tokens, as if nothing
    had been routed). A prefill given another empty cache (a `DynamicCache`, a `StaticCache`) fills that object's
    layers the same way."""

    @property
    def kv_valid(self) -> list[torch.Tensor]:
        return [layer.valid for layer in self.layers]

    @property
    def logical_length(self) -> int:
        return self.get_seq_length()

    def kv_bytes(self) -> int:
        """Bytes held by the cached key and value tensors (padding and decode room included)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)


UNSUPPORTED_CACHES = {
    "quantized": "a quantized cache", "offloaded": "an offloaded cache", "offloaded_static": "an offloaded static cache",
}


def check_cache(cache) -> None:
    """A routed prefill fills an empty dynamic or static cache with its own layers; any other kind of cache
    would silently lose what makes it that kind, so it is refused by name."""
    kind = type(cache).__name__
    if getattr(cache, "offloading", False):
        raise ValueError(f"Routing cannot fill an offloaded {kind}: its compact per-layer K/V stays on the model's "
                         "device (use the default cache or cache_implementation='static')")
    for layer in cache.layers:
        if isinstance(layer, BaseQuantizedLayer) or not isinstance(layer, (DynamicLayer, StaticLayer, RoutedLayer)):
            raise ValueError(f"Routing cannot fill a {kind} with {type(layer).__name__} layers: it keeps its own "
                             "compact K/V per layer (use the default cache or cache_implementation='static')")


__all__ = ["Progress", "RoutedCache", "RoutedLayer", "UNSUPPORTED_CACHES", "check_cache", "routed_layers", "static_address"]
