"""Testbed evaluation: accuracy per question family, the blind control, and retention recall per stage.

    from visroute.testbed import load_model, make_items, Evaluator
    model, processor = load_model()                 # the shipped checkpoint
    ev = Evaluator(model, processor, make_items(300, seed=HELDOUT_SEED))
    base = ev.run(None)                             # unrouted
    blind = ev.run(None, blind=True)                # the image removed
    fastv = ev.run(RoutingConfig("prune", "last_token_attention", [Stage(2, 0.25)]))
    print(format_table({"unrouted": base, "blind": blind, "fastv": fastv}, ev.items))

Scoring: exact match of the whitespace-normalised answer; grounding answers are boxes, correct when their IoU
with the true box is at least 0.5. The blind control asks the same questions with the image removed from the
prompt (`USER: {question} ASSISTANT:`, no pixels). Retention recall of stage s for one item is the share of its
relevant visual tokens that are active in stage s; items without relevant tokens are left out of the mean.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from visroute.engine import as_config
from visroute.evaluation.boxes import box_iou  # noqa: F401  (re-exported: the testbed's box IoU)
from visroute.evaluation.runner import Session
from visroute.evaluation.tasks.testbed import TestbedTask, grid_frame, to_task_item
from visroute.testbed.data import HELDOUT_SEED, Item  # noqa: F401  (HELDOUT_SEED re-exported)
from visroute.testbed.questions import FAMILIES, MULTI_HOP_FAMILIES

MAX_NEW_TOKENS = TestbedTask.max_new_tokens  # the longest answer (a box) is 4 tokens, then </s>


def score(item: Item, prediction: str) -> tuple[bool, float | None]:
    """(correct, IoU for grounding items else None), scored by the harness's `testbed` task."""
    metrics = TestbedTask().score(to_task_item(item), prediction, grid_frame(item.grid))
    return bool(metrics["correct"]), metrics.get("iou")


def majority_rates(items: list[Item]) -> dict[str, float]:
    """Per family (and "all"): the accuracy of always giving the most common answer of the item's question
    form (template) within its family. Grouping by form gives the blind guesser what it can always see: whether
    a colour, a shape, a number or yes/no is asked for."""
    groups: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for it in items:
        groups[(it.family, it.template)][it.answer] += 1
    hits: Counter = Counter()
    sizes: Counter = Counter()
    for (fam, _), answers in groups.items():
        hits[fam] += answers.most_common(1)[0][1]
        sizes[fam] += sum(answers.values())
    out = {f: hits[f] / sizes[f] for f in FAMILIES if sizes[f]}
    out["all"] = sum(hits.values()) / max(1, sum(sizes.values()))
    return out


@dataclass
class ItemResult:
    """The outcome for one item. `recall[s]`: share of its relevant tokens active in stage s (None without
    relevant tokens); `hop_recall[s][h]`: the same for the tokens of hop h + 1 alone; `avg_T`: its visual tokens
    per decoder layer."""

    id: str
    family: str
    subtype: str
    prediction: str
    correct: bool
    iou: float | None = None
    recall: list[float | None] = field(default_factory=list)
    avg_T: float | None = None
    hop_recall: list[list[float | None]] = field(default_factory=list)  # [stage][hop] (multi-hop: 2 hops)


@dataclass
class EvalReport:
    """The results of one configuration on a set of items."""

    name: str
    config: object
    blind: bool
    results: list[ItemResult]
    stage_layers: list[int]
    num_visual: int
    seconds: float
    kv_fraction: float | None = None  # K/V entries cached after prefill, as a share of the unrouted count

    def accuracy(self) -> dict[str, float]:
        """Per family (and "all"): share of correct answers."""
        by: dict[str, list[bool]] = defaultdict(list)
        for r in self.results:
            by[r.family].append(r.correct)
        out = {f: sum(v) / len(v) for f in FAMILIES if (v := by.get(f))}
        out["all"] = sum(r.correct for r in self.results) / max(1, len(self.results))
        return out

    def recall(self) -> dict[str, list[float | None]]:
        """Per family (and "all"): mean retention recall of each stage over items with relevant tokens."""
        out: dict[str, list[float | None]] = {}
        for fam in list(FAMILIES) + ["all"]:
            rows = [r for r in self.results if fam in ("all", r.family)]
            if not rows:
                continue
            per_stage = []
            for s in range(len(self.stage_layers)):
                vals = [r.recall[s] for r in rows if r.recall and r.recall[s] is not None]
                per_stage.append(sum(vals) / len(vals) if vals else None)
            out[fam] = per_stage
        return out

    def hop_recall(self) -> dict[int, float | None]:
        """Hop (1, 2) -> mean retention recall of that hop's tokens over the multi-hop items and stages."""
        out: dict[int, float | None] = {}
        for hop in (0, 1):
            vals = [per_stage[hop] for r in self.results if r.family in MULTI_HOP_FAMILIES
                    for per_stage in r.hop_recall if len(per_stage) > hop and per_stage[hop] is not None]
            out[hop + 1] = sum(vals) / len(vals) if vals else None
        return out

    @property
    def avg_T(self) -> float:
        """Mean over items of the visual tokens active per decoder layer (all of them when unrouted)."""
        vals = [r.avg_T for r in self.results if r.avg_T is not None]
        return sum(vals) / len(vals) if vals else (0.0 if self.blind else float(self.num_visual))

    def to_dict(self) -> dict:
        cfg = self.config.to_dict() if hasattr(self.config, "to_dict") else None
        return {
            "name": self.name, "config": cfg, "blind": self.blind, "accuracy": self.accuracy(),
            "recall": self.recall(), "hop_recall": self.hop_recall(), "stage_layers": self.stage_layers,
            "avg_T": self.avg_T,
            "kv_fraction": self.kv_fraction, "seconds": self.seconds, "n": len(self.results),
            "items": [r.__dict__ for r in self.results],
        }


class Evaluator:
    """Runs routing configs over a fixed item set on the evaluation harness (`visroute.evaluation`): batched
    greedy generation over left-padded batches, the harness's prompts, scoring and records. Each batch is
    processed once and reused by every `run`."""

    def __init__(self, model, processor, items: list[Item], batch_size: int = 32, progress: bool = True,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.session = Session(model, processor, box_frame="grid")
        self.model = self.session.model
        self.processor = processor
        self.items = list(items)
        self.batch_size = batch_size
        self.progress = progress
        self.task = TestbedTask(max_new_tokens=max_new_tokens)
        self._batches: list | None = None

    def on(self, items: list[Item]) -> "Evaluator":
        """An evaluator of the same model, processor and settings on other `items`."""
        return Evaluator(self.model, self.processor, items, batch_size=self.batch_size, progress=self.progress,
                         max_new_tokens=self.task.max_new_tokens)

    def batches(self) -> list:
        """The harness batches of the items (built once)."""
        if self._batches is None:
            task_items = [to_task_item(it) for it in self.items]
            self._batches = [self.session.batch(self.task, task_items[i:i + self.batch_size])
                             for i in range(0, len(task_items), self.batch_size)]
        return self._batches

    def run(self, config=None, *, blind: bool = False, name: str | None = None) -> EvalReport:
        """Evaluate the model routed by `config` (a RoutingConfig, dict, YAML path, or None for unrouted);
        `blind=True` runs the blind control (the image removed; routing has nothing to act on)."""
        config = None if config is None else as_config(config)
        name = name or ("blind" if blind else ("unrouted" if config is None else f"{config.action}:{config.scorer}"))
        by_id = {it.id: it for it in self.items}
        results: list[ItemResult] = []
        kv_routed = kv_full = 0
        t0 = time.perf_counter()
        for batch in tqdm(self.batches(), desc=name, disable=not self.progress, leave=False):
            rows, stats = self.session.generate(self.task, batch, config, blind=blind)
            for row, st in zip(rows, stats):
                it = by_id[row.item_id]
                res = ItemResult(it.id, it.family, it.subtype, " ".join(row.prediction.split()), row.correct,
                                 row.metrics.get("iou"))
                if st.routing is not None:  # routed
                    res.recall = st.recall_all
                    res.hop_recall = row.recall
                    res.avg_T = row.avg_T
                    if row.kv_entries is not None:
                        kv_routed += row.kv_entries
                        kv_full += row.kv_unrouted
                results.append(res)
        return EvalReport(
            name=name, config=config, blind=blind, results=results,
            stage_layers=[s.layer for s in config.stages] if config is not None else [],
            num_visual=self.items[0].num_visual if self.items else 0, seconds=time.perf_counter() - t0,
            kv_fraction=(kv_routed / kv_full) if kv_full else None,
        )

    def compare(self, configs: dict[str, object], blind_control: bool = True) -> dict[str, EvalReport]:
        """Run every named config (None = unrouted), and the blind control once, as "blind"."""
        reports = {name: self.run(cfg, name=name) for name, cfg in configs.items()}
        if blind_control:
            reports["blind"] = self.run(None, blind=True, name="blind")
        return reports


def evaluate(model, processor, items: list[Item], config=None, *, blind: bool = False, batch_size: int = 32,
             progress: bool = True) -> EvalReport:
    """One config on `items` (see `Evaluator.run`)."""
    return Evaluator(model, processor, items, batch_size=batch_size, progress=progress).run(config, blind=blind)


def form_accuracy(report: EvalReport, items: list[Item]) -> dict[tuple[str, str], tuple[float, int]]:
    """(family, question form) -> (share correct, items) of `report` on `items`, the set it ran on. A family's
    accuracy can hide a form the model has not learned (one of two forms at chance still averages near 0.75)."""
    form = {it.id: (it.family, it.template) for it in items}
    by: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for r in report.results:
        by[form[r.id]].append(r.correct)
    order = {f: i for i, f in enumerate(FAMILIES)}
    return {k: (sum(v) / len(v), len(v)) for k, v in sorted(by.items(), key=lambda kv: (order[kv[0][0]], kv[0][1]))}


def format_form_table(reports: dict[str, EvalReport], items: list[Item]) -> str:
    """Accuracy per family and question form, one column per report (`form_accuracy`)."""
    per = {n: form_accuracy(r, items) for n, r in reports.items()}
    forms = list(dict.fromkeys(k for acc in per.values() for k in acc))
    width = max([14] + [len(n) + 1 for n in reports])
    head = f"{'family / form':40s}{'items':>6s}" + "".join(f"{n:>{width}s}" for n in per)
    lines = ["accuracy per question form", head]
    for fam, template in forms:
        n = next(acc[(fam, template)][1] for acc in per.values() if (fam, template) in acc)
        lines.append(f"{fam + ' / ' + template:40s}{n:>6d}" + "".join(
            f"{f'{acc[(fam, template)][0]:.3f}' if (fam, template) in acc else '-':>{width}s}" for acc in per.values()))
    return "\n".join(lines)


def format_table(reports: dict[str, EvalReport], items: list[Item] | None = None) -> str:
    """Accuracy per family (columns: one per report, plus the majority-answer rate when `items` are given),
    then avg_T, K/V share and the mean retention recall of each stage of the routed reports."""
    fams = [f for f in list(FAMILIES) + ["all"] if any(f in r.accuracy() for r in reports.values())]
    maj = majority_rates(items) if items is not None else None
    names = list(reports)
    width = max([14] + [len(n) + 1 for n in names])
    head = f"{'family':16s}" + (f"{'majority':>10s}" if maj else "") + "".join(f"{n:>{width}s}" for n in names)
    lines = ["accuracy (grounding: IoU >= 0.5)", head]
    for fam in fams:
        row = f"{fam:16s}" + (f"{maj.get(fam, float('nan')):>10.3f}" if maj else "")
        for n in names:
            acc = reports[n].accuracy().get(fam)
            row += f"{'-' if acc is None else f'{acc:.3f}':>{width}s}"
        lines.append(row)
    lines.append(f"{'avg_T':16s}" + (" " * 10 if maj else "") + "".join(f"{reports[n].avg_T:>{width}.1f}" for n in names))
    kv = [reports[n].kv_fraction for n in names]
    if any(k is not None for k in kv):
        lines.append(f"{'K/V share':16s}" + (" " * 10 if maj else "")
                     + "".join(f"{'-' if k is None else f'{k:.3f}':>{width}s}" for k in kv))
    routed = [n for n in names if reports[n].stage_layers]
    if routed:
        lines.append("")
        lines.append("retention recall of the relevant visual tokens, per stage (layer)")
        for n in routed:
            rep = reports[n]
            rec = rep.recall()
            stages = "  ".join(f"L{layer}" for layer in rep.stage_layers)
            lines.append(f"{n} [{stages}]")
            for fam in fams:
                vals = rec.get(fam)
                if vals is None:
                    continue
                lines.append(f"  {fam:14s}" + "".join(f"{'-' if v is None else f'{v:.3f}':>8s}" for v in vals))
    return "\n".join(lines)
