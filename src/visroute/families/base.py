"""The interface every model-family adapter implements: where the decoder, its layers and rotary embedding live,
which positions of a batch are visual tokens and how they form image grids."""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from visroute.record import ImageSpan, VisualLayout


@dataclass
class CallInputs:
    """What the top-level forward was called with, as the routed decoder needs it."""

    input_ids: torch.Tensor | None
    visual_mask: torch.Tensor | None  # (B, L) True at visual-token positions, None when there are none
    image_token_counts: list[int]  # tokens of each image of the batch, in batch order
    image_grids: list[tuple[int | None, int | None, int]]  # (rows, cols, frames) per image
    images_given: bool  # pixel values or pre-encoded image features came with the call
    extras: dict[str, Any]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def _default_rope(q, k, cos, sin, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


class FamilyAdapter:
    """Base adapter. Subclasses set `model_classes` and implement the visual-token and position logic."""

    family: str = ""
    model_classes: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        inner = model.model if hasattr(model, "model") and hasattr(model.model, "language_model") else model
        self.inner = inner
        self.language_model: nn.Module = inner.language_model
        self.text_config = self.language_model.config
        layer_types = getattr(self.text_config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(
                f"visroute supports decoders with full attention in every layer; this model has layer types "
                f"{sorted(set(layer_types))}"
            )
        self._signature = inspect.signature(model.forward)

    # ---- decoder structure -------------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.language_model.layers)

    def rope_function(self) -> Callable:
        """The model's own `apply_rotary_pos_emb`, found in the module that defines its attention class."""
        attn = self.layers[0].self_attn
        return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", _default_rope)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape (B, L, head_dim) for the given (family-normalised) position ids."""
        return self.language_model.rotary_emb(hidden, position_ids)

    def rope_position_ids(
        self, position_ids: torch.Tensor | None, batch: int, length: int, past: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids in the form this family's rotary embedding takes; when none were given, the same default
        the unmodified decoder would use (consecutive positions after the `past` cached tokens)."""
        raise NotImplementedError

    # ---- inputs -------------------------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        bound = self._signature.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        out.update(out.pop("kwargs", {}) or {})
        return out

    def install(self) -> None:
        """Hooks the adapter needs while routing (removed by `uninstall`)."""

    def uninstall(self) -> None:
        pass

    def capture(self, a: dict[str, Any]) -> CallInputs:
        """Read a top-level forward call (its arguments bound by name): input ids, which positions are visual,
        and each image's grid."""
        raise NotImplementedError

    def _visual_mask(self, a: dict[str, Any]) -> tuple[torch.Tensor | None, bool]:
        """The image-token mask of a bound call (None when it holds none), and whether images came with it."""
        input_ids, embeds = a.get("input_ids"), a.get("inputs_embeds")
        if input_ids is not None:
            visual = input_ids == self.image_token_id
        elif embeds is not None:
            visual = self.visual_mask_from_embeds(embeds, self.image_token_id)
        else:
            visual = None
        encoded = a.get("mm_encoder_outputs") or {}
        images_given = a.get("pixel_values") is not None or encoded.get("image") is not None
        if visual is not None and not bool(visual.any()):
            if images_given:
                raise ValueError(
                    f"Images were given but the input holds no image token (id {self.image_token_id}); the "
                    "processor does not match the model. Use the processor saved with this model."
                )
            visual = None
        return visual, images_given

    def visual_mask_from_embeds(self, inputs_embeds: torch.Tensor, token_id: int) -> torch.Tensor:
        # Without input ids, placeholders are recognised by their embedding (as transformers itself does).
        emb = self.inner.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == emb).all(-1)

    # ---- vision tower -------------------------------------------------------------------------------------
    def vision_attention_modules(self) -> list[nn.Module]:
        """The attention module of every layer of the vision tower, in order."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower")

    def default_vision_layer(self) -> int:
        """The tower layer whose output the projector reads (the layer vision-attention scores default to)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower")

    def vision_layer_index(self, layer: int | None) -> int:
        """`layer` as a 0-based tower layer (None: the default; negative: from the end)."""
        n = len(self.vision_attention_modules())
        index = self.default_vision_layer() if layer is None else int(layer)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise ValueError(f"Vision layer {layer} is outside the vision tower's layers 0..{n - 1}")
        return index

    def hook_vision_scores(self, layer: int | None, sink: Callable[[torch.Tensor], None]) -> list:
        """Hook tower layer `layer` so that, whenever the tower runs, one attention score per visual token of
        every image of that call ([CLS] attention, or the mean attention a patch receives for towers without
        [CLS]) is passed to `sink` as one flat fp32 tensor, in the order the images' tokens fill the batch's
        visual tokens. Returns the hook handles (call `.remove()` on each)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its vision tower")

    # ---- layout -------------------------------------------------------------------------------------------
    def layout(self, call: CallInputs, valid: torch.Tensor) -> VisualLayout:
        """Per sample, the sequence positions of its visual tokens and the images they belong to."""
        visual = call.visual_mask.to(valid.device) & valid
        batch, length = visual.shape
        counts = visual.sum(1)
        nv = int(counts.max()) if batch else 0
        # Stable sort puts each sample's visual positions first, in sequence order.
        order = torch.sort((~visual).to(torch.int8), dim=1, stable=True).indices[:, :nv]
        pos_valid = torch.arange(nv, device=visual.device)[None, :] < counts[:, None]
        positions = torch.where(pos_valid, order, torch.full_like(order, length))
        images = self._assign_images(call, counts.tolist())
        return VisualLayout(positions=positions, valid=pos_valid, images=images)

    def _assign_images(self, call: CallInputs, counts: list[int]) -> list[list[ImageSpan]]:
        spans: list[list[ImageSpan]] = []
        it = iter(zip(call.image_token_counts, call.image_grids))
        for n in counts:
            sample, offset = [], 0
            while offset < n:
                try:
                    length, (rows, cols, frames) = next(it)
                except StopIteration:
                    raise ValueError(
                        "The visual tokens in the input do not match the images given: a sample holds more "
                        "image placeholder tokens than the image features account for. Use the processor "
                        "that belongs to this model."
                    ) from None
                sample.append(ImageSpan(offset, length, rows, cols, frames))
                offset += length
            if offset != n:
                raise ValueError(
                    "The visual tokens of a sample do not split into whole images; the processor and the model "
                    "disagree on the number of tokens per image."
                )
            spans.append(sample)
        return spans


# ---- vision-tower attention scores ------------------------------------------------------------------------------
# Used by the vision-attention scorer: each family hooks one attention layer of its tower and computes, from that
# layer's own q/k, one score per visual token. Only the needed query rows are computed, a chunk at a time, in fp32.

VISION_CHUNK_ELEMENTS = 1 << 18  # about 1 MiB of fp32 logits per chunk of query rows


def cls_attention(q_cls: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of the [CLS] query to every token, summed over heads: q_cls (N, H, hd), k (N, H, T, hd) ->
    (N, T) fp32."""
    logits = torch.einsum("nhd,nhtd->nht", q_cls.float(), k.float()) * scale
    return torch.softmax(logits, dim=-1).sum(1)


def mean_attention_received(q: torch.Tensor, k: torch.Tensor, scale: float, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """For packed tokens that attend only within their segment (`cu_seqlens`: segment boundaries, as the
    Qwen ViT takes them), the attention each token receives, summed over heads and averaged over the queries
    of its segment:  r_j = 1/n_seg * sum_{i in seg(j)} sum_h softmax_k(q_h(i) . k_h(k) * scale)[j].

    q, k: (S, H, hd). Returns (S,) fp32. Segments are padded into one batch; query rows go a chunk at a time."""
    s, heads, head_dim = q.shape
    device = q.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    n_seg, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    seg = torch.repeat_interleave(torch.arange(n_seg, device=device), lengths)
    slot = torch.arange(s, device=device) - cu[:-1][seg]
    index = torch.full((n_seg, longest), s, dtype=torch.long, device=device)
    index[seg, slot] = torch.arange(s, device=device)
    valid = index < s

    def by_segment(x: torch.Tensor) -> torch.Tensor:  # (S, H, hd) -> (n_seg, H, longest, hd), zero padded
        return torch.cat([x.float(), x.new_zeros(1, heads, head_dim).float()])[index].transpose(1, 2)

    qp, kp = by_segment(q) * scale, by_segment(k)
    received = torch.zeros(n_seg, longest, dtype=torch.float32, device=device)
    rows = max(1, VISION_CHUNK_ELEMENTS // max(1, n_seg * heads * longest))
    for start in range(0, longest, rows):
        logits = torch.einsum("shqd,shkd->shqk", qp[:, :, start : start + rows], kp)
        logits.masked_fill_(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
        del logits
        # padded query rows do not count
        received += torch.einsum("shqk,sq->sk", probs, valid[:, start : start + rows].float())
    received = received / lengths.clamp(min=1)[:, None].float()
    return received[valid]  # segments in order, tokens in order: the packed order again
