"""`visroute bench`: prefill latency at a batch of prompts, decode latency at several batch sizes, peak memory,
executed and formula FLOPs and K/V bytes of a real-shaped VLM with random weights, unrouted and under each routing
config, each speedup beside its ideal: executed FLOPs for prefill, bytes read per step for decode (see `METHOD`).

Models are built from a named shape (`visroute.bench.shapes`: public configs of LLaVA-1.5-7B, Qwen2.5-VL-7B / 3B,
plus scaled-down shapes) with random weights: nothing is downloaded. The real model path runs the way a user runs
it: vision tower, projector and the routed decoder through `apply_routing` + `model(...)`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from typing import Any

import torch

from visroute.accounting import DecoderDims, account, cache_kv_bytes, unrouted_record
from visroute.bench.measure import (
    ScorerTimer,
    machine_info,
    peak_memory,
    prefill,
    stats,
    time_batched_decode,
    time_prefill,
    weight_bytes,
)
from visroute.bench.settings import BenchSettings
from visroute.bench.shapes import build_model, get_shape, make_inputs, repeat_inputs
from visroute.budget import PRESETS, preset
from visroute.config import RoutingConfig
from visroute.engine import apply_routing
from visroute.loading import DTYPES

METHOD = """\
* prefill: one forward of `prefill_batch` copies of the prompt with `logits_to_keep=1` (as `generate` does), under
  `torch.inference_mode`, after warm-up runs; median and inter-quartile range over the repeats, which are
  interleaved: round r times every config once, the order rotating, so that changes in the machine's load reach
  every config alike. FLOPs, K/V and the prefill ideal (unrouted / routed executed FLOPs) come from one
  accounting prefill of one prompt.
* decode, at each of `decode_batches`: one prefill of the prompt, its cache expanded to the batch
  (`batch_repeat_interleave`), then `new_tokens` greedy steps of every row, each one model call with
  `logits_to_keep=1`; the first step untimed; median and IQR over the timed steps of `decode_repeats` runs.
  The runs are interleaved as the prefill repeats are.
  Routed configs decode on their preallocated cache (prompt entries + room for the steps, as `generate` sizes
  it); the unrouted model on its default `DynamicCache` and, in the row "unrouted (StaticCache)", on
  transformers' `StaticCache` (a decode-only row). Tokens per second: batch / median step time.
* decode ideal (bandwidth): bytes one step must read, the decoder and LM-head weights (not the embedding table)
  plus the valid K/V entries each layer attends to (the prompt entries cached there + the tokens decoded so
  far, averaged over the timed steps); ideal speedup = unrouted bytes / the config's bytes at the same batch.
  "% ideal" = speedup / ideal speedup; "% gain" = (speedup - 1) / (ideal speedup - 1); "vs static" and
  "vs keep-all": the speedup over those rows at the same batch.
* peak memory: CUDA `max_memory_allocated` above the allocation before the call; on CPU the peak of the tensor
  bytes allocated during the call (torch profiler memory events), the same quantity on both: activations, K/V
  cache and logits, not the weights; for one prefill of one prompt.
* scoring: the scorer's `score` timed alone in every timed prefill (summed over stages).
"""


def default_configs(shape: str, num_visual: int, tiers: tuple[int, ...] | None = None,
                    names=tuple(PRESETS)) -> list[tuple[str, RoutingConfig]]:
    """Every preset at every tier of the shape (or at `tiers`)."""
    s = get_shape(shape)
    return [(f"{n}@{t}", preset(n, t, s.name, num_visual=num_visual, num_layers=s.num_layers))
            for t in (tiers or s.tiers) for n in names]


def _routing(model, cfg: RoutingConfig | None):
    """apply_routing(model, cfg) as a context (the router), or nothing for the unrouted model (None)."""
    return apply_routing(model, cfg) if cfg is not None else contextlib.nullcontext()


def _rounds(repeats: int, n: int) -> list[tuple[int, int]]:
    """(round, job) for `repeats` rounds over `n` jobs, each round starting one job later than the last."""
    return [(r, (r + k) % n) for r in range(repeats) for k in range(n)]


def _measure_prefill(jobs, rows, model, inputs, settings, device, progress: bool) -> None:
    """Warm up each config and measure its memory, then time prefill at the prefill batch (with a router, its
    scorer too) in interleaved rounds: every config once per round, the order rotating, so that a change in the
    machine's load reaches every config alike."""
    from tqdm.auto import tqdm

    batched = repeat_inputs(inputs, settings.prefill_batch)
    for (_, cfg), row in zip(jobs, rows):
        with _routing(model, cfg):
            for _ in range(settings.warmup):
                prefill(model, batched)
            if settings.memory:
                row["peak_bytes"] = peak_memory(lambda: prefill(model, inputs), device)
    times: dict[int, list[float]] = {j: [] for j in range(len(jobs))}
    scoring: dict[int, list[float]] = {j: [] for j in range(len(jobs))}
    for _, j in tqdm(_rounds(settings.repeats, len(jobs)), desc="prefill", disable=not progress):
        with _routing(model, jobs[j][1]) as router:
            timer = ScorerTimer(router, device) if router is not None and router.config.stages else None
            times[j] += time_prefill(model, batched, device, 1)
            if timer:
                scoring[j].append(timer.total)
    for j, row in enumerate(rows):
        row.update(prefill_batch=settings.prefill_batch, prefill_s=stats(times[j]), prefill_times=times[j])
        if scoring[j]:
            row["scoring_s"] = stats(scoring[j])


def _measure_decode(jobs, rows, model, inputs, settings, device, progress: bool) -> None:
    """Time decode at each batch, every config's runs interleaved: run r times each config in turn (the order
    rotating by one each run), so that a change in the machine's load reaches every config alike. `jobs` are
    (label, config, static cache) for `rows`."""
    from tqdm.auto import tqdm

    for row in rows:
        row["decode"] = []
    if settings.decode_repeats == 0 or settings.new_tokens < 2:
        return
    blocks = [(batch, j) for batch in settings.batches for _, j in _rounds(settings.decode_repeats, len(jobs))]
    times: dict[tuple[int, int], list[float]] = {}
    held: dict[tuple[int, int], int] = {}
    for batch, j in tqdm(blocks, desc="decode", disable=not progress):
        _, cfg, static = jobs[j]
        with _routing(model, cfg):
            steps, held[batch, j] = time_batched_decode(model, inputs, device, batch, settings.new_tokens, 1,
                                                        static=static)
        times.setdefault((batch, j), []).extend(steps)
    for j, row in enumerate(rows):
        for batch in settings.batches:
            steps = times[batch, j]
            row["decode"].append({"batch": batch, "step_s": stats(steps), "step_times": steps,
                                  "kv_bytes": held[batch, j], "tokens_per_s": batch / statistics.median(steps)})
        if settings.batches[0] == 1:
            row["decode_step_s"] = row["decode"][0]["step_s"]


def decode_bytes(kv_tokens: list[int], batch: int, new_tokens: int, dims: DecoderDims, element: int) -> float:
    """K/V bytes one timed decode step reads at `batch` copies of a prompt whose layers cache `kv_tokens`
    entries: per layer its prompt entries + the tokens decoded so far (this one included), averaged over the timed
    steps 2..new_tokens."""
    decoded = sum(range(2, new_tokens + 1)) / max(1, new_tokens - 1)
    return batch * (sum(kv_tokens) + len(kv_tokens) * decoded) * dims.kv_bytes_per_token(element)


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
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    model = build_model(settings.shape, dtype, device, settings.seed)
    build_s = time.perf_counter() - t0
    inputs = make_inputs(model, settings.shape, settings.text_tokens, settings.image_hw, settings.seed)
    nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if configs is None:
        configs = default_configs(settings.shape, nv)
    element = next(model.parameters()).element_size()
    dims = DecoderDims.from_config(model.config.text_config)
    lm = model.model.language_model
    # what one decode step reads besides the K/V: every decoder and LM-head weight, not the embedding table
    step_weights = weight_bytes(lm) - weight_bytes(lm.embed_tokens) + weight_bytes(model.lm_head)

    jobs = [("unrouted", None)] + ([("keep-all (routed)", RoutingConfig())] if settings.keep_all else []) + list(configs)
    rows = []
    bar = tqdm(jobs, desc=f"accounting {settings.shape}", disable=not progress)
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
        kv_tokens = [int(v) for v in (unrouted_record(record) if cfg is None else record).kv_tokens[:, 0]]
        row: dict[str, Any] = dict(
            label=label, config=None if cfg is None else cfg.to_dict(),
            avg_T=acc.avg_T if cfg is not None else float(nv),
            accounting=acc.to_dict(),
            kv_active_tokens=kv_tokens,
        )
        rows.append(row)
    _measure_prefill(jobs, rows, model, inputs, settings, device, progress)
    # decode: the same rows (routed ones on their preallocated cache), and the unrouted model on a static cache
    decode_jobs = [(label, cfg, cfg is not None) for label, cfg in jobs]
    static_rows = []
    if settings.static_baseline:
        decode_jobs.insert(1, ("unrouted (StaticCache)", None, True))
        static_rows = [{key: rows[0][key] for key in ("config", "avg_T", "kv_active_tokens")}]
        static_rows[0]["label"] = "unrouted (StaticCache)"
    decode_rows = rows[:1] + static_rows + rows[1:]
    _measure_decode(decode_jobs, decode_rows, model, inputs, settings, device, progress)
    static_row = static_rows[0] if static_rows else None
    for row in decode_rows:
        for d in row["decode"]:
            d["kv_read_bytes"] = decode_bytes(row["kv_active_tokens"], d["batch"], settings.new_tokens, dims, element)
            d["step_bytes"] = step_weights + d["kv_read_bytes"]
    base = rows[0]
    keep_all = rows[1] if settings.keep_all else None
    for row in rows:
        row["prefill_speedup"] = base["prefill_s"]["median"] / row["prefill_s"]["median"]
        row["ideal_speedup"] = base["accounting"]["flops"]["total"] / row["accounting"]["flops"]["total"]
        row["fraction_of_ideal"] = row["prefill_speedup"] / row["ideal_speedup"]
        if "scoring_s" in row:
            row["scoring_fraction_of_unrouted_prefill"] = row["scoring_s"]["median"] / base["prefill_s"]["median"]
    for row in decode_rows:
        for d, b in zip(row["decode"], base["decode"]):
            d["speedup"] = b["step_s"]["median"] / d["step_s"]["median"]
            d["ideal_speedup"] = b["step_bytes"] / d["step_bytes"]
            d["fraction_of_ideal"] = d["speedup"] / d["ideal_speedup"]
            gain = d["ideal_speedup"] - 1
            d["fraction_of_ideal_gain"] = (d["speedup"] - 1) / gain if gain > 1e-9 else None
            for name, other in (("keep_all", keep_all), ("static", static_row)):
                if other is not None:
                    o = next(x for x in other["decode"] if x["batch"] == d["batch"])
                    d[f"speedup_vs_{name}"] = o["step_s"]["median"] / d["step_s"]["median"]
        if row["decode"] and row["decode"][0]["batch"] == 1:  # the batch-1 numbers under their earlier names
            row["decode_speedup"] = row["decode"][0]["speedup"]
            row["decode_ideal_speedup"] = row["decode"][0]["ideal_speedup"]
    return {
        "shape": settings.shape, "shape_description": get_shape(settings.shape).description,
        "model_config": {"decoder": dims.__dict__, "visual_tokens": nv, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                         "weight_bytes": weight_bytes(model), "decode_step_weight_bytes": step_weights},
        "settings": {**settings.__dict__, "threads": torch.get_num_threads()},
        "machine": machine_info(device), "build_s": build_s, "method": METHOD,
        # the machine's load (1, 5, 15-minute averages) when the run began and ended: what else was running
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "results": rows,
        "decode_only": static_rows,  # rows timed for decode alone (no prefill of their own)
    }
