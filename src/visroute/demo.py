"""`visroute demo`: route a small LLaVA-architecture model with a handful of configs and compare them."""

from __future__ import annotations

import time

import torch


def register(sub) -> None:
    p = sub.add_parser("demo", help="compare routing configs on a small model, offline")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def _tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=96, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=255, vision_feature_layer=-1,
                      image_seq_length=144)
    cfg._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(cfg).eval()


def run(args) -> int:
    from visroute import RoutingConfig, Stage, apply_routing

    model = _tiny_llava()
    ids = torch.tensor([[1] + [255] * 144 + list(range(2, 22))])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 96, 96)}
    configs = {
        "unrouted": None,
        "fastv prune": RoutingConfig("prune", "last_token_attention", [Stage(2, 0.25)]),
        "pdrop prune": RoutingConfig("prune", "last_token_attention", [Stage(2, 0.5), Stage(4, 0.25), Stage(6, 0.125)]),
        "pdrop reroute": RoutingConfig("reroute", "last_token_attention", [Stage(2, 0.5), Stage(4, 0.25), Stage(6, 0.125)]),
        "random prune": RoutingConfig("prune", "random", [Stage(2, 0.25)]),
    }
    print("A tiny random-weight LLaVA (8 decoder layers, 144 visual tokens): what each config keeps.")
    print(f"{'config':16s} {'avg_T':>7} {'K/V entries':>12} {'prefill ms':>11}")
    for name, cfg in configs.items():
        router = apply_routing(model, cfg) if cfg else None
        with torch.no_grad():
            t0 = time.perf_counter()
            model(**inputs)
            ms = (time.perf_counter() - t0) * 1e3
        rec = router.last_record if router else None
        if router:
            router.remove()
        avg_t = rec.avg_T if rec else 144.0
        kv = int(rec.kv_tokens.sum()) if rec else 8 * ids.shape[1]
        print(f"{name:16s} {avg_t:7.1f} {kv:12d} {ms:11.1f}")
    return 0
