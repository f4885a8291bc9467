"""The sweep runner: load the model once, then run the unrouted model, the blind control and every config of a
grid on every task, writing one row per (config, task, item) to the results database.

Work goes batch by batch: a batch of items is processed once (the processor's image work is shared by all
configs) and then generated under each config that still lacks rows for it, with batched greedy decoding over
left-padded prompts. Per item it records the prediction and the task's metric values, avg_T (the mean over
decoder layers of the visual tokens active in that layer), the K/V entries cached after prefill and the
decoder's prefill FLOPs (both also for the unrouted prompt), the retention recall of every stage for every
hop (the share of the hop's relevant visual tokens active in that stage), and its share of the batch's time."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visroute.accounting import DecoderDims
from visroute.engine import apply_routing
from visroute.evaluation.grid import Grid, ModelSpec
from visroute.evaluation.parallel import Context, context
from visroute.evaluation.store import Row, Store
from visroute.evaluation.tasks.base import Task, TaskItem
from visroute.families import adapter_for
from visroute.families.base import declared_box_frame
from visroute.loading import check_device, check_model_path, dtype_of
from visroute.loading import load_model as load_pretrained

BLIND, UNROUTED = "blind", "unrouted"


# ---- the model -----------------------------------------------------------------------------------------------
def load_model(spec: ModelSpec, device: torch.device | None = None) -> tuple[Any, Any]:
    """(model, processor) for a grid's model section; "testbed" is the shipped testbed checkpoint. `device`
    (a data-parallel process's own device) overrides the grid's device and device_map."""
    target = device or (torch.device(spec.device) if spec.device else None)
    return load_pretrained(spec.path, dtype_of(spec.dtype), device=None if target is None else str(target),
                           device_map=None if device is not None else spec.device_map)


def environment(ctx: Context) -> tuple[dict, dict]:
    """(package versions, hardware) recorded with every run."""
    import transformers

    import visroute

    versions = {"visroute": getattr(visroute, "__version__", "?"), "torch": torch.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
    hardware = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "processes": ctx.world_size,
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return versions, hardware


def config_hash(config: dict | None, kind: str) -> str:
    if config is None:
        return kind
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# ---- the evaluation core: batches, prompts, frames, relevance, generation, per-item costs --------------------------
def _layer_flops(text_config):
    dims = DecoderDims.from_config(text_config)
    cache: dict[int, int] = {}

    def flops(n: int) -> int:
        if n not in cache:
            cache[n] = dims.layer_flops(n)
        return cache[n]

    return flops


@dataclass
class Batch:
    """Samples processed once: their prompts with their images, and (built on demand) without them.

    texts:      per sample, its question as posed (before the family's prompt template).
    frames:     per sample, one `ImageFrame` per image.
    num_visual: per sample, its visual tokens (every image, every tile).
    relevant:   per sample, per hop, the visual-token indices of its relevance regions (None: none known).
    items:      the task items, when the batch was built from a task."""

    texts: list[str]
    inputs: dict[str, Any]
    frames: list[list]
    num_visual: list[int]
    relevant: list[list[list[int]] | None]
    items: list[TaskItem] = field(default_factory=list)
    blind_inputs: dict[str, Any] | None = None


@dataclass
class ItemStats:
    """What one sample cost and kept under one generation.

    avg_T:       the mean over decoder layers of its active visual tokens (unrouted: all of them; blind: 0).
    num_visual:  its visual tokens in the prompt.
    kv_entries:  K/V entries cached after prefill (None where the record does not count them); `kv_unrouted`
                 and `flops_unrouted` are those of the unrouted prompt with the image.
    recall:      per stage, per hop: the share of the hop's relevant tokens active in the stage (None: no
                 relevance, or not routed); `recall_all`: per stage, the same for all hops together.
    routing:     what the database keeps of the routing (selected tokens per stage, relevance, decisions)."""

    avg_T: float
    num_visual: int
    kv_entries: int | None
    kv_unrouted: int
    flops: float
    flops_unrouted: float
    recall: list[list[float | None]] | None = None
    recall_all: list[float | None] | None = None
    routing: dict[str, Any] | None = None


class Session:
    """One loaded model and its processor, and the one place that turns questions into answers and costs: the
    study's runner, the testbed's `Evaluator` and the lmms-eval plug-in all go through it.

    `session.prepare(texts, images, regions)` (or `session.batch(task, items)`) processes samples once;
    `session.complete(batch, gen, router)` generates; `session.stats(batch, record)` gives each sample's costs and
    recall; `session.generate(task, batch, config)` (None: unrouted; `blind=True`: the blind control) does all
    three for a task and returns one scored `Row` per item. `box_frame`: the frame the model writes boxes in
    (default: the one its checkpoint declares, else its family's)."""

    def __init__(self, model, processor, box_frame: str | None = None, rank: int = 0):
        self.model = model.eval()
        self.processor = processor
        self.adapter = adapter_for(model)
        self.box_frame = box_frame or declared_box_frame(model)
        self.rank = rank
        self.flops = _layer_flops(self.adapter.text_config)
        tok = getattr(processor, "tokenizer", processor)
        tok.padding_side = "left"  # batched greedy generation continues every prompt from its last token
        self.pad_token_id = getattr(tok, "pad_token_id", None)

    def _device_inputs(self, inputs) -> dict[str, Any]:
        dev, dtype = self.model.device, self.model.dtype
        out = {}
        for k, v in dict(inputs).items():
            if torch.is_tensor(v):
                v = v.to(dev, dtype=dtype) if v.is_floating_point() else v.to(dev)
            out[k] = v
        return out

    def _process(self, texts: list[str], images: list[list]) -> Any:
        prompts = [self.adapter.prompt(text, len(ims), self.processor) for text, ims in zip(texts, images)]
        flat = [im for ims in images for im in ims]
        if flat:
            return self.processor(images=flat, text=prompts, padding=True, return_tensors="pt")
        return self.processor(text=prompts, padding=True, return_tensors="pt")

    def prepare(self, texts: list[str], images: list[list],
                regions: list[list[list[list[float]]] | None] | None = None) -> Batch:
        """Samples processed once: `texts` the questions, `images` per sample its PIL images, `regions` per
        sample its relevance (per hop, normalised boxes of its first image, whose tokens come first)."""
        inputs = self._process(texts, images)
        frames, counts = item_frames(self.adapter, self.processor, images, inputs, self.box_frame)
        relevant = []
        for hops, fr in zip(regions or [None] * len(texts), frames):
            if hops is None or not fr:
                relevant.append(None)
            else:
                relevant.append([sorted({t for box in hop for t in fr[0].tokens_of(box)}) for hop in hops])
        return Batch(list(texts), self._device_inputs(inputs), frames, counts, relevant)

    def batch(self, task: Task, items: list[TaskItem], images: list[list] | None = None) -> Batch:
        """A task's items processed once; `images` (per item, its PIL images) when the caller read them already."""
        images = [it.images() for it in items] if images is None else images
        batch = self.prepare([task.text(it) for it in items], images, [it.relevance_regions for it in items])
        batch.items = list(items)
        return batch

    def blind_inputs(self, batch: Batch) -> dict[str, Any]:
        """The batch's prompts with the images removed (the blind control)."""
        if batch.blind_inputs is None:
            batch.blind_inputs = self._device_inputs(self._process(batch.texts, [[] for _ in batch.texts]))
        return batch.blind_inputs

    def relevance(self, batch: Batch) -> list[torch.Tensor]:
        """The oracle's per-call input: per sample, (num_visual,) 1 on its relevant tokens (every hop), else 0."""
        return [relevance_vector(n, rel) for n, rel in zip(batch.num_visual, batch.relevant)]

    def complete(self, batch: Batch, gen: dict[str, Any], router=None, blind: bool = False
                 ) -> tuple[torch.Tensor, list[str], Any]:
        """(new token ids, their texts, the routing record or None): `batch` generated with the settings `gen`,
        routed by `router` (an applied `Router`; None: unrouted) with the relevance its scorer asks for."""
        inputs = self.blind_inputs(batch) if blind else batch.inputs
        with torch.no_grad():
            if router is None or blind:
                out = self.model.generate(**inputs, **gen)
                record = None
            else:
                options = {"relevance": self.relevance(batch)} if "relevance" in router.call_inputs else {}
                with router.call_options(**options):
                    out = self.model.generate(**inputs, **gen)
                record = router.last_record
        new = out[:, inputs["input_ids"].shape[1]:]
        return new, self.processor.batch_decode(new, skip_special_tokens=True), record

    def stats(self, batch: Batch, record=None, blind: bool = False) -> list[ItemStats]:
        """Per sample, its costs and recall under the generation that gave `record` (None: unrouted, or the
        blind control with `blind`)."""
        inputs = self.blind_inputs(batch) if blind else batch.inputs
        seq = inputs["attention_mask"].sum(1).tolist()
        full_seq = batch.inputs["attention_mask"].sum(1).tolist()  # the prompt with the image: the reference
        layers = self.adapter.num_layers
        decisions = None if record is None else record.decisions(
            [None if rel is None else relevance_vector(nv, rel) for nv, rel in zip(batch.num_visual, batch.relevant)])
        out = []
        for b in range(len(batch.texts)):
            n_full = int(full_seq[b])
            num_visual = 0 if blind else int(batch.num_visual[b])
            if record is None:
                out.append(ItemStats(avg_T=float(num_visual), num_visual=num_visual, kv_entries=int(seq[b]) * layers,
                                     kv_unrouted=n_full * layers, flops=float(layers * self.flops(int(seq[b]))),
                                     flops_unrouted=float(layers * self.flops(n_full))))
                continue
            relevant = batch.relevant[b]
            frames = batch.frames[b]
            st = ItemStats(
                avg_T=float(record.avg_visual_tokens[b]), num_visual=num_visual,
                kv_entries=int(record.kv_tokens[:, b].sum()) if record.kv_tokens is not None else None,
                kv_unrouted=n_full * layers,
                flops=float(sum(self.flops(int(n)) for n in record.active_tokens[:, b].tolist())),
                flops_unrouted=float(layers * self.flops(n_full)),
                routing={"selected": [s.active[b].nonzero().flatten().tolist() for s in record.stages],
                         "relevant": relevant,
                         # per stage: the keep asked for more tokens than there were, so all were kept
                         "clipped": [bool(s.clipped[b]) for s in record.stages],
                         # a plain grid only: the position analyses do not read tiled layouts
                         "grid": [frames[0].rows, frames[0].cols]
                         if len(frames) == 1 and frames[0].num_tokens == frames[0].rows * frames[0].cols else None,
                         # per stage: tokens evicted / re-admitted, re-entrants' ages, relevant ones among them
                         "decisions": [_decision_row(d, b) for d in decisions]})
            if relevant is not None:
                union = sorted({t for hop in relevant for t in hop})
                st.recall = [[recall(s.active[b], hop) for hop in relevant] for s in record.stages]
                st.recall_all = [recall(s.active[b], union) for s in record.stages]
            out.append(st)
        return out

    def generate(self, task: Task, batch: Batch, config=None, blind: bool = False
                 ) -> tuple[list[Row], list[ItemStats]]:
        """(rows, stats): greedy answers of a task's `batch` under `config`, scored, with their costs and recall."""
        t0 = time.perf_counter()
        gen = dict(max_new_tokens=task.max_new_tokens, do_sample=False, pad_token_id=self.pad_token_id)
        if config is None or blind:
            _, texts, record = self.complete(batch, gen, blind=blind)
        else:
            with apply_routing(self.model, config) as router:
                _, texts, record = self.complete(batch, gen, router)
        seconds = (time.perf_counter() - t0) / len(batch.items)
        stats = self.stats(batch, record, blind=blind)
        rows = []
        for b, (it, text, st) in enumerate(zip(batch.items, texts, stats)):
            prediction = text.strip()
            metrics = task.score(it, prediction, batch.frames[b][0] if batch.frames[b] else None)
            rows.append(Row(item_id=it.id, prediction=prediction, correct=bool(metrics["correct"]), metrics=metrics,
                            avg_T=st.avg_T, kv_entries=st.kv_entries, kv_unrouted=st.kv_unrouted, flops=st.flops,
                            flops_unrouted=st.flops_unrouted, recall=st.recall, routing=st.routing,
                            seconds=seconds, rank=self.rank))
        return rows, stats


@dataclass
class Job:
    """One (name, kind, config) on one task, with the item ids it still lacks."""

    name: str
    kind: str
    config: Any  # RoutingConfig or None
    run_id: int
    pending: set[str] = field(default_factory=set)


class Runner:
    """Runs a grid into a database: `Runner(grid, db).run()` (a loaded `model`, `processor` may be given)."""

    def __init__(self, grid: Grid, db: str | Path, *, limit: int | None = None, progress: bool = True,
                 ctx: Context | None = None, model=None, processor=None, strict: bool = False):
        self.grid = grid
        self.db = Path(db)
        self.limit = limit
        self.strict = strict  # stop at the first item that cannot be run, instead of recording it as skipped
        self.progress = progress
        self.ctx = ctx or context()
        self.model, self.processor = model, processor
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be at least 1, got {limit}")

    # ---- setup ---------------------------------------------------------------------------------------------
    def _tasks(self) -> list[tuple[str, Task, list[TaskItem]]]:
        out = []
        for spec in self.grid.tasks:
            task = spec.build()
            if self.limit is not None:
                task.limit = self.limit if task.limit is None else min(task.limit, self.limit)
            items = task.items()
            if not items:
                raise ValueError(f"task {spec.label!r} has no items")
            bad = [it for it in items if it.problem is not None]
            if bad and self.strict:
                raise ValueError(_bad_item(spec.label, task, bad[0].id, bad[0].problem))
            out.append((spec.label, task, items))
        return out

    def _configs(self, session: Session, tasks) -> list[tuple[str, Any]]:
        num_layers = session.adapter.num_layers
        num_visual = None
        if any(c.needs_num_visual() for c in self.grid.configs):
            _, task, items = tasks[0]
            num_visual = session.batch(task, [_first_readable(items)]).num_visual[0]
        out, seen = [], {}
        for spec in [one for listed in self.grid.configs for one in listed.expand(num_layers)]:
            cfg = spec.resolve(num_layers, num_visual, getattr(session.adapter, "name", None))
            key = json.dumps(cfg.to_dict(), sort_keys=True)
            if key in seen:
                self._say(f"config {spec.name!r} is {seen[key]!r} on this model; it runs once, as {seen[key]!r}")
                continue
            seen[key] = spec.name
            out.append((spec.name, cfg))
        return out

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)  # above a running progress bar, not through it

    def _readable(self, store: Store, label: str, task: Task, chunk: list[TaskItem], jobs: list[Job],
                  bar) -> tuple[list[TaskItem], list[list]]:
        """The items of `chunk` whose images can be read, and their images. The others are recorded as skipped
        (under --strict: the run stops naming the item); an item skipped before that reads now is unskipped."""
        good, images, bad = [], [], {}
        for it in chunk:
            try:
                images.append(it.images())
                good.append(it)
            except (OSError, ValueError) as e:
                if self.strict:
                    raise ValueError(_bad_item(label, task, it.id, str(e))) from None
                bad[it.id] = str(e)
        if bad:
            store.skip(label, bad)
            for item_id, reason in bad.items():
                self._say(f"skipped: {_bad_item(label, task, item_id, reason)}")
            for job in jobs:
                lost = job.pending & set(bad)
                job.pending -= lost
                bar.update(len(lost))
        store.unskip(label, [it.id for it in good if it.id in self._skipped.get(label, {})])
        return good, images

    # ---- running -------------------------------------------------------------------------------------------
    def run(self) -> dict[str, dict[str, int]]:
        """Run everything still missing; returns {task: {run name: rows written by this process}}."""
        from tqdm.auto import tqdm

        from visroute.scoring import get_scorer_class

        if self.db.exists():  # refuse another grid's database (or a folder, or another program's) before loading
            Store(self.db, self.grid.identity()).close()
        elif not self.db.parent.is_dir():
            raise FileNotFoundError(f"--db {self.db}: no folder {self.db.parent}")
        tasks = self._tasks()
        if self.model is None:
            if self.ctx.device is None:
                check_device(self.grid.model.device)
            check_model_path(self.grid.model.path)
            self.model, self.processor = load_model(self.grid.model, self.ctx.device)
        session = Session(self.model, self.processor, self.grid.model.box_frame, self.ctx.rank)
        configs = self._configs(session, tasks)  # a layer outside the model fails here, before the database is written
        versions, hardware = environment(self.ctx)
        store = Store(self.db, self.grid.identity())

        plan = []
        self._skipped = store.skipped()  # items skipped before are retried (their file may have been fixed)
        for label, task, items in tasks:
            store.set_items(label, len(items))
            mine = self.ctx.share(items)
            unposed = {it.id: it.problem for it in mine if it.problem is not None}
            store.skip(label, unposed)
            for item_id, reason in unposed.items():
                self._say(f"skipped: {_bad_item(label, task, item_id, reason)}")
            mine = [it for it in mine if it.problem is None]
            ids = {it.id for it in mine}
            jobs = []
            for name, kind, cfg in [(UNROUTED, UNROUTED, None), (BLIND, BLIND, None)] + \
                    [(n, "routed", c) for n, c in configs]:
                if cfg is not None and "relevance" in get_scorer_class(cfg.scorer).call_inputs and \
                        any(it.relevance_regions is None for it in items):
                    self._say(f"{name}: skipped on {label!r}: its scorer needs each item's relevance, which "
                              f"{task.name!r} items do not carry")
                    continue
                d = None if cfg is None else cfg.to_dict()
                run = store.run(name, kind, label, task.hash(), task.identity(), d, config_hash(d, kind),
                                self.grid.model.path, versions, hardware)
                jobs.append(Job(name, kind, cfg, run.run_id, ids - store.done(run.run_id)))
            plan.append((label, task, mine, jobs))

        written: dict[str, dict[str, int]] = {}
        noted: set[str] = set()
        total = sum(len(j.pending) for *_, jobs in plan for j in jobs)
        bar = tqdm(total=total, desc="study", unit="item", disable=not (self.progress and self.ctx.is_main),
                   dynamic_ncols=True)
        try:
            for label, task, mine, jobs in plan:
                written[label] = {j.name: 0 for j in jobs}
                todo = [it for it in mine if any(it.id in j.pending for j in jobs)]
                bs = self.grid.model.batch_size
                for start in range(0, len(todo), bs):
                    chunk, images = self._readable(store, label, task, todo[start:start + bs], jobs, bar)
                    if not chunk:
                        continue
                    batch = session.batch(task, chunk, images)
                    image_of = {it.id: im for it, im in zip(chunk, images)}
                    for job in jobs:
                        want = [it for it in chunk if it.id in job.pending]
                        # re-plan: another process on this database may have stored or claimed some of them
                        held = store.claim(job.run_id, [it.id for it in want])
                        taken = {it.id for it in want} - held
                        if taken:
                            job.pending -= taken
                            bar.update(len(taken))
                            want = [it for it in want if it.id in held]
                        if not want:
                            continue
                        # a resumed run may lack only part of a batch: those items get a batch of their own
                        sub = batch if len(want) == len(chunk) else \
                            session.batch(task, want, [image_of[it.id] for it in want])
                        bar.set_postfix_str(f"{label}: {job.name}", refresh=False)
                        rows, _ = session.generate(task, sub, job.config, blind=job.kind == BLIND)
                        written[label][job.name] += store.add(job.run_id, rows)
                        store.release()
                        job.pending -= {r.item_id for r in rows}
                        bar.update(len(rows))
                        clipped = sum(any((r.routing or {}).get("clipped") or []) for r in rows)
                        if clipped and job.name not in noted:
                            noted.add(job.name)
                            self._say(f"note: {job.name} on {label!r}: a stage's keep exceeds the visual tokens "
                                      f"of some items, so that stage keeps them all (the report counts them)")
        finally:
            bar.close()
            store.release()
            store.close()
        self.ctx.wait()
        return written


def _first_readable(items: list[TaskItem]) -> TaskItem:
    """The first item that can be posed and whose images read (it sizes the methods' budgets)."""
    for it in items:
        if it.problem is None:
            try:
                it.images()
                return it
            except (OSError, ValueError):
                continue
    raise ValueError("no item of the first task can be read, so the methods' budgets cannot be sized")


def _bad_item(label: str, task: Task, item_id: str, reason: str) -> str:
    data = task.data.get("data")
    return f"task {label!r}" + (f" ({data})" if data else "") + f", item {item_id}: {reason}"


def item_frames(adapter, processor, images: list[list], inputs, box_frame: str | None) -> tuple[list[list], list[int]]:
    """Per item (its images in `images`, processed together into `inputs`): its `ImageFrame`s, one per image,
    and its visual-token count (a tiled image holds more than one grid; several images add up). The harness's
    session and the lmms-eval plug-in both size relevance and recall by these."""
    flat = [im for ims in images for im in ims]
    frames_flat = adapter.image_frames(processor, flat, dict(inputs), box_frame=box_frame) if flat else []
    frames, counts, k = [], [], 0
    for ims in images:
        fr = frames_flat[k:k + len(ims)]
        k += len(ims)
        frames.append(fr)
        counts.append(sum(f.num_tokens for f in fr))
    return frames, counts


def relevance_vector(num_visual: int, hops: list[list[int]] | None) -> torch.Tensor:
    """(num_visual,) 1 on the union of the hops' relevant tokens, else 0 (the oracle's per-call input)."""
    r = torch.zeros(num_visual)
    if hops:
        idx = sorted({t for h in hops for t in h})
        if idx:
            r[idx] = 1.0
    return r


def _decision_row(d, b: int) -> dict[str, Any]:
    """Sample b's share of a `visroute.record.Decision`, as plain numbers for the database."""
    relevant = d.relevant_evicted is not None
    return {"layer": d.layer, "action": d.action, "evicted": int(d.evicted[b]), "readmitted": int(d.readmitted[b]),
            "ages": list(d.ages[b]),
            "relevant_evicted": int(d.relevant_evicted[b]) if relevant else None,
            "relevant_readmitted": int(d.relevant_readmitted[b]) if relevant else None}


def recall(active_row: torch.Tensor, tokens: list[int]) -> float | None:
    """Retention recall: the share of `tokens` (visual-token indices) active in `active_row`."""
    if not tokens:
        return None
    return float(active_row[tokens].float().mean())


def run_grid(grid: Grid, db: str | Path, **kwargs) -> dict[str, dict[str, int]]:
    """Run `grid` into the database `db` (see `Runner`)."""
    return Runner(grid, db, **kwargs).run()
