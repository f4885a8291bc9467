"""`visroute bench`: prefill and decode latency, peak memory, executed and formula FLOPs and K/V bytes of a
real-shaped VLM with random weights, unrouted and under each routing config, each speedup beside the ideal
speedup executed FLOPs predict.

Models are built from a named shape (public configs of LLaVA-1.5-7B, Qwen2.5-VL-7B / 3B, plus scaled-down
shapes) with random weights: nothing is downloaded. The real model path runs the way a user runs it: vision tower,
projector and the routed decoder through `apply_routing` + `model(...)` / `model.generate(...)`.

Method (also printed into the JSON):
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

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from visroute.accounting import DecoderDims, account, cache_kv_bytes
from visroute.budget import PRESETS, TIERS, parse_preset, preset
from visroute.config import RoutingConfig, parse_stages
from visroute.engine import apply_routing

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# ---- shapes ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A named model shape: family, decoder and vision-tower sizes."""

    family: str  # "llava" or "qwen2.5-vl"
    preset_model: str  # the budget.MODELS entry its presets use
    text: dict[str, Any]
    vision: dict[str, Any]
    description: str


_LLAVA_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     image_size=336, patch_size=14)
_QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])

SHAPES: dict[str, ModelShape] = {
    "llava-1.5-7b": ModelShape(
        "llava", "llava-1.5",
        dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096),
        _LLAVA_VISION, "LLaVA-1.5-7B: CLIP ViT-L/14-336, 2-layer MLP projector, Vicuna-7B decoder"),
    "qwen2.5-vl-7b": ModelShape(
        "qwen2.5-vl", "qwen2.5-vl-7b",
        dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
             num_key_value_heads=4, mrope_section=[16, 24, 24], tie_word_embeddings=False),
        dict(_QWEN_VISION, out_hidden_size=3584), "Qwen2.5-VL-7B: windowed ViT (32 blocks), 28-layer decoder"),
    "qwen2.5-vl-3b": ModelShape(
        "qwen2.5-vl", "qwen2.5-vl-3b",
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
             num_key_value_heads=2, mrope_section=[16, 24, 24], tie_word_embeddings=True),
        dict(_QWEN_VISION, out_hidden_size=2048), "Qwen2.5-VL-3B: windowed ViT (32 blocks), 36-layer decoder"),
    # Scaled down: the real layer counts and visual-token counts (so presets apply unchanged), small widths.
    "llava-1.5-mini": ModelShape(
        "llava", "llava-1.5",
        dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=32, num_attention_heads=8,
             num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=4096),
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=336,
             patch_size=14), "LLaVA-1.5 layout at 1/8 width: 32 layers, 576 visual tokens"),
    "llava-1.5-tiny": ModelShape(
        "llava", "llava-1.5",
        dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=32, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=96,
             patch_size=4), "LLaVA-1.5 layout, tiny widths (tests): 32 layers, 576 visual tokens"),
    "qwen2.5-vl-mini": ModelShape(
        "qwen2.5-vl", "qwen2.5-vl-7b",
        dict(vocab_size=32064, hidden_size=512, intermediate_size=2704, num_hidden_layers=28, num_attention_heads=8,
             num_key_value_heads=2, mrope_section=[8, 12, 12], tie_word_embeddings=False),
        dict(_QWEN_VISION, depth=8, hidden_size=256, intermediate_size=684, num_heads=4, fullatt_block_indexes=[3, 7],
             out_hidden_size=512), "Qwen2.5-VL-7B layout at 1/7 width: 28 layers"),
    "qwen2.5-vl-tiny": ModelShape(
        "qwen2.5-vl", "qwen2.5-vl-7b",
        dict(vocab_size=1024, hidden_size=64, intermediate_size=172, num_hidden_layers=28, num_attention_heads=4,
             num_key_value_heads=2, mrope_section=[2, 3, 3], tie_word_embeddings=False),
        dict(_QWEN_VISION, depth=4, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1, 3],
             out_hidden_size=64), "Qwen2.5-VL layout, tiny widths (tests): 28 layers"),
}

LLAVA_IMAGE, LLAVA_PAD = 32000, 32001
QWEN_IMAGE, QWEN_VIDEO, QWEN_VSTART, QWEN_VEND = 151655, 151656, 151652, 151653


def _shape(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"Unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def model_config(name: str):
    """The transformers config of a named shape (SDPA attention)."""
    s = _shape(name)
    if s.family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        text = LlamaConfig(**s.text, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        vision = CLIPVisionConfig(**s.vision)
        side = vision.image_size // vision.patch_size
        # A tiny vocabulary still needs room for the image token id: keep the real id only when it fits.
        image_id = LLAVA_IMAGE if text.vocab_size > LLAVA_IMAGE else text.vocab_size - 2
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id,
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          image_seq_length=side * side, projector_hidden_act="gelu", tie_word_embeddings=False)
    else:
        from transformers import Qwen2_5_VLConfig

        t = dict(s.text)
        section, tie = t.pop("mrope_section"), t.pop("tie_word_embeddings")
        vocab = t["vocab_size"]
        ids = (QWEN_IMAGE, QWEN_VIDEO, QWEN_VSTART, QWEN_VEND) if vocab > QWEN_VIDEO else tuple(range(vocab - 6, vocab - 2))
        text = dict(t, rms_norm_eps=1e-6, max_position_embeddings=128000, tie_word_embeddings=tie,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(s.vision), image_token_id=ids[0],
                               video_token_id=ids[1], vision_start_token_id=ids[2], vision_end_token_id=ids[3],
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie)
    return cfg


def build_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                seed: int = 0, std: float = 0.02) -> nn.Module:
    """A random-weight model of a named shape, built directly in `dtype` on `device` (no float32 copy, no slow
    init): weights uniform with standard deviation `std`, norms 1, biases 0."""
    from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    cfg = model_config(name)
    cls = LlavaForConditionalGeneration if _shape(name).family == "llava" else Qwen2_5_VLForConditionalGeneration
    with no_init_weights(), torch.device(device):
        model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = std * math.sqrt(3.0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 or "class_embedding" in pname:
                p.uniform_(-bound, bound, generator=gen)
            elif pname.endswith("bias"):
                p.zero_()
            else:  # norm weights
                p.fill_(1.0)
    model.generation_config.pad_token_id = 0
    return model.eval()


def parse_image_size(spec: str) -> tuple[int, int]:
    try:
        h, _, w = spec.lower().partition("x")
        return int(h), int(w or h)
    except ValueError:
        raise ValueError(f"Bad image size {spec!r}: expected HxW, e.g. 672x672") from None


def make_inputs(model: nn.Module, name: str, text_tokens: int = 64, image_size: tuple[int, int] = (672, 672),
                seed: int = 0) -> dict[str, torch.Tensor]:
    """One synthetic prompt: `text_tokens` random text ids around one image's placeholders, and random pixels.
    LLaVA images are the tower's fixed size; Qwen images are resized as its processor would (multiples of 28)."""
    s = _shape(name)
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    special = min(cfg.image_token_id, getattr(cfg, "vision_start_token_id", cfg.image_token_id))
    text = torch.randint(3, max(4, min(vocab, special) - 8), (text_tokens,), generator=g).tolist()
    head, tail = text[: min(8, text_tokens // 4)], text[min(8, text_tokens // 4):]
    if s.family == "llava":
        vc = cfg.vision_config
        n = cfg.image_seq_length
        ids = [1] + head + [cfg.image_token_id] * n + tail
        pixels = torch.randn(1, 3, vc.image_size, vc.image_size, generator=g)
        out = {"input_ids": torch.tensor([ids]), "pixel_values": pixels.to(dtype)}
    else:
        vc = cfg.vision_config
        factor = vc.patch_size * vc.spatial_merge_size
        h = max(factor, round(image_size[0] / factor) * factor) // vc.patch_size
        w = max(factor, round(image_size[1] / factor) * factor) // vc.patch_size
        n = (h // vc.spatial_merge_size) * (w // vc.spatial_merge_size)
        ids = [1] + head + [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id] + tail
        types = [0] * (len(head) + 2) + [1] * n + [0] * (len(tail) + 1)
        patch_dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2
        out = {"input_ids": torch.tensor([ids]), "mm_token_type_ids": torch.tensor([types]),
               "pixel_values": torch.randn(h * w, patch_dim, generator=g).to(dtype),
               "image_grid_thw": torch.tensor([[1, h, w]])}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    return {k: v.to(device) for k, v in out.items()}


# ---- measurement ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
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


class _ScorerTimer:
    """Times the router's scorer alone (wraps its `score`)."""

    def __init__(self, router, device: torch.device):
        self.total = 0.0
        inner = router.scorer.score

        def timed(ctx):
            _sync(device)
            t0 = time.perf_counter()
            out = inner(ctx)
            _sync(device)
            self.total += time.perf_counter() - t0
            return out

        router.scorer.score = timed


def _prefill(model, inputs):
    with torch.inference_mode():
        return model(**inputs, use_cache=True, logits_to_keep=1)


def time_prefill(model, inputs, device, repeats: int, on_start: Callable[[], None] | None = None) -> list[float]:
    times = []
    for _ in range(repeats):
        if on_start:
            on_start()
        _sync(device)
        t0 = time.perf_counter()
        _prefill(model, inputs)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def time_decode(model, inputs, device, new_tokens: int, repeats: int) -> tuple[list[float], list[float]]:
    """Per repeat, `generate` `new_tokens` greedy tokens; returns (first model call times, decode step times).
    transformers encodes the images before the first model call of `generate`, so that call is the decoder
    prefill without the vision tower."""
    stamps: list[float] = []

    def stamp(*_):
        _sync(device)
        stamps.append(time.perf_counter())

    pre, post = model.register_forward_pre_hook(stamp), model.register_forward_hook(stamp)
    prefills, steps = [], []
    try:
        for _ in range(repeats):
            stamps.clear()
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               use_cache=True, pad_token_id=0)
            calls = [b - a for a, b in zip(stamps[0::2], stamps[1::2])]
            prefills.append(calls[0])
            steps.extend(calls[1:])
    finally:
        pre.remove()
        post.remove()
    return prefills, steps


def _weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the benchmark --------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    shape: str
    dtype: str = "bf16"
    device: str = "cpu"
    repeats: int = 3
    warmup: int = 1
    new_tokens: int = 16
    decode_repeats: int = 2
    text_tokens: int = 64
    image_size: tuple[int, int] = (672, 672)
    threads: int | None = None
    seed: int = 0
    keep_all: bool = True
    memory: bool = True


def default_configs(shape: str, num_visual: int, tiers=TIERS, names=tuple(PRESETS)) -> list[tuple[str, RoutingConfig]]:
    s = _shape(shape)
    layers = s.text["num_hidden_layers"]
    return [(f"{n}@{t}", preset(n, t, s.preset_model, num_visual=num_visual, num_layers=layers))
            for t in tiers for n in names]


def _measure(label, model, inputs, settings, device, router=None) -> dict[str, Any]:
    """Time prefill (and decode), measure memory; with a router, time its scorer too."""
    timer = _ScorerTimer(router, device) if router is not None and router.config.stages else None
    scoring = []

    def start():
        if timer:
            timer.total = 0.0

    def end_of(times):
        if timer:
            scoring.append(timer.total)

    for _ in range(settings.warmup):
        _prefill(model, inputs)
    prefill = []
    for _ in range(settings.repeats):
        start()
        prefill += time_prefill(model, inputs, device, 1)
        end_of(prefill)
    row: dict[str, Any] = {"label": label, "prefill_s": _stats(prefill), "prefill_times": prefill}
    if timer:
        row["scoring_s"] = _stats(scoring)
    if settings.memory:
        row["peak_bytes"] = peak_memory(lambda: _prefill(model, inputs), device)
    if settings.decode_repeats > 0 and settings.new_tokens > 1:
        gen_prefill, steps = time_decode(model, inputs, device, settings.new_tokens, settings.decode_repeats)
        row["decode_step_s"] = _stats(steps)
        row["generate_first_call_s"] = _stats(gen_prefill)
    return row


def run_bench(settings: BenchSettings, configs: list[tuple[str, RoutingConfig]] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Build the shape, measure the unrouted model and every config; returns the JSON-ready result."""
    from tqdm.auto import tqdm

    if settings.dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {settings.dtype!r}; choose one of {', '.join(DTYPES)}")
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was asked for but is not available")
    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = DTYPES[settings.dtype]
    t0 = time.perf_counter()
    model = build_model(settings.shape, dtype, device, settings.seed)
    build_s = time.perf_counter() - t0
    inputs = make_inputs(model, settings.shape, settings.text_tokens, settings.image_size, settings.seed)
    nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
    if configs is None:
        configs = default_configs(settings.shape, nv)
    element = next(model.parameters()).element_size()
    dims = DecoderDims.from_config(model.config.text_config)
    decoder_weights = _weight_bytes(model.model.language_model) + _weight_bytes(model.lm_head)

    jobs = [("unrouted", None)] + ([("keep-all (routed)", RoutingConfig("prune", "last_token_attention", []))]
                                   if settings.keep_all else []) + list(configs)
    rows = []
    bar = tqdm(jobs, desc=f"bench {settings.shape}", disable=not progress)
    for label, cfg in bar:
        bar.set_postfix_str(label)
        # Accounting: one routed prefill (with scorer FLOPs measured) gives the record and the real cache.
        probe = RoutingConfig("prune", "last_token_attention", []) if cfg is None else cfg
        with apply_routing(model, probe, measure_scorer_flops=True) as router:
            out = _prefill(model, inputs)
            record = router.last_record
        acc = account(record, model, out.past_key_values, logits_tokens=1)
        if cfg is None:  # the unrouted model's own cache
            acc.kv_bytes = cache_kv_bytes(_prefill(model, inputs).past_key_values)
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
        "shape": settings.shape, "shape_description": _shape(settings.shape).description,
        "model_config": {"decoder": dims.__dict__, "visual_tokens": nv, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                         "weight_bytes": _weight_bytes(model)},
        "settings": {**settings.__dict__, "threads": torch.get_num_threads(), "image_size": list(settings.image_size)},
        "machine": machine_info(device), "build_s": build_s, "method": __doc__.split("Method (also printed into the JSON):")[1].strip(),
        "results": rows,
    }


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


# ---- output ---------------------------------------------------------------------------------------------------
def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median'] * 1e3:.1f} [{stats['q1'] * 1e3:.1f}-{stats['q3'] * 1e3:.1f}]"


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The result as a terminal table, or as a Markdown table."""
    head = ["config", "avg_T", "prefill ms [IQR]", "speedup", "ideal", "% ideal", "decode ms/tok [IQR]", "dec x", "dec ideal",
            "exec TFLOPs", "formula TFLOPs", "K/V MiB", "peak MiB", "scoring ms (% unrouted)"]
    lines = []
    for r in result["results"]:
        acc = r["accounting"]
        score = r.get("scoring_s")
        lines.append([
            r["label"], f"{r['avg_T']:.2f}", _ms(r["prefill_s"]), f"{r['prefill_speedup']:.2f}",
            f"{r['ideal_speedup']:.2f}", f"{100 * r['fraction_of_ideal']:.0f}%", _ms(r.get("decode_step_s")),
            f"{r['decode_speedup']:.3f}" if "decode_speedup" in r else "-", f"{r['decode_ideal_speedup']:.3f}",
            f"{acc['flops']['total'] / 1e12:.3f}", f"{acc['formula_tflops']:.3f}",
            f"{(acc['kv_bytes'] or 0) / 2**20:.1f}", f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-",
            f"{score['median'] * 1e3:.1f} ({100 * r['scoring_fraction_of_unrouted_prefill']:.2f}%)" if score else "-",
        ])
    if markdown:
        rows = [head, ["---"] * len(head), *lines]
        return "\n".join("| " + " | ".join(r) + " |" for r in rows)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    m = result["machine"]
    title = (f"{result['shape']} ({result['settings']['dtype']}, {m['device']}, {result['settings']['threads']} threads, "
             f"{result['model_config']['prompt_tokens']} prompt tokens, {result['model_config']['visual_tokens']} visual)")
    return "\n".join([title, fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


# ---- CLI ------------------------------------------------------------------------------------------------------
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="latency / memory / FLOPs / K/V benchmark on a real-shaped random-weight model",
        description="Measure prefill and decode latency, peak memory, executed and formula FLOPs and K/V bytes of "
                    "a random-weight model of a named shape, unrouted and under each config, each speedup beside "
                    "the ideal speedup executed FLOPs predict. Without --preset/--config/--stages it runs every "
                    f"preset ({', '.join(PRESETS)}) at every tier ({', '.join(map(str, TIERS))}).")
    p.add_argument("--shape", required=True, help=f"model shape: {', '.join(SHAPES)}")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--preset", action="append", default=[], metavar="NAME@TIER",
                   help=f"a preset at a tier, e.g. pdrop@128 (repeatable); presets: {', '.join(PRESETS)}")
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="a routing config file (repeatable)")
    p.add_argument("--stages", action="append", default=[], metavar="SPEC",
                   help="an inline schedule, e.g. 3:82 or 2:262,7:120 (repeatable; with --action / --scorer)")
    p.add_argument("--action", default="prune", choices=["prune", "reroute"], help="action for --stages")
    p.add_argument("--scorer", default="last_token_attention", help="scorer for --preset and --stages")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per config")
    p.add_argument("--warmup", type=int, default=1, help="untimed prefills per config before timing")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per generate for decode timing")
    p.add_argument("--decode-repeats", type=int, default=2, help="generate calls per config (0: no decode timing)")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens in the prompt besides the image")
    p.add_argument("--image-size", default="672x672", help="HxW of the image (Qwen shapes; LLaVA is fixed at 336)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-keep-all", action="store_true", help="skip the routed keep-all row (engine overhead)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--out", default=None, help="JSON output file (default: bench_<shape>_<dtype>_<device>.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    s = _shape(args.shape)  # a clear error for an unknown shape before anything is built
    settings = BenchSettings(
        shape=args.shape, dtype=args.dtype, device=args.device, repeats=args.repeats,
        warmup=args.warmup, new_tokens=args.new_tokens, decode_repeats=args.decode_repeats,
        text_tokens=args.text_tokens, image_size=parse_image_size(args.image_size), threads=args.threads,
        seed=args.seed, keep_all=not args.no_keep_all, memory=not args.no_memory,
    )
    if settings.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    configs: list[tuple[str, RoutingConfig]] = []
    num_visual = _visual_count(args.shape, settings.image_size)
    for spec in args.preset:
        name, tier = parse_preset(spec)
        configs.append((spec, preset(name, tier, s.preset_model, num_visual=num_visual,
                                     num_layers=s.text["num_hidden_layers"], scorer=args.scorer)))
    for path in args.config:
        configs.append((Path(path).stem, RoutingConfig.from_yaml(path)))
    for spec in args.stages:
        configs.append((f"{args.action} {spec}", RoutingConfig(args.action, args.scorer, parse_stages(spec))))
    result = run_bench(settings, configs or None, progress=not args.quiet)
    print(format_table(result))
    out = Path(args.out or f"bench_{args.shape}_{args.dtype}_{settings.device.replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


def _visual_count(shape: str, image_size: tuple[int, int]) -> int:
    s = _shape(shape)
    if s.family == "llava":
        return (s.vision["image_size"] // s.vision["patch_size"]) ** 2
    from visroute.budget import qwen_visual_tokens

    return qwen_visual_tokens(*image_size, patch=s.vision["patch_size"], merge=s.vision["spatial_merge_size"],
                              max_pixels=10 ** 12)
