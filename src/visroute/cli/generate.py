"""`visroute generate`: answer one image question with a routed model and show what routing did."""

from __future__ import annotations

import time
from typing import Any

from visroute.cli import COMMANDS
from visroute.cli.common import add_debug, add_device, add_dtype, add_routing, existing_file, routing_from_args


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=COMMANDS["generate"])
    p.add_argument("--model", help="Hugging Face model id or local folder (default: the shipped testbed model)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question")
    add_routing(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    add_dtype(p, "float32")
    add_device(p)
    p.add_argument("--show-kept", metavar="PNG", help="write the image with the kept patches of each stage")
    add_debug(p)
    p.set_defaults(func=run)


def build_inputs(model, processor, images: list, prompt: str) -> dict[str, Any]:
    """One prompt with its images, formatted as the model's family expects (its chat template when the
    processor has one)."""
    from visroute.families import adapter_for

    text = adapter_for(model).prompt(prompt, len(images), processor)
    return dict(processor(images=images, text=text, return_tensors="pt"))


def default_model_path() -> str:
    from visroute.testbed import checkpoint_path

    return str(checkpoint_path())


def run(args) -> int:
    # Everything that can be checked without the model is checked first: a typo costs no model load.
    image_path = existing_file(args.image, "image")
    cfg = routing_from_args(args)
    if args.show_kept and cfg is None:
        raise ValueError("--show-kept needs a routing schedule (--stages, --config or --method)")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")

    import torch

    from visroute.engine import apply_routing
    from visroute.evaluation.tasks.base import to_image
    from visroute.loading import check_device, check_model_path, load_model

    image = to_image(str(image_path.resolve()), image_path.parent)  # a truncated file or a non-image fails here
    check_device(args.device)
    if args.model:
        check_model_path(args.model)
    model, processor = load_model(args.model or default_model_path(), args.dtype, args.device)
    inputs = build_inputs(model, processor, [image], args.prompt)
    inputs = {k: (v.to(args.device) if torch.is_tensor(v) else v) for k, v in inputs.items()}

    router = apply_routing(model, cfg) if cfg is not None else None
    timer = _PrefillTimer(model)
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        total = time.perf_counter() - t0
        record = router.last_record if router is not None else None
    finally:
        timer.remove()
        if router is not None:
            router.remove()
    answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    print(answer.strip())
    print()
    print(report_table(model, inputs, cfg, record, timer.prefill_s, total))
    if args.show_kept:
        from visroute.visualize import save_kept_patches

        from visroute.families import adapter_for

        frames = adapter_for(model).image_frames(processor, [image], inputs)
        save_kept_patches(image, record, args.show_kept, sample=0, processor=processor, frames=frames)
        print(f"kept patches written to {args.show_kept}")
    return 0


class _PrefillTimer:
    """Times the first forward of a generate call (the prefill)."""

    def __init__(self, model):
        self.prefill_s: float | None = None
        self._t = None
        self._h1 = model.register_forward_pre_hook(self._pre)
        self._h2 = model.register_forward_hook(self._post)

    def _pre(self, *a):
        if self.prefill_s is None:
            self._t = time.perf_counter()

    def _post(self, *a):
        if self.prefill_s is None and self._t is not None:
            self.prefill_s = time.perf_counter() - self._t

    def remove(self):
        self._h1.remove()
        self._h2.remove()


def report_table(model, inputs, cfg, record, prefill_s, total_s) -> str:
    n_layers = record.num_layers if record is not None else model.config.get_text_config().num_hidden_layers
    seq = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else inputs["input_ids"].shape[1]
    lines = []
    if record is None:
        lines.append("routing: none")
        kv = n_layers * seq
    else:
        nv = int(record.num_visual[0])
        lines.append(f"routing: {cfg.action} by {cfg.scorer}; {nv} visual tokens, {n_layers} decoder layers")
        lines.append(f"{'stage':>5} {'layer':>5} {'keep':>8} {'visual tokens':>13}")
        lines.append(f"{'-':>5} {0:>5} {'all':>8} {nv:>13}")
        for i, st in enumerate(record.stages):
            note = " (all: keep exceeded the candidates)" if st.clipped[0] else ""
            lines.append(f"{i:>5} {st.layer:>5} {st.keep!s:>8} {int(st.kept[0]):>13}{note}")
        lines.append(f"avg_T (visual tokens per layer): {float(record.avg_visual_tokens[0]):.1f}")
        kv = int(record.kv_tokens[:, 0].sum()) if record.kv_tokens is not None else 0
    unrouted = n_layers * seq
    lines.append(f"K/V entries cached after prefill: {kv} of {unrouted} unrouted ({100 * kv / unrouted:.1f}%)")
    if prefill_s is not None:
        lines.append(f"prefill {prefill_s * 1e3:.1f} ms, total {total_s * 1e3:.1f} ms")
    return "\n".join(lines)
