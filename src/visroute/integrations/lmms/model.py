"""`VisrouteLMM`: an lmms-eval chat model that loads any model visroute supports, routes it, batches requests,
writes prompts in the family's format, converts boxes between the family's frame and the task's, and writes a
side log with the routing statistics of every sample.

model_args (lmms-eval's `--model_args k=v,k2=v2`):
  pretrained   a Hugging Face model id or folder, or "testbed" (the shipped testbed checkpoint; the default)
  routing      a method preset "name@tier" (e.g. pdrop@128, reroute-pdrop@64), a routing config as inline JSON
               ('{"action": "prune", ...}'), a YAML path, or none (unrouted)
  blind        true: the blind control, the same prompts with the images removed
  dtype        float32 / bfloat16 / float16;  device, device_map ("auto", ...);  batch_size
  box_tasks    comma-separated glob patterns of the tasks whose answers are boxes (default *bbox_rec*)
  box_prompt   task (the task's own prompt, the default) or family (the family's grounding prompt on the
               task's referring expression, `doc["answer"]`; Qwen2.5-VL answers lmms-eval's [0, 1] wording wrongly)
  box_frame    the frame the model writes boxes in (default: the one its config declares, `visroute_box_frame`,
               as the testbed's does: grid; else its family's)
  box_convert  true (default): a box answer is read in the model's box frame (`FamilyAdapter.box_frame`) and
               written back as "[x1, y1, x2, y2]" normalised to the original image, the frame lmms-eval's RefCOCO
               scoring uses; false: the model's text as it is (what unpatched lmms-eval setups score)
  side_log     folder of the side logs (default visroute_logs): one JSONL per run and rank,
               side_log.<run id>.rank<r>.jsonl, each row with the run id, the model_args and the time
  min_pixels, max_pixels   passed to the processor (Qwen: the image size range, e.g. max_pixels=451584)

lmms-eval keys its response cache on the model name and the model_args text: a preset or an inline config is
part of that text; a YAML path is not (editing the file does not invalidate the cache), so prefer the inline
form with `--use_cache` (`visroute lmms-args --config cfg.yaml` prints it). A model passed to `simple_evaluate`
as an instance is keyed by `str(instance)`, which holds the canonical config.
"""

from __future__ import annotations

import fnmatch
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

from visroute.config import RoutingConfig
from visroute.engine import apply_routing, as_config
from visroute.evaluation.boxes import answer_box
from visroute.evaluation.runner import Batch, Session
from visroute.evaluation.tasks.testbed import patch_boxes
from visroute.families import BOX_FRAMES
from visroute.integrations.lmms.presets import preset_for_model
from visroute.loading import load_model


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError(f"visroute model_args: {name} must be true or false, got {value!r}")


def resolve_routing(spec: Any, model) -> RoutingConfig | None:
    """The RoutingConfig a `routing=` value names, for `model` (presets are solved to its decoder depth and
    visual tokens per image)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "none", "unrouted")):
        return None
    if not isinstance(spec, str):
        return as_config(spec)
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            return RoutingConfig.from_dict(json.loads(text))
        except json.JSONDecodeError:
            return RoutingConfig.from_yaml_text(text, source="routing=")
    if "@" in text and not Path(text).exists():
        return preset_for_model(text, model)
    return as_config(text)


class VisrouteLMM(lmms):
    """A routed Hugging Face VLM as an lmms-eval chat model (see the module docstring for its model_args)."""

    is_simple = False

    def __init__(self, pretrained: str = "testbed", routing: Any = None, blind: Any = False, dtype: str = "bfloat16",
                 device: str | None = None, device_map: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, box_tasks: str = "*bbox_rec*", box_prompt: str = "task",
                 box_convert: Any = True, box_frame: str | None = None, side_log: str = "visroute_logs",
                 min_pixels: int | None = None,
                 max_pixels: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"visroute model_args: unknown {sorted(unknown)}; it takes pretrained, routing, blind, "
                             "dtype, device, device_map, batch_size, box_tasks, box_prompt, box_convert, box_frame, "
                             "side_log, min_pixels, max_pixels")
        if box_frame is not None and box_frame not in BOX_FRAMES:
            raise ValueError(f"visroute model_args: box_frame must be one of {', '.join(BOX_FRAMES)}, got {box_frame!r}")
        self.box_frame = box_frame
        self._processor_kwargs = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))
                                  if v is not None}
        if box_prompt not in ("task", "family"):
            raise ValueError(f"visroute model_args: box_prompt must be task or family, got {box_prompt!r}")
        from accelerate import Accelerator

        self.accelerator = Accelerator()
        # data parallel (`accelerate launch -m lmms_eval`): the launcher's environment says who this process is
        # (lmms-eval sets the same on the model once built); one model per process, on its own device
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if self._world_size > 1:
            local = int(os.environ.get("LOCAL_RANK", self._rank))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
            device_map = None
        self.pretrained = str(pretrained)
        self.blind = _flag(blind, "blind")
        self.box_convert = _flag(box_convert, "box_convert")
        self.box_tasks = [p.strip() for p in str(box_tasks).split(",") if p.strip()]
        self.box_prompt = box_prompt
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"visroute model_args: batch_size must be at least 1, got {batch_size}")
        self._model, self.processor = load_model(
            self.pretrained, dtype, device=device or ("cpu" if device_map is None else None), device_map=device_map,
            processor_kwargs=self._processor_kwargs)
        # the harness's evaluation core: prompts, frames, relevance, generation and per-sample costs
        self.session = Session(self._model, self.processor, box_frame)
        self.adapter = self.session.adapter
        self.box_frame = self.session.box_frame
        self.router = None
        self.model_args: str | None = None  # the model_args text, when built from it
        self.set_routing(resolve_routing(routing, self._model), blind=self.blind, side_log=side_log)

    def set_routing(self, config: RoutingConfig | None, blind: bool | None = None,
                    side_log: str | Path | None = None) -> None:
        """Route the loaded model by `config` (None: unrouted) from now on, optionally switching the blind control
        and the side log's folder: a sweep reuses one loaded model across runs."""
        if self.router is not None:
            self.router.remove()
        # each run (a construction, or a switch of the config) logs to a file of its own
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.config = config
        self.router = apply_routing(self._model, config) if config is not None else None
        if blind is not None:
            self.blind = bool(blind)
        if side_log is not None:
            self._side_log_dir = Path(side_log)
            self._side_log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def side_log(self) -> Path:
        """This run's side log in this process (its rank is read when written: lmms-eval sets it after
        construction)."""
        return self._side_log_dir / f"side_log.{self.run_id}.rank{self._rank}.jsonl"

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VisrouteLMM":
        """As lmms-eval's, except that a setting given in model_args (batch_size=8) wins over the command
        line's default (`--batch_size` is always passed, 1 unless given), instead of colliding with it."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        lm = cls(**args, **extra)
        lm.model_args = arg_string
        return lm

    # ---- what lmms-eval reads --------------------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self._model.parameters()).device

    def __str__(self) -> str:
        # lmms-eval keys its response cache of a model instance on str(instance): the routing config is in it
        routing = json.dumps(self.config.to_dict(), sort_keys=True) if self.config is not None else None
        return f"visroute(pretrained={self.pretrained}, routing={routing}, blind={self.blind})"

    def clean(self) -> None:
        """lmms-eval calls this after each run and, by default, deletes every module attribute; a sweep that
        reuses this model across runs keeps it, and only frees cached device memory."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def loglikelihood(self, requests):
        raise NotImplementedError("visroute answers generate_until tasks (loglikelihood is not routed)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("visroute answers single-round generate_until tasks")

    # ---- generation ----------------------------------------------------------------------------------------
    def _is_box_task(self, task: str) -> bool:
        return any(fnmatch.fnmatch(task, pattern) for pattern in self.box_tasks)

    def generate_until(self, requests) -> list[GenerationResult]:
        from tqdm.auto import tqdm

        # requests with the same generation settings go together, each batch in the order lmms-eval gave them
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[2], sort_keys=True, default=str), []).append(i)
        out: list[GenerationResult | None] = [None] * len(requests)
        batches = [idx[s:s + self.batch_size] for idx in groups.values() for s in range(0, len(idx), self.batch_size)]
        for batch in tqdm(batches, desc="visroute", disable=self._rank != 0):
            for i, result in zip(batch, self._generate([requests[i] for i in batch])):
                out[i] = result
        return out

    def _request(self, req) -> dict[str, Any]:
        """What one request asks: its images, question, document and generation settings."""
        from lmms_eval.protocol import ChatMessages

        _ctx, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
        doc = self.task_dict[task][split][doc_id]
        messages = ChatMessages(messages=doc_to_messages(doc))
        images, videos, audios = messages.extract_media()
        if videos or audios:
            raise ValueError(f"visroute runs image tasks; {task} sends videos or audio")
        text = "\n".join(c.text for m in messages.messages if m.role != "system" for c in m.content
                         if c.type == "text")
        box = self._is_box_task(task)
        if box and self.box_prompt == "family":
            text = self.adapter.grounding_prompt(doc["answer"])
        images = [im.convert("RGB") for im in images] if not self.blind else []
        return {"task": task, "split": split, "doc_id": doc_id, "doc": doc, "images": images, "text": text,
                "gen": dict(gen_kwargs or {}), "box": box,
                "padding": bool(getattr(req, "metadata", {}).get("__padding_only__"))}

    def _generate(self, reqs) -> list[GenerationResult]:
        items = [self._request(r) for r in reqs]
        batch = self.session.prepare([it["text"] for it in items], [it["images"] for it in items],
                                     [self._regions(it) for it in items])
        if self.router is not None and "relevance" in self.router.call_inputs:
            for it, relevant in zip(items, batch.relevant):
                if relevant is None:
                    raise ValueError(f"The oracle scorer needs each item's relevant visual tokens; task {it['task']} "
                                     "carries neither boxes nor relevant_tokens with their grid")
        new, texts, record = self.session.complete(batch, self._generation_settings(items[0]["gen"]), self.router)
        stats = self.session.stats(batch, record)
        results, rows = [], []
        pad = self.session.pad_token_id
        for b, (it, text) in enumerate(zip(items, texts)):
            for stop in items[0]["gen"].get("until") or []:
                if isinstance(stop, str) and stop and stop in text:
                    text = text.split(stop)[0]
            raw = text
            frame = batch.frames[b][0] if batch.frames[b] else None  # box tasks ask about the first image
            if it["box"] and self.box_convert and frame is not None:
                box = answer_box(text, frame)
                if box is not None:
                    x1, y1, x2, y2 = box
                    text = f"[{x1:.3f}, {y1:.3f}, {x2:.3f}, {y2:.3f}]"
            produced = int((new[b] != pad).sum()) if pad is not None else int(new.shape[1])
            results.append(GenerationResult(text=text, token_counts=TokenCounts(
                input_tokens=int(batch.inputs["attention_mask"][b].sum()), output_tokens=produced)))
            if not it["padding"]:
                rows.append(self._side_row(it, raw, text, stats[b], batch, b))
        with self.side_log.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return results

    def _generation_settings(self, gen: dict[str, Any]) -> dict[str, Any]:
        out = {"max_new_tokens": int(gen.get("max_new_tokens", 128)), "num_beams": int(gen.get("num_beams", 1) or 1)}
        temperature = float(gen.get("temperature", 0) or 0)
        if temperature > 0:
            out.update(do_sample=True, temperature=temperature)
            if gen.get("top_p") is not None:
                out["top_p"] = float(gen["top_p"])
        else:
            out["do_sample"] = False
        tok = getattr(self.processor, "tokenizer", self.processor)
        if getattr(tok, "pad_token_id", None) is not None:
            out["pad_token_id"] = tok.pad_token_id
        return out

    def _regions(self, item: dict[str, Any]) -> list[list[list[float]]] | None:
        """The regions of the first image an item's question is about (one hop), for the session to map onto the
        model's visual tokens: the testbed task's relevant cells (`relevant_tokens` on its `grid`), or a box
        task's ground-truth box (lmms-eval's RefCOCO docs hold it normalised, x1 y1 x2 y2)."""
        doc = item["doc"]
        if doc.get("relevant_tokens") is not None and doc.get("grid") is not None:
            rows, cols = doc["grid"]
            return [patch_boxes([int(t) for t in doc["relevant_tokens"]], int(rows), int(cols))]
        if item["box"] and doc.get("bbox") is not None:
            return [[[float(v) for v in doc["bbox"]]]]
        return None

    def _side_row(self, item: dict[str, Any], raw: str, text: str, stats, batch: Batch, b: int) -> dict[str, Any]:
        relevant = batch.relevant[b]
        routed = stats.routing is not None
        return {"run_id": self.run_id, "model_args": self.model_args or str(self),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "task": item["task"], "split": item["split"], "doc_id": int(item["doc_id"]),
                "rank": self._rank, "prediction": text, "raw_prediction": raw, "blind": self.blind,
                "routing": None if self.config is None else self.config.to_dict(),
                "avg_T": stats.avg_T, "num_visual": stats.num_visual, "kv_entries": stats.kv_entries,
                "kv_entries_unrouted": stats.kv_unrouted,
                # the visual tokens the question is about, per hop (one), as the harness's rows hold them
                "relevant": relevant,
                # per stage: the share of them still active (all hops together)
                "recall": stats.recall_all if routed and relevant and any(relevant) else None}
