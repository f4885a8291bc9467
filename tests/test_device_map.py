"""A model dispatched with `device_map` (here: half the decoder offloaded to disk, so accelerate's hooks load
each layer's weights on the fly) routes exactly like the same model in memory."""

import torch
from transformers import LlavaForConditionalGeneration

from tiny import llava_batch, tiny_llava
from visroute import RoutingConfig, Stage, apply_routing


def test_device_map_with_offloaded_layers_routes_the_same(tmp_path):
    model = tiny_llava()
    model.save_pretrained(tmp_path / "m")
    device_map = {name: "cpu" for name in ["model.vision_tower", "model.multi_modal_projector", "lm_head",
                                           "model.language_model.embed_tokens", "model.language_model.norm",
                                           "model.language_model.rotary_emb"]}
    for i in range(6):
        device_map[f"model.language_model.layers.{i}"] = "cpu" if i < 3 else "disk"
    dispatched = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "m", device_map=device_map, offload_folder=tmp_path / "offload").eval()
    assert "forward" in dispatched.model.language_model.layers[4].__dict__  # accelerate's hook is in place
    inputs = llava_batch(model, [[1, 5, 6, 7], [1, 8, 9]], [1, 2])
    cfg = RoutingConfig("reroute", "last_token_attention", [Stage(1, 0.5), Stage(4, 0.25)])  # scores an offloaded layer
    with torch.no_grad():
        with apply_routing(model, cfg) as r1:
            ref = model(**inputs).logits
            ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with apply_routing(dispatched, cfg) as r2:
            out = dispatched(**inputs).logits
            gen = dispatched.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, ref)
    assert torch.equal(gen, ref_gen)
    assert all(torch.equal(a, b) for a, b in zip(r1.last_record.stages[1].selected, r2.last_record.stages[1].selected))
