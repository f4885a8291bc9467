"""`visroute generate` on a model saved to a local folder with save_pretrained, routed from the command line."""

import pytest
import torch
from PIL import Image

from visroute.cli import main


@pytest.fixture
def saved_model(saved_llava):
    return saved_llava


def test_generate_routes_a_saved_model(saved_model, capsys):
    folder, image = saved_model
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
               "--action", "reroute", "--stages", "1:0.5,3:4", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "routing: reroute by last_token_attention; 16 visual tokens, 6 decoder layers" in out
    # stage table: 16 * 0.5 = 8 tokens at layer 1, 4 at layer 3
    assert [line.split()[3] for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))] == ["8", "4"]
    # K/V: 23 prompt tokens (16 visual): 1 layer x 23 + 2 layers x 15 + 3 layers x 11 = 86 of 6 x 23
    assert "K/V entries cached after prefill: 86 of 138 unrouted" in out
    assert "prefill" in out and "total" in out


def test_generate_matches_the_library_answer(saved_model, capsys):
    folder, image = saved_model
    main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
          "--stages", "0:0.25", "--max-new-tokens", "4"])
    answer = capsys.readouterr().out.splitlines()[0]
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from visroute import RoutingConfig, Stage, apply_routing

    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    proc = AutoProcessor.from_pretrained(folder)
    inputs = proc(images=[Image.open(image).convert("RGB")], text="USER: <image>\nwhat is the colour ? ASSISTANT:",
                  return_tensors="pt")
    with apply_routing(model, RoutingConfig("prune", "last_token_attention", [Stage(0, 0.25)])), torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert answer == proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def test_bad_cli_input_is_a_clear_error(saved_model, capsys):
    folder, image = saved_model
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "x", "--stages", "9:0.5"])
    assert rc == 2
    assert "outside the model's decoder layers 0..5" in capsys.readouterr().err
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "x", "--scorer", "nope",
               "--stages", "1:0.5"])
    assert rc == 2 and "Unknown scorer 'nope'" in capsys.readouterr().err
