"""`visroute bench` on a real shape whose bf16 weights do not fit next to the other jobs of a small machine: the
same measurement (`visroute.bench.run_bench`), with every decoder layer a separate module (its own K/V cache
slot) that shares one set of random weights with the others. Each layer's matrix products, attention and memory
traffic are those of the real shape (one layer's weights are hundreds of MB, far beyond any cache, so every
layer still streams them from memory); only the resident weight memory shrinks. FLOPs, the ideal speedups and
K/V come from the real configuration as in `visroute bench`.

    python benchmarks/shared_layer_bench.py --shape llava-next-7b --preset pdrop@320 --image-size 672x672 \\
        --threads 1 --repeats 2 --warmup 0 --out benchmarks/results/llava-next-7b_bf16_cpu_t1_avg320.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from visroute.bench import format_table, run_bench, visual_count
from visroute.bench import run as bench_run
from visroute.bench import shapes as bench_shapes
from visroute.bench.run import BenchSettings
from visroute.bench.shapes import model_config
from visroute.budget import parse_preset, preset
from visroute.families import get_shape


def _shared_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` and its submodules whose parameters and buffers are the original's tensors."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: None if m is None else _shared_copy(m) for k, m in module._modules.items()}
    return new


def build_shared(name: str, dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0) -> nn.Module:
    """The shape `name` as `visroute.bench.build_model` builds it (random weights, built in `dtype`), with one
    decoder layer whose weights every other decoder layer shares."""
    cfg = model_config(name)
    layers = cfg.text_config.num_hidden_layers
    cfg.text_config.num_hidden_layers = 1
    real = bench_shapes.model_config
    bench_shapes.model_config = lambda _: cfg
    try:
        model = bench_shapes.build_model(name, dtype, device, seed)
    finally:
        bench_shapes.model_config = real
    lm = model.model.language_model
    first = lm.layers[0]
    copies = [first]
    for i in range(1, layers):
        layer = _shared_copy(first)
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
        copies.append(layer)
    lm.layers = nn.ModuleList(copies)
    for c in {id(model.config.text_config): model.config.text_config, id(lm.config): lm.config}.values():
        c.num_hidden_layers = layers
    return model


def time_image_encoding(name: str, settings: BenchSettings) -> dict:
    """Median and IQR of the model's own image encoding (`get_image_features`: tower, projector, the family's
    layout) of the bench prompt's image, one at a time, `settings.repeats` times after one warm-up."""
    import time

    from visroute.bench import make_inputs
    from visroute.bench.measure import stats

    model = build_shared(name, torch.bfloat16, settings.device, settings.seed)
    inputs = make_inputs(model, name, settings.text_tokens, settings.image_hw, settings.seed)
    image = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    times = []
    with torch.inference_mode():
        for i in range(settings.repeats + 1):
            start = time.perf_counter()
            model.model.get_image_features(**image)
            if i:
                times.append(time.perf_counter() - start)
    return stats(times)


def interleaved(name: str, settings: BenchSettings, configs, rounds: int) -> dict:
    """Prefill times of the unrouted model and every config, one prefill of each in turn per round (after one
    untimed accounting prefill of each), with each config's executed FLOPs and ideal speedup as `visroute bench`
    counts them."""
    import statistics
    import time

    from visroute import RoutingConfig, apply_routing
    from visroute.accounting import account
    from visroute.bench import make_inputs
    from visroute.bench.measure import machine_info, prefill, stats

    model = build_shared(name, torch.bfloat16, settings.device, settings.seed)
    inputs = make_inputs(model, name, settings.text_tokens, settings.image_hw, settings.seed)
    jobs = [("unrouted", None)] + ([("keep-all (routed)", RoutingConfig())] if settings.keep_all else []) + configs
    rows = []
    for label, cfg in jobs:
        with apply_routing(model, cfg or RoutingConfig(), measure_scorer_flops=True) as router:
            out = prefill(model, inputs)
            acc = account(router.last_record, model, out.past_key_values, logits_tokens=1)
        rows.append({"label": label, "config": None if cfg is None else cfg.to_dict(), "avg_T": acc.avg_T,
                     "flops": acc.to_dict()["flops"], "times": []})
    start_load = list(os.getloadavg())
    for _ in range(rounds):
        for (label, cfg), row in zip(jobs, rows):
            router = apply_routing(model, cfg) if cfg is not None else None
            try:
                begin = time.perf_counter()
                prefill(model, inputs)
                row["times"].append(time.perf_counter() - begin)
            finally:
                if router is not None:
                    router.remove()
    base = rows[0]
    for row in rows:
        row["prefill_s"] = stats(row["times"])
        row["speedup_rounds"] = [u / t for u, t in zip(base["times"], row["times"])]
        row["speedup_median"] = statistics.median(row["speedup_rounds"])
        row["ideal_speedup"] = base["flops"]["total"] / row["flops"]["total"]
    return {"shape": name, "settings": {**settings.__dict__, "rounds": rounds, "threads": torch.get_num_threads()},
            "machine": machine_info(torch.device(settings.device)),
            "load_average": {"start": start_load, "end": list(os.getloadavg())},
            "weights": "decoder layers share one set of random weights (benchmarks/shared_layer_bench.py)",
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "visual_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()), "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", required=True)
    parser.add_argument("--preset", action="append", default=[], metavar="NAME@TIER")
    parser.add_argument("--image-size", default="672x672")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--prefill-batch", type=int, default=1, help="copies of the prompt per timed prefill")
    parser.add_argument("--keep-all", action="store_true", help="also the routed keep-all row")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="instead of the bench's config-after-config timing: ROUNDS rounds, each timing one prefill "
                             "of every config in turn, and each config's speedup as the median over rounds of "
                             "(unrouted time / its time) in the same round (robust to a neighbour's load drifting)")
    parser.add_argument("--tower-only", action="store_true",
                        help="only time the image encoding alone (vision tower, projector, layout) of one prompt")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    settings = BenchSettings(shape=args.shape, dtype="bfloat16", repeats=args.repeats, warmup=args.warmup,
                             prefill_batch=args.prefill_batch, decode_repeats=0, text_tokens=args.text_tokens,
                             image_size=args.image_size,
                             threads=args.threads, keep_all=args.keep_all, memory=False)
    shape = get_shape(args.shape)
    num_visual = visual_count(args.shape, settings.image_hw)
    configs = []
    for spec in args.preset:
        name, tier = parse_preset(spec, shape.tiers)
        configs.append((spec, preset(name, tier, shape.name, num_visual=num_visual, num_layers=shape.num_layers)))
    if args.interleave:
        torch.set_num_threads(args.threads)
        result = interleaved(args.shape, settings, configs, args.interleave)
        for row in result["results"]:
            print(f"{row['label']}: avg_T {row['avg_T']:.2f}, prefill {row['prefill_s']['median']:.2f} s, speedup "
                  f"{row['speedup_median']:.2f} (rounds {', '.join(f'{x:.2f}' for x in row['speedup_rounds'])}), "
                  f"ideal {row['ideal_speedup']:.2f}, {100 * row['speedup_median'] / row['ideal_speedup']:.0f}% of ideal")
    elif args.tower_only:
        torch.set_num_threads(args.threads)
        result = {"shape": args.shape, "settings": settings.__dict__,
                  "image_encoding_s": time_image_encoding(args.shape, settings)}
        print(result["image_encoding_s"])
    else:
        bench_run.build_model = build_shared  # the one difference from `visroute bench`
        result = run_bench(settings, configs or None)
        result["weights"] = "decoder layers share one set of random weights (benchmarks/shared_layer_bench.py)"
        print(format_table(result, markdown=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
