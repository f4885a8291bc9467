"""`visroute bench`: prefill and decode latency, peak memory, executed and formula FLOPs and K/V bytes of a
real-shaped VLM with random weights, unrouted and under each routing config, each speedup beside the ideal
speedup executed FLOPs predict (see `METHOD`).

Models are built from a named shape (`visroute.bench.shapes`: public configs of LLaVA-1.5-7B, Qwen2.5-VL-7B / 3B,
plus scaled-down shapes) with random weights: nothing is downloaded. The real model path runs the way a user runs
it: vision tower, projector and the routed decoder through `apply_routing` + `model(...)` / `model.generate(...)`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from visroute.accounting import DecoderDims, account, cache_kv_bytes
from visroute.bench.measure import (
    ScorerTimer,
    machine_info,
    peak_memory,
    prefill,
    stats,
    time_decode,
    time_prefill,
    weight_bytes,
)
from visroute.bench.shapes import build_model, get_shape, make_inputs
from visroute.budget import PRESETS, preset
from visroute.config import RoutingConfig
from visroute.engine import apply_routing
from visroute.loading import DTYPES

METHOD = """\
* prefill: one forward of the prompt with `logits_to_keep=1` (as `generate` does), under `torch.inference_mode`,
  after warm-up runs; median and inter-quartile range over the repeats.
* decode: `generate` with a fixed number of greedy tokens; forward hooks time every model call, the first call
  is the prefill (transformers encodes the images before it) and every later one a decode step; median and IQR
  over all decode steps of all repeats. Time spent in `generate` between model calls is not counted.
* peak memory: CUDA `max_memory_allocated` above the allocation before the call; on CPU the peak of the tensor
  bytes allocated during the call (torch profiler memory events), the same quantity on both: activations, K/V
  cache and logits, not the weights.
* scoring: the scorer's `score` timed alone in every timed prefill (summed over stages).
"""


@dataclass
class BenchSettings:
    """What `visroute bench` measures and how; each field is also a command-line flag."""

    shape: str = field(metadata={"help": "model shape (visroute.families.shapes())"})
    dtype: str = field(default="bfloat16", metadata={"help": "weights and activations", "choices": tuple(DTYPES)})
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, cuda:1, ..."})
    repeats: int = field(default=3, metadata={"help": "timed prefills per config"})
    warmup: int = field(default=1, metadata={"help": "untimed prefills per config before timing"})
    new_tokens: int = field(default=16, metadata={"help": "greedy tokens per generate for decode timing"})
    decode_repeats: int = field(default=2, metadata={"help": "generate calls per config (0: no decode timing)"})
    text_tokens: int = field(default=64, metadata={"help": "text tokens in the prompt besides the image"})
    image_size: str = field(default="672x672", metadata={"help": "HxW of the image (Qwen shapes; LLaVA's is fixed)"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's choice)"})
    seed: int = field(default=0, metadata={"help": "random weights and inputs"})
    keep_all: bool = field(default=True, metadata={"help": "measure the routed keep-all row (engine overhead)"})
    memory: bool = field(default=True, metadata={"help": "measure peak memory"})

    def __post_init__(self) -> None:
        get_shape(self.shape)  # a clear error for an unknown shape before anything is built
        if self.dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.repeats < 1:
            raise ValueError("repeats must be at least 1")
        for name in ("warmup", "new_tokens", "decode_repeats", "text_tokens", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        from visroute.bench.shapes import parse_image_size

        parse_image_size(self.image_size)

    @property
    def image_hw(self) -> tuple[int, int]:
        from visroute.bench.shapes import parse_image_size

        return parse_image_size(self.image_size)


def default_configs(shape: str, num_visual: int, tiers: tuple[int, ...] | None = None,
                    names=tuple(PRESETS)) -> list[tuple[str, RoutingConfig]]:
    """Every preset at every tier of the shape (or at `tiers`)."""
    s = get_shape(shape)
    return [(f"{n}@{t}", preset(n, t, s.name, num_visual=num_visual, num_layers=s.num_layers))
            for t in (tiers or s.tiers) for n in names]


def _measure(label, model, inputs, settings, device, router=None) -> dict[str, Any]:
    """Time prefill (and decode), measure memory; with a router, time its scorer too."""
    timer = ScorerTimer(router, device) if router is not None and router.config.stages else None
    scoring = []
    for _ in range(settings.warmup):
        prefill(model, inputs)
    times = []
    for _ in range(settings.repeats):
        if timer:
            timer.total = 0.0
        times += time_prefill(model, inputs, device, 1)
        if timer:
            scoring.append(timer.total)
    row: dict[str, Any] = {"label": label, "prefill_s": stats(times), "prefill_times": times}
    if timer:
        row["scoring_s"] = stats(scoring)
    if settings.memory:
        row["peak_bytes"] = peak_memory(lambda: prefill(model, inputs), device)
    if settings.decode_repeats > 0 and settings.new_tokens > 1:
        gen_prefill, steps = time_decode(model, inputs, device, settings.new_tokens, settings.decode_repeats)
        row["decode_step_s"] = stats(steps)
        row["generate_first_call_s"] = stats(gen_prefill)
    return row


def run_bench(settings: BenchSettings, configs: list[tuple[str, RoutingConfig]] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Build the shape, measure the unrouted model and every config; returns the JSON-ready result."""
    from tqdm.auto import tqdm

    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but is not available")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = DTYPES[settings.dtype]
    t0 = time.perf_counter()
    model = build_model(settings.shape, dtype, device, settings.seed)
    build_s = time.perf_counter() - t0
    inputs = make_inputs(model, settings.shape, settings.text_tokens, settings.image_hw, settings.seed)
    nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if configs is None:
        configs = default_configs(settings.shape, nv)
    element = next(model.parameters()).element_size()
    dims = DecoderDims.from_config(model.config.text_config)
    decoder_weights = weight_bytes(model.model.language_model) + weight_bytes(model.lm_head)

    jobs = [("unrouted", None)] + ([("keep-all (routed)", RoutingConfig())] if settings.keep_all else []) + list(configs)
    rows = []
    bar = tqdm(jobs, desc=f"bench {settings.shape}", disable=not progress)
    for label, cfg in bar:
        bar.set_postfix_str(label)
        # Accounting: one routed prefill (with scorer FLOPs measured) gives the record and the real cache.
        probe = RoutingConfig() if cfg is None else cfg
        with apply_routing(model, probe, measure_scorer_flops=True) as router:
            out = prefill(model, inputs)
            record = router.last_record
        acc = account(record, model, out.past_key_values, logits_tokens=1)
        if cfg is None:  # the unrouted model's own cache
            acc.kv_bytes = cache_kv_bytes(prefill(model, inputs).past_key_values)
        del out
        if cfg is None:
            row = _measure(label, model, inputs, settings, device)
        else:
            with apply_routing(model, cfg) as router:
                row = _measure(label, model, inputs, settings, device, router)
        row.update(
            config=None if cfg is None else cfg.to_dict(),
            avg_T=acc.avg_T if cfg is not None else float(nv),
            accounting=acc.to_dict(),
            kv_active_tokens=[int(v) for v in record.kv_tokens[:, 0]],
            decode_ideal_speedup=(decoder_weights + acc.kv_bytes_unrouted) / (decoder_weights + (acc.kv_bytes or 0)),
        )
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["prefill_speedup"] = base["prefill_s"]["median"] / row["prefill_s"]["median"]
        row["ideal_speedup"] = base["accounting"]["flops"]["total"] / row["accounting"]["flops"]["total"]
        row["fraction_of_ideal"] = row["prefill_speedup"] / row["ideal_speedup"]
        if "scoring_s" in row:
            row["scoring_fraction_of_unrouted_prefill"] = row["scoring_s"]["median"] / base["prefill_s"]["median"]
        if "decode_step_s" in row and "decode_step_s" in base:
            row["decode_speedup"] = base["decode_step_s"]["median"] / row["decode_step_s"]["median"]
    return {
        "shape": settings.shape, "shape_description": get_shape(settings.shape).description,
        "model_config": {"decoder": dims.__dict__, "visual_tokens": nv, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                         "weight_bytes": weight_bytes(model)},
        "settings": {**settings.__dict__, "threads": torch.get_num_threads()},
        "machine": machine_info(device), "build_s": build_s, "method": METHOD,
        "results": rows,
    }


