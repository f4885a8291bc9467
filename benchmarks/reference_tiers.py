"""Measure the avg_T that the Reroute reference configs (github.com/elmma/mllm-reroute, configs/experiment/)
actually reach, next to visroute's presets, by running routed prefills through the engine and reading the
record (visroute.accounting), on random-weight models with the real layer and visual-token counts.

    python benchmarks/reference_tiers.py [--out benchmarks/results/reference_tiers.json]

The reference keep ratios are fractions of the visual tokens, floored per sample as their router does;
"physical_delete" runs as prune, "compact_route" (monotonic: false) as reroute.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from visroute import RoutingConfig, Stage, apply_routing
from visroute.accounting import account
from visroute.bench import build_model, make_inputs
from visroute.budget import PRESETS, TIERS, preset

# (method, action, layers on a 32-layer decoder, layers on a 28-layer decoder, {tier: keep ratios}),
# as the reference configs state them (the Qwen configs reuse the LLaVA ratios with normalised layers).
REFERENCE = [
    ("FastV K=3", "prune", [3], [3], {192: [0.2644], 128: [0.1418], 64: [0.01916]}),
    ("PDrop earlyL2", "prune", [2, 7, 15, 23], [2, 6, 13, 20],
     {192: [0.5965, 0.3558, 0.2123, 0.1266], 128: [0.4570, 0.2088, 0.0954, 0.0436], 64: [0.2789, 0.0937, 0.0315, 0.0106]}),
    ("Ours-vs-FastV (reroute)", "reroute", [3, 7, 15, 23], [3, 6, 13, 20],
     {192: [0.2644] * 4, 128: [0.1418] * 4, 64: [0.01916] * 4}),
    ("Ours-vs-PDrop (reroute)", "reroute", [2, 7, 15, 23], [2, 6, 13, 20],
     {192: [0.4502, 0.4502, 0.2251, 0.1126], 128: [0.2655, 0.2655, 0.1328, 0.0664], 64: [0.1392, 0.1392, 0.0696, 0.0348]}),
]

# (label, shape, image size, preset model): LLaVA-1.5 (32 layers, 576 tokens); Qwen2.5-VL-7B (28 layers) with a
# 672x672 image (576 tokens) and a 640x480 image as in POPE / COCO (391 tokens).
TARGETS = [
    ("LLaVA-1.5-7B, 576 visual", "llava-1.5-tiny", (336, 336), "llava-1.5"),
    ("Qwen2.5-VL-7B, 672x672 image", "qwen2.5-vl-tiny", (672, 672), "qwen2.5-vl-7b"),
    ("Qwen2.5-VL-7B, 640x480 image", "qwen2.5-vl-tiny", (480, 640), "qwen2.5-vl-7b"),
]


def measured_avg_T(model, inputs, cfg: RoutingConfig) -> float:
    with apply_routing(model, cfg) as router, torch.inference_mode():
        model(**inputs)
        return account(router.last_record, model).avg_T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/reference_tiers.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for label, shape, image, preset_model in TARGETS:
        model = build_model(shape, torch.float32)
        inputs = make_inputs(model, shape, text_tokens=16, image_size=image)
        nv = int((inputs["input_ids"] == model.config.image_token_id).sum())
        n_layers = model.config.text_config.num_hidden_layers
        for method, action, l32, l28, ratios in REFERENCE:
            layers = l32 if n_layers == 32 else l28
            for tier in TIERS:
                cfg = RoutingConfig(action, "last_token_attention",
                                    [Stage(l, float(r)) for l, r in zip(layers, ratios[tier])])
                rows.append({"model": label, "visual": nv, "layers": n_layers, "source": "reference", "method": method,
                             "tier": tier, "stages": [s.to_dict() for s in cfg.stages],
                             "avg_T": measured_avg_T(model, inputs, cfg)})
        for name in PRESETS:
            for tier in TIERS:
                cfg = preset(name, tier, preset_model, num_visual=nv)
                rows.append({"model": label, "visual": nv, "layers": n_layers, "source": "visroute", "method": name,
                             "tier": tier, "stages": [s.to_dict() for s in cfg.stages],
                             "avg_T": measured_avg_T(model, inputs, cfg)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print("| model | source | method | avg 192 | avg 128 | avg 64 |")
    print("|---|---|---|---|---|---|")
    keyed = {}
    for r in rows:
        keyed.setdefault((r["model"], r["source"], r["method"]), {})[r["tier"]] = r["avg_T"]
    for (model, source, method), by_tier in keyed.items():
        cells = " | ".join(f"{by_tier[t]:.2f}" for t in TIERS)
        print(f"| {model} | {source} | {method} | {cells} |")


if __name__ == "__main__":
    main()
