"""The routed decoder loop.

`apply_routing(model, config)` replaces the forward of the model's text decoder by `Router._decoder_forward`,
which owns the layer loop:

* Prefill. The schedule cuts the layers into segments at its stage layers. At a stage the scorer ranks the
  candidate visual tokens from the hidden states entering that layer, and the top `keep` of each sample become
  the active set. Within a segment the sequence is compact: only the text tokens and the active visual tokens,
  in their original order, right-padded per sample. Tokens keep their original rotary positions, so a causal
  mask over the compact order is the causal mask of the original sequence. After the segment the outputs are
  written back into a full-length buffer: tokens that did not run keep the state they had (the reroute bypass;
  under prune they are never selected again).
* K/V. Each layer caches only the tokens that ran in it (`RoutedLayer`, kept in `visroute.cache`): a buffer
  preallocated at the prefill with the compact prompt entries and room for the tokens `generate` will decode,
  filled in place, with its validity mask. The cache reports the logical (unrouted) sequence length so that `generate()` and M-RoPE
  continue from it. An empty `DynamicCache` or `StaticCache` handed to the prefill is filled in place (a static
  cache keeps its capacity); caches that cannot hold routed layers (quantized, offloaded) and assisted decoding
  (which crops the cache) are refused by name.
* Decode. New tokens are text: they run through every layer and attend to that layer's valid cache entries.
  The step syncs nothing with the host; `Router.compile_decode` runs it compiled, with fixed shapes.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers.cache_utils import StaticLayer
from transformers.modeling_outputs import BaseModelOutputWithPast

from visroute.cache import (
    UNSUPPORTED_CACHES,
    Progress,
    RoutedCache,
    RoutedLayer,
    check_cache,
    routed_layers,
)
from visroute.config import RoutingConfig
from visroute.families import CallInputs, FamilyAdapter, adapter_for
from visroute.merge import Merge, get_merge_class
from visroute.record import RoutingRecord, StageRecord, VisualLayout
from visroute.reentry import ReentryPolicy, build_reentry, select_top
from visroute.scoring import build_scorer
from visroute.scoring.base import Scorer, StageContext
from visroute.tensors import compact_index, gather_rows, scatter_rows_


def _causal_mask(key_valid: torch.Tensor, n_query: int, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, Q, K) mask for the last Q of K compact positions: causal over the compact order and blind to
    invalid keys. Bool for SDPA, additive for eager attention."""
    b, k = key_valid.shape
    q_pos = torch.arange(k - n_query, k, device=key_valid.device)
    allowed = (torch.arange(k, device=key_valid.device)[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :]
    allowed = allowed[:, None]
    if eager:
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


# Keyword inputs the text decoder may receive that routing handles (the output flags must be off).
_KNOWN_DECODER_KWARGS = {"output_attentions", "output_hidden_states", "return_dict", "cache_position"}


@dataclass
class _Prefill:
    """The state one prefill shares across its stages. Sequence tensors carry a dummy slot at index L ("_x"),
    which padded index tensors point to, so that gathers and scatters need no masks."""

    layout: VisualLayout
    full: torch.Tensor  # (B, L+1, D) the latest hidden state of every position: a bypassed token's carry
    embeds_x: torch.Tensor  # (B, L+1, D) the decoder's input embeddings
    valid_x: torch.Tensor  # (B, L+1) real (non-padding) tokens
    text: torch.Tensor  # (B, L+1) text tokens
    cos: torch.Tensor  # (B, L+1, head_dim) rotary embeddings of every position
    sin: torch.Tensor
    last_index: torch.Tensor  # (B,) each sample's last prompt token
    input_ids: torch.Tensor | None  # (B, L)
    record: RoutingRecord
    active: torch.Tensor  # (B, Nv) the visual tokens active in the current segment
    alive: torch.Tensor  # (B, Nv) the visual tokens no prune stage has removed: a reroute stage's candidates
    decoder_kwargs: dict[str, Any]  # the family's own decoder inputs (FamilyAdapter.decoder_inputs)
    pending: dict[int, tuple]  # stage index -> (scores, their FLOPs) taken at its earlier score_layer


class Router:
    """Routes every forward / `generate` of `model` by `config`. Create it with `apply_routing`."""

    def __init__(self, model: nn.Module, config: RoutingConfig, measure_scorer_flops: bool = False):
        if getattr(model, "_visroute_router", None) is not None:
            raise RuntimeError("This model is already routed; call router.remove() first")
        self.model = model
        self.config = config
        self.adapter = adapter_for(model)
        config.validate_for(self.adapter.num_layers)
        impl = getattr(self.adapter.text_config, "_attn_implementation", "sdpa")
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"visroute runs the decoder with SDPA or eager attention, not {impl!r}")
        self.adapter.options = type(self.adapter).build_options(config.family_options)
        # one scorer instance per distinct (name, options): the config's, and any a stage names itself
        self.scorers: dict[str, Scorer] = {}
        self._stage_scorers: list[Scorer] = [self._scorer_for(*config.scorer_of(st)) for st in config.stages]
        self.scorer = self._scorer_for(config.scorer, config.scorer_options)
        self._stage_merges: list[Merge | None] = [
            get_merge_class(st.merge)(**st.merge_options) if st.merge else None for st in config.stages
        ]
        self.reentry: ReentryPolicy = build_reentry(config.reentry, config.reentry_options)
        self.last_record: RoutingRecord | None = None
        self.measure_scorer_flops = measure_scorer_flops
        self._pending: CallInputs | None = None
        self._replay: RoutingRecord | None = None
        self._extras: dict[str, Any] = {}
        self._generation_length: int | None = None  # generate's cache length for the next prefill (decode room)
        self._compiled_step = None

        lm = self.adapter.language_model
        self._lm = lm
        self._lm_had_forward = "forward" in lm.__dict__  # e.g. an accelerate hook wrapper: keep and restore it
        self._lm_prev_forward = lm.__dict__.get("forward")
        self._original_forward = lm.forward
        lm.forward = self._decoder_forward
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
        self._had_prepare = "_prepare_cache_for_generation" in model.__dict__
        self._prev_prepare = model.__dict__.get("_prepare_cache_for_generation")
        self._original_prepare = getattr(model, "_prepare_cache_for_generation", None)
        if self._original_prepare is not None:
            model._prepare_cache_for_generation = self._prepare_cache_for_generation
        self.adapter.install()
        for part in self._parts():
            part.attach(self.adapter)
        model._visroute_router = self

    def _scorer_for(self, name: str, options: dict[str, Any]) -> Scorer:
        key = f"{name} {sorted(options.items())!r}"
        if key not in self.scorers:
            self.scorers[key] = build_scorer(name, options)
        return self.scorers[key]

    def _parts(self) -> list[Scorer | Merge]:
        return list(self.scorers.values()) + [m for m in self._stage_merges if m is not None]

    # ---- public ---------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Undo `apply_routing`: the model is exactly as before."""
        if getattr(self.model, "_visroute_router", None) is not self:
            return
        self._hook.remove()
        if self._original_prepare is not None:
            if self._had_prepare:
                self.model._prepare_cache_for_generation = self._prev_prepare
            else:
                del self.model._prepare_cache_for_generation
        self.adapter.uninstall()
        if self._lm_had_forward:
            self._lm.forward = self._lm_prev_forward
        else:
            del self._lm.forward
        for part in self._parts():
            part.detach()
        del self.model._visroute_router

    def __enter__(self) -> "Router":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
        """`generate`'s cache set-up, seen first: refuses what a routed cache cannot do, and notes the cache length
        `generate` will reach (prompt + max_new_tokens - 1) so that the prefill preallocates that much room."""
        from transformers.generation import GenerationMode

        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            raise ValueError(
                "Assisted / speculative decoding (assistant_model, prompt_lookup_num_tokens, assistant_early_exit) "
                "is not supported under routing: it rolls the K/V cache back after rejected draft tokens (crop), and "
                "a routed cache cannot be cropped. Generate without an assistant, or router.remove() first.")
        implementation = generation_config.cache_implementation
        if implementation in UNSUPPORTED_CACHES:
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported under routing: routing keeps its own "
                f"compact K/V per layer and cannot fill {UNSUPPORTED_CACHES[implementation]}. Use the default "
                "dynamic cache or cache_implementation='static'.")
        if model_kwargs.get("past_key_values") is not None:
            check_cache(model_kwargs["past_key_values"])
        # generate would compile the whole routed forward, hooks and all; the decode step compiles on its own
        if generation_config.compile_config is not None and not generation_config.disable_compile:
            warnings.warn("generate's compile_config does not apply under routing; router.compile_decode() "
                          "compiles the routed decode step", stacklevel=3)
        generation_config.disable_compile = True
        out = self._original_prepare(generation_config, model_kwargs, generation_mode, *args, **kwargs)
        bound = inspect.signature(self._original_prepare).bind(generation_config, model_kwargs, generation_mode,
                                                               *args, **kwargs)
        self._generation_length = bound.arguments.get("max_cache_length")
        return out

    @contextlib.contextmanager
    def replaying(self, record: RoutingRecord) -> Iterator[None]:
        """Within the block, prefills take the stage selections of `record` instead of scoring (the replay of
        rule 4 of docs/DESIGN.md: one forward over prompt + generated tokens with the prefill's decisions frozen)."""
        self._replay = record
        try:
            yield
        finally:
            self._replay = None

    def compile_decode(self, enable: bool = True, **compile_options: Any) -> None:
        """Decode through a `torch.compile`d step (`compile_options` go to `torch.compile`; `fullgraph=True` unless
        given; on a GPU, `mode="reduce-overhead"` captures it in a CUDA graph). The compiled step has fixed shapes
        and no host synchronisation: every layer attends over its cache's whole capacity, the entries not yet
        written masked, and writes in place at positions held on the device. A cache sized by `generate`
        (`max_new_tokens`, or `cache_implementation="static"`) keeps its capacity for the whole generation; one
        that grows (a plain forward, then decode calls beyond its room) recompiles when it does. The prefill
        stays eager. `compile_decode(False)` goes back to the eager step."""
        if not enable:
            self._compiled_step = None
            return
        options = {"fullgraph": True, **compile_options}
        self._compiled_step = torch.compile(self._decode_layers, **options)

    @property
    def call_inputs(self) -> set[str]:
        """The per-call inputs the config's scorers declare (pass them with `call_options`)."""
        return {name for scorer in self._stage_scorers for name in type(scorer).call_inputs}

    @contextlib.contextmanager
    def call_options(self, **extras: Any) -> Iterator[None]:
        """Per-call inputs for scorers within the block, e.g. `relevance=` for the oracle."""
        old, self._extras = self._extras, dict(extras)
        try:
            yield
        finally:
            self._extras = old

    # ---- hooks ----------------------------------------------------------------------------------------------
    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Read the call here, before the model itself complains about a processor mismatch. Decode steps hold
        # no images (a generated token may still equal the image token id), so they are not read.
        bound = self.adapter.bind(args, kwargs)
        past = bound.get("past_key_values")
        decoding = past is not None and past.get_seq_length() > 0
        self._pending = None if decoding else self.adapter.capture(bound)

    def _decoder_forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ):
        call, self._pending = self._pending, None
        family_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in self.adapter.decoder_inputs}
        layers = routed_layers(past_key_values)
        if layers is not None and layers[0].get_seq_length() > 0:
            self._check_kwargs(kwargs)
            return self._decode(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values, layers)
        if call is None or call.visual_mask is None:
            self.last_record = None
            self._generation_length = None
            return self._original_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
                **family_kwargs,
            )
        self._check_kwargs(kwargs)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("Routing needs the image prompt in one prefill that starts from an empty cache")
        if use_cache is None:
            use_cache = bool(getattr(self.adapter.text_config, "use_cache", True))
        return self._prefill(call, input_ids, inputs_embeds, attention_mask, position_ids, use_cache, family_kwargs,
                             past_key_values)

    @staticmethod
    def _check_kwargs(kwargs: dict) -> None:
        # the family's own decoder inputs were taken out before this check
        unknown = sorted(k for k, v in kwargs.items() if k not in _KNOWN_DECODER_KWARGS and v is not None)
        if unknown:
            # e.g. Qwen3-VL's deepstack_visual_embeds / visual_pos_masks: silently dropping them would change
            # what the model computes
            raise ValueError(
                f"The routed decoder does not know the decoder inputs {unknown}; this model family needs an "
                "adapter that handles them"
            )
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError(
                "output_attentions / output_hidden_states are not available while routing; "
                "use router.last_record, or router.remove() for an unrouted forward"
            )

    @staticmethod
    def _padding_mask(attention_mask, cache, b: int, length: int, dev) -> torch.Tensor:
        """(B, L) the real tokens of the prompt. Routing builds its own masks, so it takes a 2-D padding mask, or
        the 4-D causal padding mask `generate` builds for a static cache (read back, and checked to be exactly
        that)."""
        if isinstance(attention_mask, dict) and set(attention_mask) == {"full_attention"}:
            attention_mask = attention_mask["full_attention"]
        if attention_mask is None:
            return torch.ones(b, length, dtype=torch.bool, device=dev)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            return attention_mask.to(dev).bool()
        if (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and cache is not None
                and cache.is_compileable and attention_mask.shape[2] == length and attention_mask.shape[3] >= length):
            m = attention_mask[:, 0].to(dev)
            allowed = m if m.dtype == torch.bool else m == 0  # (B, L, K)
            valid = allowed[:, -1, :length]  # the last query sees every real token before it
            causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
            rows = valid[:, :, None]  # padding queries' rows are not read
            if (bool(((allowed[:, :, :length] == (causal[None] & valid[:, None, :])) | ~rows).all())
                    and not bool((allowed[:, :, length:] & rows).any())):
                return valid
        raise ValueError("Routing takes a 2-D padding attention mask (batch, sequence); it builds its own masks")

    # ---- prefill --------------------------------------------------------------------------------------------
    def _prefill(self, call, input_ids, embeds, attention_mask, position_ids, use_cache, family_kwargs, given_cache):
        lm, adapter, cfg = self._lm, self.adapter, self.config
        if embeds is None:
            embeds = lm.embed_tokens(input_ids)
        b, length, dim = embeds.shape
        dev = embeds.device
        eager = adapter.text_config._attn_implementation == "eager"
        dummy_col = torch.zeros(b, 1, dtype=torch.bool, device=dev)

        valid = self._padding_mask(attention_mask, given_cache, b, length, dev)
        layout = adapter.layout(call, valid)
        visual = torch.zeros(b, length + 1, dtype=torch.bool, device=dev).scatter_(1, layout.positions, layout.valid)
        visual[:, length] = False  # (B, L+1)
        valid_x = torch.cat([valid, dummy_col], 1)  # (B, L+1)
        seq = torch.arange(length, device=dev)
        pos = adapter.rope_position_ids(position_ids, b, length, 0, dev)
        cos, sin = adapter.rotary(embeds, pos)  # (B, L, head_dim)
        embeds_x = torch.cat([embeds, embeds.new_zeros(b, 1, dim)], 1)  # (B, L+1, D)
        num_layers = adapter.num_layers
        state = _Prefill(
            layout=layout, full=embeds_x.clone(), embeds_x=embeds_x, valid_x=valid_x, text=valid_x & ~visual,
            cos=torch.cat([cos, cos[:, :1]], 1), sin=torch.cat([sin, sin[:, :1]], 1),  # (B, L+1, head_dim)
            last_index=torch.where(valid, seq, -1).max(1).values, input_ids=call.input_ids,
            record=RoutingRecord(
                action=cfg.action, scorer=cfg.scorer, num_layers=num_layers, num_visual=layout.counts.cpu(),
                images=layout.images, seq_lengths=valid.sum(1).cpu(),
                active_tokens=torch.zeros(num_layers, b, dtype=torch.long),
                active_visual=torch.zeros(num_layers, b, dtype=torch.long),
            ),
            active=layout.valid.clone(), alive=layout.valid.clone(), decoder_kwargs=family_kwargs, pending={},
        )
        record, full = state.record, state.full
        for part in self._parts():
            part.begin_prefill()
        self.reentry.begin_prefill()
        cache, room, progress = self._prefill_cache(given_cache, use_cache, length, dev)
        kv_valid: list[torch.Tensor] = []
        stage_at = {s.layer: i for i, s in enumerate(cfg.stages)}
        scores_at: dict[int, list[int]] = {}  # layer -> stages that take their scores there, before acting later
        for i, st in enumerate(cfg.stages):
            if st.scoring_layer != st.layer:
                scores_at.setdefault(st.scoring_layer, []).append(i)
        bounds = sorted({0, num_layers, *stage_at, *scores_at})
        hook_layers = type(adapter).after_layer is not FamilyAdapter.after_layer

        for start, end in zip(bounds, bounds[1:]):
            if start in stage_at:
                state.active = self._run_stage(stage_at[start], state)
            for i in scores_at.get(start, []):
                state.pending[i] = self._score(i, state, self._candidates(i, state))
            active = state.active
            present = state.text.clone().scatter_(1, layout.positions, active)
            present[:, length] = False  # (B, L+1): the tokens that run in this segment
            idx, cvalid = compact_index(present, dummy=length)  # (B, C): the compact sequence
            h = gather_rows(full, idx)  # (B, C, D)
            rotary = (gather_rows(state.cos, idx), gather_rows(state.sin, idx))
            mask = None if bool(cvalid.all()) else _causal_mask(cvalid, cvalid.shape[1], eager, embeds.dtype)
            ran, ran_visual = cvalid.sum(1).cpu(), active.sum(1).cpu()
            for li in range(start, end):
                if cache is not None:
                    cache.layers[li] = RoutedLayer(cvalid, room, progress)
                    kv_valid.append(cvalid)
                out = adapter.layers[li](h, attention_mask=mask, position_embeddings=rotary,
                                         past_key_values=cache, use_cache=use_cache)
                h = out[0] if isinstance(out, tuple) else out
                if hook_layers:
                    h = adapter.after_layer(li, h, idx, cvalid, state)
                record.active_tokens[li], record.active_visual[li] = ran, ran_visual
            scatter_rows_(full, idx, h)

        hidden = lm.norm(full[:, :length])
        if cache is not None:
            progress.prompt_length = length
            record.kv_tokens = torch.stack([v.sum(1) for v in kv_valid]).cpu()
        self.last_record = record
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def _prefill_cache(self, given, use_cache: bool, length: int, dev):
        """The cache a prefill fills, the room each layer keeps for decode entries, and the progress its layers
        share. An empty cache passed in (by `generate` or the caller) is filled in place, its layers replaced by
        routed ones: a static cache keeps its capacity (max_cache_len, prompt included); otherwise the room is
        what `generate` said it will decode (none for a plain forward: decoding then grows it)."""
        wanted, self._generation_length = self._generation_length, None
        if given is None and not use_cache:
            return None, 0, None
        cache = RoutedCache() if given is None else given
        check_cache(cache)
        static = next((getattr(layer, "max_cache_len", None) for layer in cache.layers
                       if isinstance(layer, (StaticLayer, RoutedLayer))), None)
        if static is not None:
            if static < length:
                raise ValueError(f"The static cache holds {static} tokens (max_cache_len), fewer than the "
                                 f"{length}-token prompt")
            room = static - length
        else:
            room = max(0, (wanted or 0) - length)
        cache.layers = [None] * self.adapter.num_layers  # each filled by the prefill before its layer runs
        return cache, room, Progress(0, dev, static)

    def _candidates(self, i: int, state: _Prefill) -> torch.Tensor:
        """(B, Nv) the visual tokens stage i may choose among: a prune stage, the ones active so far; a reroute
        stage, every one no earlier prune stage removed. Pinned tokens (always active, e.g. LLaVA-NeXT's newline
        tokens when kept) are never candidates."""
        prune = self.config.action_of(self.config.stages[i]) == "prune"
        candidates = state.active if prune else state.alive
        if state.layout.pinned is not None:
            candidates = candidates & ~state.layout.pinned
        return candidates

    def _score(self, i: int, state: _Prefill, candidates: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """Stage i's scores (B, Nv) from the hidden states entering its scoring layer (now), and their FLOPs
        when measured."""
        stage, layout = self.config.stages[i], state.layout
        key_mask = state.text.clone().scatter_(1, layout.positions, candidates)
        key_mask[:, -1] = False  # (B, L+1): text + candidates
        ctx = self._context(i, state, candidates, key_mask, stage.scoring_layer)
        scorer = self._stage_scorers[i]
        if not self.measure_scorer_flops:
            return scorer.score(ctx).to(candidates.device), None
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            scores = scorer.score(ctx)
        return scores.to(candidates.device), counter.get_total_flops()

    def _context(self, i: int, state: _Prefill, candidates, key_mask, layer_index: int) -> StageContext:
        stage = self.config.stages[i]
        return StageContext(
            stage_index=i, layer_index=layer_index, action=self.config.action_of(stage), layer=self.adapter.layers[layer_index],
            hidden=state.full, inputs_embeds=state.embeds_x, valid=state.valid_x, text=state.text,
            layout=state.layout, candidates=candidates, key_mask=key_mask, cos=state.cos, sin=state.sin,
            last_index=state.last_index, input_ids=state.input_ids, adapter=self.adapter, extras=self._extras,
            requested=stage.keep_counts(state.layout.counts),
        )

    def _run_stage(self, i: int, state: _Prefill) -> torch.Tensor:
        """Stage i: rank the candidates, keep the top of each sample (and merge, where the stage merges);
        returns the new (B, Nv) active set."""
        stage, layout = self.config.stages[i], state.layout
        counts = layout.counts
        action = self.config.action_of(stage)
        candidates = self._candidates(i, state)
        pinned = layout.pinned if layout.pinned is not None else torch.zeros_like(candidates)
        requested = stage.keep_counts(counts)
        scores, scorer_flops = None, None
        if self._replay is not None:
            new = self._replay.stages[i].active.to(candidates.device)
            if new.shape != candidates.shape:
                raise ValueError("The replayed record does not match this batch's visual tokens")
        else:
            if i in state.pending:  # taken at an earlier score_layer
                scores, scorer_flops = state.pending.pop(i)
            else:
                scores, scorer_flops = self._score(i, state, candidates)
            # pinned tokens count towards the budget: the candidates fill what they leave
            budget = (requested - pinned.sum(1)).clamp(min=0)
            if action == "reroute":
                new = self.reentry.select(scores, candidates, state.active & ~pinned, budget) | pinned
            else:
                new = select_top(scores, candidates, budget) | pinned
        if action == "prune":
            state.alive = new.clone()
        merge = self._stage_merges[i]
        if merge is not None:
            key_mask = state.text.clone().scatter_(1, layout.positions, candidates)
            key_mask[:, -1] = False
            merged = merge.merge(self._context(i, state, candidates, key_mask, stage.layer), new)  # (B, Nv, D)
            rows = torch.where(new[..., None], merged.to(state.full.dtype), gather_rows(state.full, layout.positions))
            scatter_rows_(state.full, layout.positions, rows)  # padded entries land in the dummy slot
        state.record.stages.append(
            StageRecord(layer=stage.layer, keep=stage.keep, active=new.cpu(), requested=requested.cpu(),
                        candidates=candidates.sum(1).cpu(), num_visual=counts.cpu(),
                        scores=None if scores is None else scores.detach().float().cpu(), scorer_flops=scorer_flops,
                        score_layer=stage.scoring_layer, action=action)
        )
        return new

    # ---- decode ---------------------------------------------------------------------------------------------
    def _decode(self, input_ids, embeds, attention_mask, position_ids, cache, layers: list[RoutedLayer]):
        lm, adapter = self._lm, self.adapter
        if attention_mask is not None and not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2):
            raise ValueError("Routing takes a 2-D padding attention mask (batch, sequence); it builds its own masks")
        if embeds is None:
            embeds = lm.embed_tokens(input_ids)
        b, q, _ = embeds.shape
        dev = embeds.device
        progress = layers[0].progress
        new_valid = (attention_mask[:, -q:].to(dev).bool() if attention_mask is not None
                     else torch.ones(b, q, dtype=torch.bool, device=dev))
        pos = adapter.rope_position_ids(position_ids, b, q, layers[0].get_seq_length(), dev)
        cos, sin = adapter.rotary(embeds, pos)
        need = progress.written + q
        if need > layers[0].room:
            if progress.static_length is not None:
                raise ValueError(f"The static cache is full: it holds {progress.static_length} tokens (max_cache_len); "
                                 "give it room for every token to decode")
            room = max(need, 2 * layers[0].room, 16)
            for layer in layers:
                layer.grow(room)
        step = self._compiled_step or self._decode_layers
        progress.fixed_shapes = self._compiled_step is not None
        try:
            hidden = step(embeds, cos, sin, new_valid, cache)
        finally:
            progress.fixed_shapes = False
        progress.advance(q)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def _decode_layers(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, new_valid: torch.Tensor,
                       cache) -> torch.Tensor:
        """One decode step of q new (text) tokens through every layer, each attending to that layer's valid cache
        entries and itself; returns the normed hidden states. No host synchronisation: the eager step reads
        shapes the host already knows (the entries written so far), the fixed-shape step (compiled) every layer's
        whole capacity, with positions held on the device."""
        eager = self.adapter.text_config._attn_implementation == "eager"
        for li, layer in enumerate(self.adapter.layers):
            mask = cache.layers[li].decode_mask(new_valid, eager, h.dtype)
            out = layer(h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True)
            h = out[0] if isinstance(out, tuple) else out
        return self._lm.norm(h)


def as_config(config: RoutingConfig | dict | str | Path) -> RoutingConfig:
    """A RoutingConfig from a RoutingConfig, a dict or a YAML file path."""
    if isinstance(config, RoutingConfig):
        return config
    if isinstance(config, dict):
        return RoutingConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return RoutingConfig.from_yaml(config)
    raise TypeError(f"config must be a RoutingConfig, a dict or a YAML path, not {type(config).__name__}")


def apply_routing(
    model: nn.Module, config: RoutingConfig | dict | str | Path, measure_scorer_flops: bool = False
) -> Router:
    """Route every later forward / `generate` of `model` by `config` (a RoutingConfig, a dict, or a YAML
    path). Returns the Router; `router.remove()` (or leaving a `with` block) restores the model.
    `measure_scorer_flops` counts each stage's scoring FLOPs (torch's FlopCounterMode) into the record."""
    return Router(model, as_config(config), measure_scorer_flops=measure_scorer_flops)
