"""The shipped testbed checkpoint: it loads offline like any Hugging Face model, `visroute generate` uses it by
default, and on fixed held-out sets it reaches the accuracy the testbed promises, with and without the image."""

from __future__ import annotations

import pytest
import torch

from visroute import RoutingConfig, Stage
from visroute.testbed import (
    DEFAULT_WORLD,
    HELDOUT_SEED,
    VISION_FAMILIES,
    Evaluator,
    checkpoint_path,
    load_model,
    majority_rates,
    make_items,
)

TEST_SEED = HELDOUT_SEED + 7  # a fixed set apart from the one the report uses


@pytest.fixture(scope="module")
def shipped():
    return load_model()


@pytest.fixture(scope="module")
def items():
    return make_items(180, seed=TEST_SEED, world=DEFAULT_WORLD)  # 20 of every family, on its own scenes


@pytest.fixture(scope="module")
def evaluator(shipped, items):
    model, processor = shipped
    return Evaluator(model, processor, items, progress=False)


def test_checkpoint_is_a_plain_llava_folder_that_loads_offline():
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

    folder = checkpoint_path()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, size
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= names
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert isinstance(processor, LlavaProcessor)
    assert model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.text_config.model_type == "llama"
    assert model.config.text_config.num_hidden_layers >= 12
    assert model.dtype == torch.float32
    image = make_items(1, seed=0)[0].image()
    inputs = processor(images=[image], text=["USER: <image>\nwhat color is the circle? ASSISTANT:"],
                       return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 144


@pytest.fixture(scope="module")
def unrouted(evaluator):
    return evaluator.run(None).accuracy()


def test_unrouted_accuracy_meets_every_family_bar(unrouted):
    from visroute.testbed.quality import UNROUTED_BARS

    assert set(unrouted) >= set(VISION_FAMILIES) | {"blind_solvable"}
    missed = {f: (round(unrouted[f], 3), bar) for f, bar in UNROUTED_BARS.items() if unrouted[f] < bar}
    assert not missed, missed


def test_blind_control_falls_to_the_majority_rate_except_for_the_blind_solvable_family(shipped):
    model, processor = shipped
    items = make_items(600, seed=TEST_SEED + 1, world=DEFAULT_WORLD)  # text only: cheap, so a larger set
    blind = Evaluator(model, processor, items, batch_size=100, progress=False).run(None, blind=True).accuracy()
    majority = majority_rates(items)
    for fam in VISION_FAMILIES:
        assert blind[fam] <= majority[fam] + 0.10, (fam, blind[fam], majority[fam])
    assert blind["blind_solvable"] >= 0.9
    assert majority["blind_solvable"] < 0.5  # the prior, not a single frequent answer, solves it


def test_oracle_keeps_every_relevant_token_when_the_budget_covers_them(evaluator, items):
    most = max(len(it.relevant_tokens) for it in items)
    rep = evaluator.run(RoutingConfig("prune", "oracle", [Stage(2, most), Stage(6, most)]))
    assert rep.recall()["all"] == [1.0, 1.0]
    assert all(r.recall == [1.0, 1.0] for it, r in zip(items, rep.results) if it.relevant_tokens)
    assert rep.avg_T < 144


def test_generate_uses_the_shipped_model_by_default(tmp_path, capsys, shipped, evaluator, items):
    from visroute.cli import main

    base = evaluator.run(None)
    k = next(i for i, (it, r) in enumerate(zip(items, base.results)) if it.family == "attribute" and r.correct)
    items[k].image().save(tmp_path / "scene.png")
    assert main(["generate", "--image", str(tmp_path / "scene.png"), "--prompt", items[k].question]) == 0
    assert capsys.readouterr().out.splitlines()[0].strip() == items[k].answer


def test_eval_command_with_a_routing_config(tmp_path, capsys):
    from visroute.cli import main

    cfg = tmp_path / "fastv.yaml"
    RoutingConfig("prune", "last_token_attention", [Stage(2, 0.25)]).to_yaml(cfg)
    out_json = tmp_path / "reports.json"
    assert main(["testbed", "eval", "--config", str(cfg), "--limit", "12", "--blind", "--unrouted",
                 "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "retention recall" in text and "blind_solvable" in text and "fastv" in text
    assert out_json.exists()
