"""What the evaluation harness costs on top of the model calls: items per second of a `visroute study` run
against a bare batched `generate` loop over the same items, configs and batches, on the shipped testbed model.

The bare loop does what any evaluation must: read the items (testbed items are drawn, their images rendered),
process each batch once (prompts with and without the image), then for each config route the model and
`generate` (greedy, left-padded). The harness adds prompt building through
the family adapter, image frames, decoding, scoring, per-item records (avg_T, K/V, FLOPs, retention recall),
SQLite writes (one transaction per batch), the progress bookkeeping, and reading the items. Model loading is
outside both timings. Both run in one process, alternating, and each is timed `--repeats` times; the median
counts. On a shared machine wall time measures the neighbours as much as the code, so the process's CPU time
(user + system, `time.process_time`, one torch thread) is the primary measure and wall time is shown beside it.

    python benchmarks/harness_overhead.py --items 96 --batch-size 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from visroute import apply_routing
from visroute.evaluation import parse_grid
from visroute.evaluation.runner import Runner
from visroute.testbed import HELDOUT_SEED, load_model, make_items


def _config(name: str, action: str, scorer: str, *stages: tuple[int, int]) -> dict:
    return {"name": name, "config": {"action": action, "scorer": scorer,
                                     "stages": [{"layer": layer, "keep": keep} for layer, keep in stages]}}


CONFIGS = [
    _config("fastv", "prune", "last_token_attention", (2, 16)),
    _config("pdrop-reroute", "reroute", "last_token_attention", (1, 36), (3, 18), (5, 9)),
    _config("text", "prune", "text_attention", (2, 16)),
    _config("divprune", "prune", "diversity", (0, 16)),
    _config("random", "prune", "random", (4, 16)),
    _config("oracle", "prune", "oracle", (0, 16)),
]


def bare_loop(model, processor, n: int, batch_size: int, max_new_tokens: int) -> int:
    """Every config (None = unrouted, "blind" = no image) on every batch of the first `n` held-out items;
    returns the generate calls' items."""
    from visroute.config import RoutingConfig
    from visroute.testbed.modeling import prompt

    items = make_items(n, HELDOUT_SEED)  # drawn afresh, as the harness reads them
    configs = [None, "blind"] + [RoutingConfig.from_dict(c["config"]) for c in CONFIGS]
    done = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        inputs = processor(images=[it.image() for it in chunk], text=[prompt(it.question) for it in chunk],
                           padding=True, return_tensors="pt")
        blind = processor(text=[prompt(it.question, image=False) for it in chunk], padding=True, return_tensors="pt")
        relevance = [it.relevance() for it in chunk]
        for cfg in configs:
            with torch.no_grad():
                if cfg is None or cfg == "blind":
                    model.generate(**(blind if cfg else inputs), max_new_tokens=max_new_tokens, do_sample=False)
                else:
                    with apply_routing(model, cfg) as router:
                        options = {"relevance": relevance} if "relevance" in router.call_inputs else {}
                        with router.call_options(**options):
                            model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            done += len(chunk)
    return done


def harness(model, processor, n: int, batch_size: int, db: Path) -> int:
    grid = parse_grid({"name": "overhead", "model": {"path": "testbed", "batch_size": batch_size},
                       "tasks": [{"name": "testbed", "limit": n}], "configs": CONFIGS})
    written = Runner(grid, db, model=model, processor=processor, progress=False).run()
    return sum(v for per in written.values() for v in per.values())


def machine_note() -> str:
    load = os.getloadavg()
    try:
        top = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
        others = [line.strip() for line in top.splitlines()[1:6] if line.strip()]
    except OSError:
        others = []
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; busiest processes: {'; '.join(others)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the measurements to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model()
    max_new = 5
    times: dict[str, list[tuple[float, float]]] = {"bare": [], "harness": []}  # (CPU s, wall s)

    def timed(key, fn):
        c, w = time.process_time(), time.perf_counter()
        n = fn()
        times[key].append((time.process_time() - c, time.perf_counter() - w))
        return n

    with tempfile.TemporaryDirectory() as tmp:
        harness(model, processor, 8, args.batch_size, Path(tmp) / "warm.sqlite")  # first-call costs, both paths
        bare_loop(model, processor, 8, args.batch_size, max_new)
        counts = {}
        for r in range(args.repeats):
            db = Path(tmp) / f"run{r}.sqlite"
            runs = [("bare", lambda: bare_loop(model, processor, args.items, args.batch_size, max_new)),
                    ("harness", lambda: harness(model, processor, args.items, args.batch_size, db))]
            for key, fn in runs if r % 2 == 0 else runs[::-1]:  # alternate which goes first
                counts[key] = timed(key, fn)
    n_bare, n_harness = counts["bare"], counts["harness"]
    assert n_bare == n_harness, (n_bare, n_harness)
    cpu = {k: statistics.median(c for c, _ in v) for k, v in times.items()}
    wall = {k: statistics.median(w for _, w in v) for k, v in times.items()}
    result = {
        "items": args.items, "configs": len(CONFIGS) + 2, "generations": n_bare, "batch_size": args.batch_size,
        "threads": args.threads, "times_cpu_wall": times, "cpu_s": cpu, "wall_s": wall,
        "items_per_cpu_s": {k: n_bare / v for k, v in cpu.items()},
        "overhead_cpu": cpu["harness"] / cpu["bare"] - 1, "overhead_wall": wall["harness"] / wall["bare"] - 1,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "while": machine_note(),
        "torch": torch.__version__,
    }
    print(f"| path | CPU s (median of {args.repeats}) | items per CPU s | wall s (median) |")
    print("|---|---|---|---|")
    for key, label in (("bare", "bare batched generate"), ("harness", "visroute study run")):
        print(f"| {label} | {cpu[key]:.2f} | {n_bare / cpu[key]:.1f} | {wall[key]:.2f} |")
    print(f"harness overhead: {100 * result['overhead_cpu']:+.1f}% CPU time, {100 * result['overhead_wall']:+.1f}% "
          f"wall time ({n_bare} generations = {args.items} items x {len(CONFIGS) + 2} configs, batch "
          f"{args.batch_size}, {args.threads} thread(s))")
    print(f"machine: {result['machine']}; {result['while']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
