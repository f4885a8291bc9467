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
* K/V. Each layer caches only the tokens that ran in it (`RoutedCache`), with a per-layer validity mask; the
  cache reports the logical (unrouted) sequence length so that `generate()` and M-RoPE continue from it.
* Decode. New tokens are text: they run through every layer and attend to that layer's valid cache entries.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from visroute.config import RoutingConfig
from visroute.families import CallInputs, FamilyAdapter, adapter_for
from visroute.merge import Merge, get_merge_class
from visroute.record import RoutingRecord, StageRecord, VisualLayout
from visroute.scoring import build_scorer
from visroute.scoring.base import Scorer, StageContext
from visroute.tensors import compact_index, gather_rows, scatter_rows_


class RoutedCache(DynamicCache):
    """The K/V cache of a routed prefill. Layer l holds only the tokens that ran in layer l (compact,
    right-padded per sample); `kv_valid[l]` (B, entries) marks the real entries. `get_seq_length` reports the
    logical sequence length (prompt + generated tokens, as if nothing had been routed)."""

    def __init__(self) -> None:
        super().__init__()
        self.logical_length = 0
        self.kv_valid: list[torch.Tensor] = []
        self.kv_dense: list[bool] = []  # per layer: no invalid entry (decode can then skip the mask)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def kv_bytes(self) -> int:
        """Bytes held by the cached key and value tensors (padding included)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in (layer.keys, layer.values)
                   if t is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.kv_valid = [v.index_select(0, beam_idx.to(v.device)) for v in self.kv_valid]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.kv_valid = [v.repeat_interleave(repeats, dim=0) for v in self.kv_valid]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.kv_valid = [v[indices] for v in self.kv_valid]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("A routed K/V cache cannot be cropped (assisted decoding is not supported)")


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


def select_top(scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, Nv) bool: per sample the `min(keep, #candidates)` candidates with the highest scores (ties go to the
    lower index)."""
    big = torch.finfo(torch.float32).max
    s = torch.nan_to_num(scores.float(), nan=-big, posinf=big, neginf=-big)
    s = torch.where(candidates, s, torch.full_like(s, float("-inf")))
    k = torch.minimum(keep, candidates.sum(1))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    take = torch.arange(s.shape[1], device=s.device)[None, :] < k[:, None]
    return torch.zeros_like(candidates).scatter_(1, order, take)


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
    decoder_kwargs: dict[str, Any]  # the family's own decoder inputs (FamilyAdapter.decoder_inputs)
    pending: dict[int, torch.Tensor]  # stage index -> scores taken at its earlier score_layer


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
        self.last_record: RoutingRecord | None = None
        self.measure_scorer_flops = measure_scorer_flops
        self._pending: CallInputs | None = None
        self._replay: RoutingRecord | None = None
        self._extras: dict[str, Any] = {}

        lm = self.adapter.language_model
        self._lm = lm
        self._lm_had_forward = "forward" in lm.__dict__  # e.g. an accelerate hook wrapper: keep and restore it
        self._lm_prev_forward = lm.__dict__.get("forward")
        self._original_forward = lm.forward
        lm.forward = self._decoder_forward
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)
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

    @contextlib.contextmanager
    def replaying(self, record: RoutingRecord) -> Iterator[None]:
        """Within the block, prefills take the stage selections of `record` instead of scoring (the replay of
        rule 4 of docs/DESIGN.md: one forward over prompt + generated tokens with the prefill's decisions frozen)."""
        self._replay = record
        try:
            yield
        finally:
            self._replay = None

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
        if isinstance(past_key_values, RoutedCache) and past_key_values.logical_length > 0:
            self._check_kwargs(kwargs, attention_mask)
            return self._decode(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values)
        if call is None or call.visual_mask is None:
            self.last_record = None
            return self._original_forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
                **family_kwargs,
            )
        self._check_kwargs(kwargs, attention_mask)
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("Routing needs the image prompt in one prefill that starts from an empty cache")
        if use_cache is None:
            use_cache = bool(getattr(self.adapter.text_config, "use_cache", True))
        return self._prefill(call, input_ids, inputs_embeds, attention_mask, position_ids, use_cache, family_kwargs)

    @staticmethod
    def _check_kwargs(kwargs: dict, attention_mask) -> None:
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
        if attention_mask is not None and (isinstance(attention_mask, dict) or attention_mask.dim() != 2):
            raise ValueError("Routing takes a 2-D padding attention mask (batch, sequence); it builds its own masks")

    # ---- prefill --------------------------------------------------------------------------------------------
    def _prefill(self, call, input_ids, embeds, attention_mask, position_ids, use_cache, family_kwargs):
        lm, adapter, cfg = self._lm, self.adapter, self.config
        if embeds is None:
            embeds = lm.embed_tokens(input_ids)
        b, length, dim = embeds.shape
        dev = embeds.device
        eager = adapter.text_config._attn_implementation == "eager"
        dummy_col = torch.zeros(b, 1, dtype=torch.bool, device=dev)

        valid = attention_mask.to(dev).bool() if attention_mask is not None else torch.ones(b, length, dtype=torch.bool, device=dev)
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
            active=layout.valid.clone(), decoder_kwargs=family_kwargs, pending={},
        )
        record, full = state.record, state.full
        for part in self._parts():
            part.begin_prefill()
        cache = RoutedCache() if use_cache else None
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
                state.pending[i] = self._score(i, state, self._candidates(state))[0]
            active = state.active
            present = state.text.clone().scatter_(1, layout.positions, active)
            present[:, length] = False  # (B, L+1): the tokens that run in this segment
            idx, cvalid = compact_index(present, dummy=length)  # (B, C): the compact sequence
            h = gather_rows(full, idx)  # (B, C, D)
            rotary = (gather_rows(state.cos, idx), gather_rows(state.sin, idx))
            mask = None if bool(cvalid.all()) else _causal_mask(cvalid, cvalid.shape[1], eager, embeds.dtype)
            ran, ran_visual = cvalid.sum(1).cpu(), active.sum(1).cpu()
            for li in range(start, end):
                out = adapter.layers[li](h, attention_mask=mask, position_embeddings=rotary,
                                         past_key_values=cache, use_cache=use_cache)
                h = out[0] if isinstance(out, tuple) else out
                if hook_layers:
                    h = adapter.after_layer(li, h, idx, cvalid, state)
                record.active_tokens[li], record.active_visual[li] = ran, ran_visual
                if cache is not None:
                    cache.kv_valid.append(cvalid)
                    cache.kv_dense.append(mask is None)
            scatter_rows_(full, idx, h)

        hidden = lm.norm(full[:, :length])
        if cache is not None:
            cache.logical_length = length
            record.kv_tokens = torch.stack([v.sum(1) for v in cache.kv_valid]).cpu()
        self.last_record = record
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def _candidates(self, state: _Prefill) -> torch.Tensor:
        """(B, Nv) the visual tokens a stage may choose among: prune, the ones active so far; reroute, all. Pinned
        tokens (always active, e.g. LLaVA-NeXT's newline tokens when kept) are never candidates."""
        candidates = state.active if self.config.action == "prune" else state.layout.valid
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
            stage_index=i, layer_index=layer_index, action=self.config.action, layer=self.adapter.layers[layer_index],
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
        candidates = self._candidates(state)
        pinned = layout.pinned if layout.pinned is not None else torch.zeros_like(candidates)
        requested = stage.keep_counts(counts)
        scores, scorer_flops = None, None
        if self._replay is not None:
            new = self._replay.stages[i].active.to(candidates.device)
            if new.shape != candidates.shape:
                raise ValueError("The replayed record does not match this batch's visual tokens")
        else:
            if i in state.pending:  # taken at an earlier score_layer
                scores = state.pending.pop(i)
            else:
                scores, scorer_flops = self._score(i, state, candidates)
            # pinned tokens count towards the budget: the candidates fill what they leave
            new = select_top(scores, candidates, (requested - pinned.sum(1)).clamp(min=0)) | pinned
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
                        score_layer=stage.scoring_layer)
        )
        return new

    # ---- decode ---------------------------------------------------------------------------------------------
    def _decode(self, input_ids, embeds, attention_mask, position_ids, cache: RoutedCache):
        lm, adapter = self._lm, self.adapter
        if embeds is None:
            embeds = lm.embed_tokens(input_ids)
        b, q, _ = embeds.shape
        dev = embeds.device
        eager = adapter.text_config._attn_implementation == "eager"
        new_valid = (attention_mask[:, -q:].to(dev).bool() if attention_mask is not None
                     else torch.ones(b, q, dtype=torch.bool, device=dev))
        pos = adapter.rope_position_ids(position_ids, b, q, cache.logical_length, dev)
        rotary = adapter.rotary(embeds, pos)
        new_dense = bool(new_valid.all())  # one host sync per step, not one per layer
        h = embeds
        for li, layer in enumerate(adapter.layers):
            key_valid = torch.cat([cache.kv_valid[li].to(dev), new_valid], 1)
            dense = cache.kv_dense[li] and new_dense
            mask = None if (q == 1 and dense) else _causal_mask(key_valid, q, eager, embeds.dtype)
            out = layer(h, attention_mask=mask, position_embeddings=rotary, past_key_values=cache, use_cache=True)
            h = out[0] if isinstance(out, tuple) else out
            cache.kv_valid[li], cache.kv_dense[li] = key_valid, dense
        cache.logical_length += q
        return BaseModelOutputWithPast(last_hidden_state=lm.norm(h), past_key_values=cache)


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
