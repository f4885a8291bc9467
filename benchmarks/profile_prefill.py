"""Where a prefill's time goes: torch profiler self time by operator group, unrouted and under presets, on a
random-weight model of a named shape. It answers "does the routed decoder waste time outside the layers?".

    python benchmarks/profile_prefill.py --shape llava-1.5-7b --preset pdrop@128 --preset reroute-pdrop@128
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from visroute import apply_routing
from visroute.bench import DTYPES, SHAPES, build_model, make_inputs
from visroute.bench.measure import prefill as _prefill
from visroute.budget import parse_preset, preset

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                  "aten::_softmax", "aten::_efficient_attention_forward", "aten::_flash_attention_forward"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution"),
    "gather/scatter/index": ("aten::gather", "aten::scatter_", "aten::scatter", "aten::index", "aten::index_select",
                             "aten::cat", "aten::sort", "aten::nonzero", "aten::cumsum", "aten::masked_fill_"),
}


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "elementwise/other"


def profile_once(model, inputs) -> dict[str, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("prefill"):
            _prefill(model, inputs)
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.key == "prefill":
            continue
        out[group_of(ev.key)] += ev.self_cpu_time_total / 1e6
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llava-1.5-7b", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--preset", action="append", default=[])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, DTYPES[args.dtype])
    inputs = make_inputs(model, args.shape)
    nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
    shape = SHAPES[args.shape]
    results = {}
    jobs = [("unrouted", None)] + [(s, preset(*parse_preset(s), shape.name, num_visual=nv,
                                              num_layers=shape.text["num_hidden_layers"])) for s in args.preset]
    for label, cfg in jobs:
        router = apply_routing(model, cfg) if cfg is not None else None
        try:
            _prefill(model, inputs)  # warm-up
            t0 = time.perf_counter()
            _prefill(model, inputs)
            wall = time.perf_counter() - t0
            groups = profile_once(model, inputs)
        finally:
            if router is not None:
                router.remove()
        results[label] = {"wall_s": wall, "self_s_by_group": groups}
        parts = ", ".join(f"{g} {s:.2f}s" for g, s in sorted(groups.items(), key=lambda kv: -kv[1]))
        print(f"{label}: wall {wall:.2f}s; profiled self time: {parts}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
