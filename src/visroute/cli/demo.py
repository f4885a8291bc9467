"""`visroute demo`: the shipped testbed model, routed by every scorer and action at one small budget.

On a fixed held-out set of testbed questions (the relevant visual tokens of each are known), it runs the
unrouted model, FastV- and PyramidDrop-shaped pruning, Reroute at PyramidDrop's budget, the controls (random,
uniform, oracle) and the other scorers, and prints accuracy per question family, the blind control (the image
removed: how much of each family a model answers without looking), the retention recall of the relevant tokens,
avg_T and the prefill FLOPs relative to the unrouted model (visroute.accounting, scorer work included where
measured). Everything runs offline on CPU, in about 75 seconds on two threads.
"""

from __future__ import annotations

import json
from pathlib import Path

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug

DEMO_SEED = 2000  # the demo's fixed question set, apart from training and the held-out report set


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=COMMANDS["demo"])
    p.add_argument("--n", type=int, default=240, help="questions (families take turns; default 240)")
    p.add_argument("--keep", type=int, default=16, help="visual tokens FastV keeps (default 16 of 144)")
    p.add_argument("--layer", type=int, default=3, help="layer of FastV's stage, the first of every schedule")
    p.add_argument("--model", help="testbed checkpoint folder (default: the shipped one)")
    p.add_argument("--batch-size", type=int, default=40)
    p.add_argument("--json", help="also write the reports to this JSON file")
    add_debug(p)
    p.set_defaults(func=run)


def demo_configs(num_layers: int, num_visual: int, keep: int, first: int = 0) -> dict[str, object]:
    """The compared configs: FastV's schedule (one stage at layer `first` keeping `keep`) and a PyramidDrop
    schedule at the same avg_T, pruned and rerouted, with the attention scorer; then FastV's schedule with
    every other registered scorer (the controls included), each labelled by its name."""
    from visroute import RoutingConfig, Stage
    from visroute.budget import Shape, matched
    from visroute.scoring import available_scorers

    if not 0 < keep < num_visual:
        raise ValueError(f"--keep must lie between 1 and {num_visual - 1}, got {keep}")
    if not 0 <= first < num_layers - 2:
        raise ValueError(f"--layer must lie between 0 and {num_layers - 3}, got {first}")
    fastv = [Stage(first, keep)]
    layers = [first + i * (num_layers - first) // 3 for i in range(3)]
    pdrop = matched(RoutingConfig("prune", "last_token_attention", fastv), num_layers, num_visual,
                    action="prune", shape=Shape.pdrop(layers)).stages

    def cfg(action: str, scorer: str, stages) -> RoutingConfig:
        return RoutingConfig(action, scorer, stages)

    configs = {
        "unrouted": None,
        "fastv prune": cfg("prune", "last_token_attention", fastv),
        "pdrop prune": cfg("prune", "last_token_attention", pdrop),
        "pdrop reroute": cfg("reroute", "last_token_attention", pdrop),
    }
    for name, cls in available_scorers().items():
        # the testbed can give a relevance per token; a scorer that needs any other per-call input cannot run here
        if name != "last_token_attention" and set(cls.call_inputs) <= {"relevance"}:
            configs[name] = cfg("prune", name, fastv)
    return configs


def relative_flops(model, processor, items, config) -> float:
    """Prefill FLOPs of `config` over the unrouted prefill for the first item's prompt (vision tower and
    projector included; the scorer's own work measured)."""
    import torch

    from visroute import apply_routing
    from visroute.accounting import account
    from visroute.testbed.modeling import prompt

    if config is None:
        return 1.0
    it = items[0]
    inputs = processor(images=[it.image()], text=[prompt(it.question)], return_tensors="pt")
    router = apply_routing(model, config, measure_scorer_flops=True)
    try:
        options = {"relevance": it.relevance()[None]} if "relevance" in router.call_inputs else {}
        with torch.no_grad(), router.call_options(**options):
            model(**inputs)
        acc = account(router.last_record, model)
    finally:
        router.remove()
    return acc.flops.total / acc.flops_unrouted.total


def format_summary(reports: dict, flops: dict[str, float], items) -> str:
    """One row per config: accuracy per family and overall, mean retention recall over stages, avg_T, FLOPs."""
    from visroute.testbed import FAMILIES, majority_rates

    fams = [f for f in FAMILIES if any(f in r.accuracy() for r in reports.values())]
    short = {"attribute": "attr", "existence": "exist", "counting": "count", "relation": "relat",
             "grounding": "ground", "blind_solvable": "blind-sol", "relation_attribute": "rel-attr",
             "same_attribute": "same-attr", "relation_grounding": "rel-ground"}
    head = f"{'config':21s}" + "".join(f"{short.get(f, f):>11s}" for f in fams)
    head += f"{'all':>7s}{'recall':>8s}{'hop-1':>7s}{'hop-2':>7s}{'avg_T':>7s}{'FLOPs':>7s}"
    lines = [head]
    none = ("-", "-", "-")

    def row(name: str, acc: dict, recall: tuple[str, str, str], avg_t: str, fl: str) -> str:
        cells = "".join(f"{'-' if acc.get(f) is None else f'{acc[f]:.2f}':>11s}" for f in fams)
        rec = f"{recall[0]:>8s}{recall[1]:>7s}{recall[2]:>7s}"
        return f"{name:21s}{cells}{acc.get('all', float('nan')):>7.2f}{rec}{avg_t:>7s}{fl:>7s}"

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for name, rep in reports.items():
        if rep.blind:
            continue
        rec = [v for v in rep.recall().get("all") or [] if v is not None]
        hops = rep.hop_recall()
        recall = (fmt(sum(rec) / len(rec) if rec else None), fmt(hops[1]), fmt(hops[2]))
        lines.append(row(name, rep.accuracy(), recall, f"{rep.avg_T:.1f}", f"{flops[name]:.2f}"))
    if "blind" in reports:
        lines.append(row("blind control", reports["blind"].accuracy(), none, "0", "-"))
    lines.append(row("majority", majority_rates(items), none, "-", "-"))
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from visroute.testbed import DEFAULT_WORLD, Evaluator, load_model, make_items

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    torch.manual_seed(0)
    model, processor = load_model(args.model)
    items = make_items(args.n, seed=DEMO_SEED, world=DEFAULT_WORLD)
    num_visual = items[0].num_visual
    configs = demo_configs(model.config.text_config.num_hidden_layers, num_visual, args.keep, args.layer)
    print(f"visroute demo: the testbed model ({model.config.text_config.num_hidden_layers} decoder layers, "
          f"{num_visual} visual tokens per image) on {len(items)} held-out questions; FastV keeps {args.keep} "
          f"tokens from layer {args.layer} on, every other config runs at the same avg_T.")
    ev = Evaluator(model, processor, items, batch_size=args.batch_size)
    reports = ev.compare(configs, blind_control=True)
    flops = {name: relative_flops(model, processor, items, cfg) for name, cfg in configs.items()}
    print()
    print(format_summary(reports, flops, items))
    print()
    print("accuracy: share correct (grounding: box IoU >= 0.5); blind control: the same questions without the "
          "image; recall: share of the relevant visual tokens active, mean over stages; hop-1 / hop-2: the same "
          "on the multi-hop families for the object the question names / the object the answer is about; "
          "FLOPs: prefill FLOPs relative to the unrouted model (vision tower included).")
    pd = configs["pdrop prune"]
    print("pdrop stages: " + ", ".join(f"layer {s.layer} keeps {s.keep}" for s in pd.stages))
    if args.json:
        out = {name: {**rep.to_dict(), "flops_relative": flops.get(name)} for name, rep in reports.items()}
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"reports written to {args.json}")
    return 0
