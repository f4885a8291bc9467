"""The selectors' own cost on CPU: each selection primitive of `visroute.scoring.selection` (and DivPrune's greedy,
for comparison) timed on random features of one image at the widths the methods read, for 576 visual tokens
(LLaVA-1.5-7B: tower 1024, projected 4096) and 2,928 (a large Qwen2.5-VL-7B image: 3584, no tower features per
token, so every selector reads the merger output), at keeps of 64, 128 and 192 (and a quarter of 2,928).

    python benchmarks/selector_cost.py [--threads 1] [--repeats 3] [--json benchmarks/results/selector_cost.json]

Wall-clock medians in milliseconds, fp32. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from visroute.scoring.selection import (
    cdpruner_relevance,
    conditional_dpp,
    holov_crops,
    importance_then_diversity,
    region_quotas,
    saliency_coverage,
)

# (label, tokens, tower width, projected width)
SHAPES = [("LLaVA-1.5-7B", 576, 1024, 4096), ("Qwen2.5-VL-7B", 2928, 3584, 3584)]


def divprune(x: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune's greedy max-min, as the `diversity` scorer runs it (one image)."""
    x = F.normalize(x.float(), dim=-1)
    sim = x @ x.T
    nearest = sim.fill_diagonal_(float("-inf")).amax(1)
    pool = torch.ones(x.shape[0], dtype=torch.bool)
    min_dist = torch.full((x.shape[0],), float("inf"))
    picks = []
    for t in range(keep):
        gain = (1 - nearest) if t == 0 else min_dist
        j = int(gain.masked_fill(~pool, float("-inf")).argmax())
        picks.append(j)
        pool[j] = False
        min_dist = torch.minimum(min_dist, 1 - x @ x[j])
    return torch.tensor(picks)


def selectors(n: int, tower: int, projected: int, keep: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(n, generator=g)
    xt = torch.randn(n, tower, generator=g)
    xp = torch.randn(n, projected, generator=g)
    text = torch.randn(24, projected, generator=g)
    return {
        "vispruner": lambda: importance_then_diversity(att, xt, keep, keep // 2),
        "cdpruner": lambda: conditional_dpp(xp, cdpruner_relevance(xp, text), keep),
        "holov": lambda: region_quotas(att, xp, keep, holov_crops(n, keep)),
        "scope": lambda: saliency_coverage(att, xt, keep),
        "divprune": lambda: divprune(xp, keep),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    cases = [(s, k) for s in SHAPES for k in (64, 128, 192)] + [(SHAPES[1], SHAPES[1][1] // 4)]
    for (label, n, tower, projected), keep in tqdm(cases, desc="shapes"):
        for name, run in selectors(n, tower, projected, keep).items():
            run()  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                times.append(1e3 * (time.perf_counter() - start))
            rows.append({"model": label, "tokens": n, "keep": keep, "selector": name,
                         "ms": statistics.median(times), "runs": times})
    names = list(dict.fromkeys(r["selector"] for r in rows))
    print(f"threads={args.threads}, repeats={args.repeats}, median ms\n")
    print("| shape (tokens) | keep | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for (label, n, _, _), keep in cases:
        cells = [next(r["ms"] for r in rows if r["tokens"] == n and r["keep"] == keep and r["selector"] == s)
                 for s in names]
        print(f"| {label} ({n}) | {keep} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
