"""What a prefill cost, from its `RoutingRecord`: executed FLOPs per decoder layer and in total, the papers'
formula TFLOPs, K/V bytes (read from the real cache object, and the unrouted size for comparison), avg_T.

Executed FLOPs count the matrix products that ran, 2 FLOPs per multiply-add, the way torch's FlopCounterMode
counts them: per decoder layer the q/k/v/o projections (grouped-query K/V heads), the gated MLP and attention
over the causal context present in that layer; the scorer's own work (as the router measured it); the vision
tower and projector once per image; the LM head for the positions whose logits were computed. Element-wise
work (norms, activations, RoPE, softmax) is not counted, as neither FlopCounterMode nor the papers count it.

The papers' formula (FastV, PyramidDrop) is per layer 4nd^2 + 2n^2d + 3ndm with n the tokens in that layer:
multiply-adds of a multi-head (not grouped) layer with full n x n attention, decoder only; we report it in
TFLOPs so tables line up with theirs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from visroute.record import RoutingRecord


# ---- model dimensions -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecoderDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    num_layers: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, text_config) -> "DecoderDims":
        heads = text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            hidden=text_config.hidden_size, heads=heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            intermediate=text_config.intermediate_size, vocab=text_config.vocab_size,
            num_layers=text_config.num_hidden_layers,
        )

    def layer_flops(self, n: int, causal: bool = True) -> int:
        """FLOPs of one decoder layer over n tokens that attend causally among themselves (`causal=False`: the
        full n x n score matrix, as dense attention kernels compute it)."""
        d, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        proj = 2 * n * (d * qd + 2 * d * kvd + qd * d)
        mlp = 2 * n * (3 if self.gated_mlp else 2) * d * self.intermediate
        pairs = n * (n + 1) // 2 if causal else n * n
        attn = 2 * 2 * self.heads * self.head_dim * pairs  # scores and the weighted sum of values
        return proj + mlp + attn

    def formula_flops(self, n: int) -> int:
        """The papers' per-layer count: 4nd^2 + 2n^2d + 3ndm."""
        d, m = self.hidden, self.intermediate
        return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m

    def kv_bytes_per_token(self, element_size: int) -> int:
        return 2 * self.kv_heads * self.head_dim * element_size


def _text_config(model_or_config):
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "text_config", cfg), cfg


# ---- vision towers --------------------------------------------------------------------------------------------
def vision_flops(model_or_config, record: RoutingRecord) -> tuple[int, int]:
    """(vision tower, projector / merger) FLOPs for the images of a record, each image encoded once (the
    model family's own count, `FamilyAdapter.vision_flops`)."""
    from visroute.families import family_for_config

    _, cfg = _text_config(model_or_config)
    images = [img for sample in record.images for img in sample]
    return family_for_config(cfg).vision_flops(cfg, images)


# ---- reports --------------------------------------------------------------------------------------------------
@dataclass
class FlopReport:
    """Executed FLOPs of one prefill (summed over the batch)."""

    per_layer: list[int]
    decoder: int
    vision: int
    projector: int
    scorer: int
    lm_head: int
    scorer_measured: bool = True

    @property
    def total(self) -> int:
        return self.decoder + self.vision + self.projector + self.scorer + self.lm_head

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


def unrouted_record(record: RoutingRecord) -> RoutingRecord:
    """The keep-all counterpart of a record: every token runs and is cached in every layer."""
    layers, seq = record.num_layers, record.seq_lengths
    return RoutingRecord(
        action=record.action, scorer=record.scorer, num_layers=layers, num_visual=record.num_visual,
        images=record.images, seq_lengths=seq, stages=[],
        active_tokens=seq[None, :].repeat(layers, 1), active_visual=record.num_visual[None, :].repeat(layers, 1),
        kv_tokens=seq[None, :].repeat(layers, 1),
    )


def executed_flops(
    record: RoutingRecord,
    model_or_config,
    logits_tokens: int | None = 1,
    vision: bool = True,
    causal: bool = True,
) -> FlopReport:
    """Executed FLOPs of the prefill a record describes.

    logits_tokens: positions per sample whose logits were computed (1 as in `generate`; None: all positions).
    vision: count the vision tower and projector (False when image features were given pre-encoded).
    causal: attention over the causal context (what causal kernels do); False counts the full n x n matrix."""
    text, cfg = _text_config(model_or_config)
    dims = DecoderDims.from_config(text)
    if record.num_layers != dims.num_layers:
        raise ValueError(f"The record has {record.num_layers} layers, the model {dims.num_layers}")
    per_layer = [sum(dims.layer_flops(int(n), causal) for n in row) for row in record.active_tokens.tolist()]
    scorer_values = [s.scorer_flops for s in record.stages]
    measured = all(v is not None for v in scorer_values)
    scorer = sum(v or 0 for v in scorer_values)
    tower, projector = vision_flops(cfg, record) if vision else (0, 0)
    positions = record.seq_lengths.tolist() if logits_tokens is None else [logits_tokens] * record.batch_size
    lm_head = sum(2 * dims.hidden * dims.vocab * int(n) for n in positions)
    return FlopReport(per_layer=per_layer, decoder=sum(per_layer), vision=tower, projector=projector,
                      scorer=scorer, lm_head=lm_head, scorer_measured=measured)


def formula_tflops(record: RoutingRecord, model_or_config) -> float:
    """The papers' decoder TFLOPs: the sum over layers and samples of 4nd^2 + 2n^2d + 3ndm, / 1e12."""
    dims = DecoderDims.from_config(_text_config(model_or_config)[0])
    return sum(dims.formula_flops(int(n)) for row in record.active_tokens.tolist() for n in row) / 1e12


def cache_kv_bytes(cache) -> int:
    """Bytes of the key and value tensors a cache object holds (padding entries included)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def record_kv_bytes(record: RoutingRecord, model_or_config, element_size: int) -> int:
    """K/V bytes of the entries a record says were cached (padding excluded)."""
    if record.kv_tokens is None:
        raise ValueError("The record holds no K/V counts (the prefill kept no cache)")
    dims = DecoderDims.from_config(_text_config(model_or_config)[0])
    return int(record.kv_tokens.sum()) * dims.kv_bytes_per_token(element_size)


def unrouted_kv_bytes(record: RoutingRecord, model_or_config, element_size: int) -> int:
    """K/V bytes the unrouted prefill of the same prompts caches (every token in every layer, no padding)."""
    return record_kv_bytes(unrouted_record(record), model_or_config, element_size)


@dataclass
class Accounting:
    """The cost of one routed prefill next to the unrouted one."""

    avg_T: float
    num_visual: float
    flops: FlopReport
    flops_unrouted: FlopReport
    formula_tflops: float
    formula_tflops_unrouted: float
    kv_bytes: int | None
    kv_bytes_unrouted: int
    notes: list[str] = field(default_factory=list)

    @property
    def ideal_speedup(self) -> float:
        """Unrouted over routed executed FLOPs: the prefill speedup compute alone predicts."""
        return self.flops_unrouted.total / max(1, self.flops.total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "avg_T": self.avg_T, "num_visual": self.num_visual,
            "flops": self.flops.to_dict(), "flops_unrouted": self.flops_unrouted.to_dict(),
            "formula_tflops": self.formula_tflops, "formula_tflops_unrouted": self.formula_tflops_unrouted,
            "kv_bytes": self.kv_bytes, "kv_bytes_unrouted": self.kv_bytes_unrouted,
            "ideal_speedup": self.ideal_speedup, "notes": list(self.notes),
        }


def kv_element_size(model: nn.Module) -> int:
    lm = getattr(getattr(model, "model", model), "language_model", model)
    return next(lm.parameters()).element_size()


def account(record: RoutingRecord, model: nn.Module, cache=None, logits_tokens: int | None = 1,
            vision: bool = True) -> Accounting:
    """Everything above for one prefill: pass the cache the prefill returned to read its K/V bytes."""
    notes = []
    flops = executed_flops(record, model, logits_tokens, vision)
    if not flops.scorer_measured:
        notes.append("scorer FLOPs not measured (apply_routing(..., measure_scorer_flops=True) measures them)")
    full = unrouted_record(record)
    return Accounting(
        avg_T=record.avg_T, num_visual=float(record.num_visual.float().mean()),
        flops=flops, flops_unrouted=executed_flops(full, model, logits_tokens, vision),
        formula_tflops=formula_tflops(record, model), formula_tflops_unrouted=formula_tflops(full, model),
        kv_bytes=cache_kv_bytes(cache) if cache is not None else None,
        kv_bytes_unrouted=unrouted_kv_bytes(record, model, kv_element_size(model)), notes=notes,
    )
