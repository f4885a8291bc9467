"""Timing and memory measurement for `visroute bench`: prefill and decode timers, the scorer's own time, peak
tensor memory, and the machine the numbers come from."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "q1": q[0], "q3": q[2], "min": v[0], "max": v[-1], "n": len(v)}


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated for tensors during `fn()` above what was allocated before (weights excluded)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


class ScorerTimer:
    """Times the router's scorers alone (wraps the `score` of each)."""

    def __init__(self, router, device: torch.device):
        self.total = 0.0
        for scorer in router.scorers.values():
            scorer.score = self._timed(scorer.score, device)

    def _timed(self, inner, device):
        def timed(ctx):
            sync(device)
            t0 = time.perf_counter()
            out = inner(ctx)
            sync(device)
            self.total += time.perf_counter() - t0
            return out

        return timed


def prefill(model, inputs):
    with torch.inference_mode():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def time_prefill(model, inputs, device, repeats: int, on_start: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if on_start:
            on_start()
        sync(device)
        t0 = time.perf_counter()
        prefill(model, inputs)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _expand_static(cache, batch: int) -> None:
    """transformers' StaticCache has no `batch_repeat_interleave`: repeat each layer's buffers in place of it."""
    for layer in cache.layers:
        layer.keys = layer.keys.repeat_interleave(batch, dim=0)
        layer.values = layer.values.repeat_interleave(batch, dim=0)
        layer.batch_size = batch


def time_batched_decode(model, inputs, device, batch: int, steps: int, repeats: int,
                        static: bool) -> tuple[list[float], int]:
    """Decode step times at `batch` sequences. Per repeat: one prefill of the one-prompt `inputs` (with `static`,
    into a static cache of the prompt + `steps` tokens, which a routed prefill fills with its preallocated layers;
    otherwise the model's default cache), the cache expanded to `batch` copies (`batch_repeat_interleave`: the
    same shapes as `batch` prompts, without `batch` prefills), then `steps` greedy decode steps of all rows, each
    one model call with `logits_to_keep=1` as `generate` makes it; the first step is a warm-up, the others are
    timed. Returns (step times, bytes of the K/V the cache holds at `batch`)."""
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    from visroute.accounting import cache_kv_bytes

    times: list[float] = []
    held = 0
    length = inputs["input_ids"].shape[1]
    for _ in range(repeats):
        with torch.inference_mode():
            cache = StaticCache(config=model.config, max_cache_len=length + steps) if static else None
            out = model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if isinstance(cache, StaticCache) and all(type(layer) is StaticLayer for layer in cache.layers):
                _expand_static(cache, batch)  # the unrouted model's own static cache
            else:
                cache.batch_repeat_interleave(batch)
            token = out.logits[:, -1:].argmax(-1).repeat(batch, 1)  # (batch, 1)
            del out
            for i in range(steps):
                sync(device)
                t0 = time.perf_counter()
                out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                sync(device)
                if i:
                    times.append(time.perf_counter() - t0)
                token = out.logits[:, -1:].argmax(-1)
            held = cache_kv_bytes(cache)
            del cache, out
    return times, held


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
