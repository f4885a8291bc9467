"""The testbed's tokenizer and processor, the packed training rows, resumable training, and evaluation with
routing (retention recall) on a small model."""

from __future__ import annotations

import json

import pytest
import torch

from visroute import RoutingConfig, Stage
from visroute.testbed import Evaluator, make_items, majority_rates, score
from visroute.testbed.modeling import BOS_ID, IMAGE_ID, build_model, build_processor, pixel_values, prompt


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_processor_round_trips_and_expands_the_image_to_the_patch_grid(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    items = make_items(2, seed=0)
    texts = [prompt(it.question) for it in items]
    a = processor(images=[it.image() for it in items], text=texts, padding=True, return_tensors="pt")
    b = loaded(images=[it.image() for it in items], text=texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
    assert ((a["input_ids"] == IMAGE_ID).sum(1) == 144).all()
    assert a["attention_mask"][:, -1].all()  # left padding: every prompt ends at the last column
    assert torch.allclose(pixel_values([it.image() for it in items]), a["pixel_values"], atol=1e-6)
    words = loaded.batch_decode(a["input_ids"][:, -4:], skip_special_tokens=True)
    assert all(w.endswith("? assistant :") for w in words)


def test_packed_questions_compute_exactly_like_separate_prompts(processor):
    """Training packs several questions after one image; each must see only the image prefix and itself."""
    from visroute.testbed.train import _Tok, block_mask, pack

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    tok = _Tok()
    items = make_items(3, seed=1)
    image = items[0].image()
    prefix = [BOS_ID] + tok.user + [IMAGE_ID] * 144
    ids, pos, blk, lab, *_ = pack([prefix], [[(*tok.block(it.question, it.answer), it.family) for it in items]])
    with torch.no_grad():
        packed = model.model(input_ids=ids, pixel_values=pixel_values([image]), attention_mask=block_mask(blk),
                             position_ids=pos, use_cache=False).last_hidden_state[0]
        for k, it in enumerate(items, start=1):
            alone = processor(images=[image], text=[prompt(it.question) + " " + it.answer], return_tensors="pt")
            ref = model.model(**alone).last_hidden_state[0, len(prefix):]
            mine = packed[blk[0] == k][:-1]  # the block also holds the closing </s>
            assert ids[0][blk[0] == k][:-1].tolist() == alone["input_ids"][0, len(prefix):].tolist()
            assert torch.allclose(mine, ref, atol=1e-5)
            labelled = lab[0][blk[0] == k]
            answer_ids = tok.ids(it.answer)
            assert labelled[labelled != -100].tolist() == answer_ids + [2]  # answer tokens, then </s>


def test_training_resumes_to_the_same_weights(tmp_path):
    """Two phase steps each; the interrupted run stops inside phase 2 and at the phase 2/3 boundary."""
    from visroute.testbed.train import TrainConfig, train

    def cfg(out):
        return TrainConfig(out=str(out), symbolic_steps=2, deepen_steps=0, grow_from=0, tower_steps=2,
                           joint_steps=2, images=2, text_rows=1, text_questions=3, size="tiny", warmup=1,
                           eval_every=0, save_every=10, log_every=1, threads=1)

    straight = train(cfg(tmp_path / "a"), progress=False)
    assert train(cfg(tmp_path / "b"), progress=False, stop_at=3) is None
    assert train(cfg(tmp_path / "b"), resume=True, progress=False, stop_at=4) is None
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False)
    from safetensors.torch import load_file

    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["phase"] for x in lines] == ["symbolic"] * 2 + ["tower"] * 2 + ["joint"] * 2
    assert (tmp_path / "a" / "curve.png").stat().st_size > 0
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(straight)
    AutoProcessor.from_pretrained(straight)


def test_training_logs_held_out_accuracy_from_the_end_of_phase_2(tmp_path):
    """With `eval_every`, the run scores its held-out items at the end of phase 2 and every `eval_every` joint
    steps; the last score is that of the exported model, re-scored here from its greedy answers."""
    from visroute.evaluation.boxes import box_iou, parse_box
    from visroute.testbed import HELDOUT_SEED, Evaluator, load_model, make_items
    from visroute.testbed.questions import BOX_TEMPLATES
    from visroute.testbed.train import TrainConfig, train

    cfg = TrainConfig(out=str(tmp_path), symbolic_steps=2, deepen_steps=0, grow_from=0, tower_steps=1,
                      joint_steps=2, images=2, text_rows=1, text_questions=3, size="tiny", warmup=1, eval_every=1,
                      eval_items=9, save_every=10, log_every=1, threads=1)
    folder = train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval" in x]
    assert [x["step"] for x in evals] == [3, 4, 5]
    model, processor = load_model(folder)
    items = make_items(9, seed=HELDOUT_SEED + 1)  # the run's held-out items
    report = Evaluator(model, processor, items, progress=False).run(None)
    hits = {}
    for it, r in zip(items, report.results):
        if it.template in BOX_TEMPLATES:
            box = parse_box(r.prediction)
            ok = box is not None and box_iou(box, it.box) >= 0.5
        else:
            ok = r.prediction == it.answer
        hits[it.family] = ok
    assert evals[-1]["eval"] == pytest.approx({**{f: float(v) for f, v in hits.items()},
                                               "all": sum(hits.values()) / 9})


def test_held_out_evaluation_runs_before_the_first_step_and_changes_no_weight(tmp_path, monkeypatch):
    """The run evaluates one held-out item before its first step (a broken evaluation fails at once, and every
    module it needs is loaded before the source tree can change under a long run); evaluating changes nothing
    the run trains: the same run without held-out evaluation exports the same weights."""
    from safetensors.torch import load_file

    from visroute.testbed import train as train_module
    from visroute.testbed.train import TrainConfig, train

    def cfg(out, every):
        return TrainConfig(out=str(out), symbolic_steps=2, deepen_steps=0, grow_from=0, tower_steps=1, joint_steps=2,
                           images=2, text_rows=1, text_questions=3, size="tiny", warmup=1, eval_every=every,
                           eval_items=9, save_every=10, log_every=1, threads=1)

    with_eval, without = train(cfg(tmp_path / "a", 1), progress=False), train(cfg(tmp_path / "b", 0), progress=False)
    wa, wb = load_file(with_eval / "model.safetensors"), load_file(without / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def broken(*args):
        raise RuntimeError("evaluation path broken")

    monkeypatch.setattr(train_module, "held_out_accuracy", broken)
    with pytest.raises(RuntimeError, match="evaluation path broken"):
        train(cfg(tmp_path / "c", 1), progress=False)
    assert not (tmp_path / "c" / "log.jsonl").exists() or not (tmp_path / "c" / "log.jsonl").read_text().strip()


def test_phases_train_what_they_say():
    """Phase 1 leaves the tower alone, phase 2 only the tower and projector; symbolic tokens follow the labels."""
    from visroute.testbed.train import SymbolicTokens, TrainConfig, _Tok, _Window, init_weights, make_batch, train_step

    model = build_model("tiny")
    init_weights(model)
    tok = _Tok()
    symbolic = SymbolicTokens(model.config.text_config.hidden_size, tok)
    cfg = TrainConfig(symbolic_steps=1, deepen_steps=0, grow_from=0, tower_steps=1, joint_steps=1, images=2,
                      text_rows=1, text_questions=2)
    for step, grads in ((0, {"language_model", "lm_head", "symbolic"}), (1, {"vision_tower", "multi_modal_projector"}),
                        (2, {"language_model", "lm_head", "vision_tower", "multi_modal_projector"})):
        model.zero_grad(set_to_none=True)
        symbolic.zero_grad(set_to_none=True)
        train_step(model, symbolic, cfg, step, make_batch(cfg, step, tok), _Window())
        named = [*model.named_parameters(), *(("symbolic." + n, p) for n, p in symbolic.named_parameters())]
        got = {part for n, p in named if p.grad is not None and p.grad.abs().sum() > 0
               for part in ("language_model", "lm_head", "symbolic", "vision_tower", "multi_modal_projector")
               if part in n}
        assert got == grads, step
    labels = make_batch(cfg, 0, tok)["image"].labels
    embed = model.get_input_embeddings().weight
    tokens = symbolic(labels, embed)
    j = int((labels[0, :, 0] == 0).nonzero()[0])

    def place(k):  # the learned vectors of the patch's row and column
        return symbolic.row[k // 12] + symbolic.column[k % 12]

    for i in (labels[0, :, 0] > 0).nonzero()[:, 0].tolist():
        color, shape, part = (int(v) for v in labels[0, i])
        want = (embed[symbolic.color_words[color - 1]] + embed[symbolic.shape_words[shape - 1]]
                + symbolic.part[part - 1] + place(i))
        assert torch.allclose(tokens[0, i], want, atol=1e-5)
    assert torch.allclose(tokens[0, j], symbolic.nothing + place(j), atol=1e-5)


def test_place_rows_ask_where_a_lone_object_is():
    """Early phase-1 steps add rows of one object on no background, asking for its box; later ones don't. The
    rows hold only the object's visual tokens, at the positions they have in the full prompt."""
    from visroute.testbed.train import TrainConfig, _Tok, make_batch

    tok = _Tok()
    cfg = TrainConfig(images=2, place_rows=3, place_steps=5, text_rows=0, unlock=("grounding=0",))
    batch = make_batch(cfg, 4, tok)
    assert batch["image"].ids.shape[0] == 2 and batch["image"].pixels is None  # phase 1 renders no images
    place = batch["place"]
    assert place.pixels is None and place.ids.shape[0] == 3
    for r in range(3):
        painted = place.labels[r, :, 0] > 0
        assert torch.equal(place.shown[r], painted)
        image = place.ids[r] == IMAGE_ID
        assert (place.pos[r][image] - 3).tolist() == painted.nonzero()[:, 0].tolist()
        assert int(place.blk[r].max()) == 1 and {f for f in place.fams[r] if f} == {"place"}  # logged apart
        question = place.pos[r][place.blk[r] == 1]
        assert question.tolist() == list(range(147, 147 + len(question)))  # right after the whole image
        cells = painted.nonzero()[:, 0]
        rows, cols = (cells // 12).tolist(), (cells % 12).tolist()
        lab = place.lab[r]
        answer = tok.tok.decode(lab[lab != -100][:-1]).split()
        assert list(map(int, answer)) == [min(cols), min(rows), max(cols) + 1, max(rows) + 1]
    assert "place" not in make_batch(cfg, 5, tok)


def test_compact_place_rows_compute_the_question_as_the_masked_full_row():
    """A place row without its hidden background computes its question as the full row computes it when the
    hidden tokens are masked out for every position (what remains attends to exactly the same tokens)."""
    import random

    from visroute.testbed.questions import ask
    from visroute.testbed.train import (HIDDEN, SymbolicTokens, _patch_labels, _Tok, decoder_hidden, drop_hidden,
                                        init_weights, pack)

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    init_weights(model)
    tok = _Tok()
    symbolic = SymbolicTokens(model.config.text_config.hidden_size, tok)
    questions, objs = ask(random.Random(3), [], ["grounding"])
    prefix = [BOS_ID] + tok.user + [IMAGE_ID] * 144
    full = pack([prefix], [[tok.question_block(q, objs) for q in questions]])
    labels = _patch_labels(objs)[None]
    full.blk[0, 3:147][labels[0, :, 0] == 0] = HIDDEN
    full = full._replace(labels=labels)
    compact = drop_hidden(full)
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        visual = symbolic(labels, embed)
        # the full row with the hidden tokens masked as keys for everyone (each still sees itself)
        masked = full._replace(blk=torch.where(full.blk == HIDDEN, torch.tensor(-1), full.blk))
        a = decoder_hidden(model, masked.ids, masked.pos, masked.blk, visual)[full.blk == 1]
        b = decoder_hidden(model, compact.ids, compact.pos, compact.blk, visual[compact.shown])[compact.blk == 1]
    assert torch.allclose(a, b, atol=1e-5)


def test_scoring_rules():
    items = make_items(12, seed=2)
    ground = next(it for it in items if it.family == "grounding")
    x1, y1, x2, y2 = ground.box
    assert score(ground, f"{x1} {y1} {x2} {y2}") == (True, 1.0)
    assert not score(ground, f"{x1 + 1} {y1} {x2 + 1} {y2}")[0]  # a shifted box: IoU 0 or 1/3
    assert score(ground, "not a box") == (False, 0.0)
    other = next(it for it in items if it.family == "attribute")
    assert score(other, f"  {other.answer} ")[0] and not score(other, other.answer + " x")[0]
    rates = majority_rates(items)
    assert set(rates) >= {"attribute", "existence", "all"} and all(0 < v <= 1 for v in rates.values())


def test_routed_evaluation_reports_retention_recall(processor):
    """On a small random-weight model: the oracle keeps every relevant token when the budget covers them, and
    exactly keep/|relevant| of them when it does not; the record's active sets drive the numbers."""
    items = make_items(18, seed=4)
    model = build_model("tiny").eval()
    ev = Evaluator(model, processor, items, batch_size=6, progress=False)
    most = max(len(it.relevant_tokens) for it in items)
    rep = ev.run(RoutingConfig("prune", "oracle", [Stage(2, most), Stage(5, most)]))
    assert [len(r.recall) for r in rep.results] == [2] * len(items)
    for it, r in zip(items, rep.results):
        assert r.recall == ([None, None] if not it.relevant_tokens else [1.0, 1.0])
    assert rep.recall()["all"] == [1.0, 1.0]
    rep = ev.run(RoutingConfig("reroute", "oracle", [Stage(1, 2)]))
    for it, r in zip(items, rep.results):
        if it.relevant_tokens:
            assert r.recall[0] == pytest.approx(min(1.0, 2 / len(it.relevant_tokens)))
    assert rep.avg_T < 144
    blind = ev.run(None, blind=True)
    assert blind.stage_layers == [] and len(blind.results) == len(items)


def test_a_grown_decoder_computes_what_its_trained_layers_computed():
    """Growing the decoder inserts identity layers before each trained one: the output does not change."""
    from visroute.testbed.train import (SymbolicTokens, TrainConfig, _Tok, decoder_hidden, grow, grown_layers,
                                        init_weights, make_batch)

    cfg = TrainConfig(size="tiny", grow_from=4, images=2, text_rows=0)
    assert grown_layers(cfg, 8) == [1, 3, 5, 7]
    assert grown_layers(TrainConfig(grow_from=3), 12) == [3, 7, 11]
    with pytest.raises(ValueError, match="grow_from"):
        grown_layers(TrainConfig(grow_from=8), 8)
    model = build_model("tiny", seed=1).eval()
    init_weights(model)
    tok = _Tok()
    symbolic = SymbolicTokens(model.config.text_config.hidden_size, tok)
    rows = make_batch(cfg, 700, tok)["image"]
    visual = symbolic(rows.labels, model.get_input_embeddings().weight)
    with torch.no_grad():
        everything = decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual)
        assert torch.equal(decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual, list(range(8))), everything)
        trained = decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual, [1, 3, 5, 7])
        assert not torch.allclose(trained, everything, atol=1e-3)
        grow(model, cfg)
        assert torch.allclose(decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual), trained, atol=1e-5)


def test_training_grows_the_decoder_after_phase_1_and_resumes_across_it(tmp_path):
    """Phase 1 trains only the layers it keeps (the others stay as initialised); phase 1b trains them all, the
    inserted ones from identity; a run resumed at the growth ends where an uninterrupted one does."""
    from safetensors.torch import load_file

    from visroute.testbed.train import TrainConfig, init_weights, train

    def cfg(out):
        return TrainConfig(out=str(out), size="tiny", grow_from=4, symbolic_steps=2, deepen_steps=2, tower_steps=1,
                           joint_steps=1, images=2, text_rows=1, text_questions=3, warmup=1, eval_every=0,
                           save_every=10, log_every=1, threads=1)

    fresh = build_model("tiny", seed=0)
    init_weights(fresh, 0.5)
    start = fresh.state_dict()
    assert train(cfg(tmp_path / "b"), progress=False, stop_at=2) is None
    grown = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["model"]
    layer = "model.language_model.layers.{}.self_attn.q_proj.weight"
    assert all(torch.equal(grown[layer.format(i)], start[layer.format(i)]) for i in (0, 2, 4, 6))
    assert not any(torch.equal(grown[layer.format(i)], start[layer.format(i)]) for i in (1, 3, 5, 7))
    assert train(cfg(tmp_path / "b"), resume=True, progress=False, stop_at=3) is None
    once = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["model"]
    out = "model.language_model.layers.{}.self_attn.o_proj.weight"
    for i in (0, 2, 4, 6):  # zeroed by the growth, then one AdamW step (at most about lr per weight)
        assert 0 < once[out.format(i)].abs().max() < 3 * cfg(tmp_path).lr
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False)
    straight = train(cfg(tmp_path / "a"), progress=False)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["phase"] for x in lines] == ["symbolic"] * 2 + ["deepen"] * 2 + ["tower", "joint"]


def test_a_gate_holds_families_back_until_those_asked_have_learned():
    from visroute.testbed.train import TrainConfig, join_families, make_batch, _Tok

    unlock = ("attribute=0", "existence=10", "grounding=10", "blind_solvable=10", "counting=20", "relation=20",
              "relation_attribute=30", "same_attribute=30", "relation_grounding=30")
    cfg = TrainConfig(unlock=unlock, gate=0.9, gate_wait=50, images=1, text_rows=1, place_rows=2, place_steps=3)
    joined = {"attribute": 0}
    assert join_families(cfg, 8, joined, {"attribute": 1.0}) == []  # their step has not come
    assert join_families(cfg, 9, joined, {"attribute": 0.5}) == []  # not learned yet
    assert join_families(cfg, 19, joined, {"attribute": 0.95}) == ["existence", "grounding", "blind_solvable"]
    assert joined["grounding"] == 20
    assert join_families(cfg, 29, joined, {"attribute": 1.0, "existence": 0.95, "grounding": 0.5}) == []
    assert join_families(cfg, 68, joined, {}) == []
    assert join_families(cfg, 69, joined, {}) == ["counting", "relation"]  # waited gate_wait steps
    tok = _Tok()
    fams = lambda step: {f for row in make_batch(cfg, step, tok, joined)["image"].fams for f in row if f}  # noqa: E731
    assert fams(19) == {"attribute"} and fams(20) <= {"attribute", "existence", "grounding", "blind_solvable"}
    assert "counting" in fams(70) or "relation" in fams(70)
    assert "text" not in make_batch(cfg, 19, tok, joined)  # image-free rows from the blind family's join on
    assert "text" in make_batch(cfg, 20, tok, joined)
    batch = make_batch(cfg, 2, tok, joined)  # place rows in the first place_steps of phase 1
    assert {f for row in batch["place"].fams for f in row if f} == {"place"}
    assert "place" not in make_batch(cfg, 3, tok, joined)


def test_training_with_a_gate_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    from visroute.testbed.train import TrainConfig, train

    def cfg(out):
        return TrainConfig(out=str(out), size="tiny", grow_from=0, symbolic_steps=6, deepen_steps=0, tower_steps=1,
                           joint_steps=1, images=2, text_rows=1, text_questions=3, warmup=1, eval_every=0,
                           save_every=10, log_every=1, threads=1, gate=0.99, gate_wait=2,
                           unlock=("attribute=0", "existence=1", "grounding=1", "counting=2", "relation=3"))

    straight = train(cfg(tmp_path / "a"), progress=False)
    assert train(cfg(tmp_path / "b"), progress=False, stop_at=3) is None
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False)
    wa, wb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    logs = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab"]
    assert logs[0] == [{**x, "elapsed_s": y["elapsed_s"]} for x, y in zip(logs[1], logs[0])]
    joins = {x["step"]: x["joined"] for x in logs[0] if "joined" in x}
    assert joins == {3: ["existence", "grounding"], 5: ["counting"]}  # by waiting: nothing learns in 6 steps


def test_per_image_questions_and_scene_sizes_keep_training_scenes_like_held_out_ones():
    """Every question may add an object to its scene: sixteen questions per image fill almost every scene to the
    eight objects it may hold; a few questions per image on scenes that start small stay near the held-out
    items' size (five objects on average)."""
    from visroute.testbed.train import TrainConfig, _Tok, make_batch

    tok = _Tok()

    def objects(cfg):
        counts = []
        for step in range(4500, 4503):  # phase 3: every family asked
            labels = make_batch(cfg, step, tok)["image"].labels
            parts = labels[..., 2]
            counts += ((parts == 1) | (parts == 2)).sum(1).tolist()  # a whole small object or a top-left quarter
        return sum(counts) / len(counts)

    crowded = objects(TrainConfig(images=8, per_image=0, scene_objects=(3, 6)))
    sparse = objects(TrainConfig(images=8, per_image=4, scene_objects=(1, 3)))
    held_out = sum(len(it.objects) for it in make_items(270, seed=1000)) / 270
    assert crowded > 7.5 and abs(sparse - held_out) < 1.0, (crowded, sparse, held_out)
    cfg = TrainConfig(images=3, per_image=4, text_rows=0)
    assert [len([b for b in set(r.tolist()) if b >= 1]) for r in make_batch(cfg, 4500, tok)["image"].blk] <= [4] * 3
    with pytest.raises(ValueError, match="scene_objects"):
        TrainConfig(scene_objects=(4, 2))


def test_background_hidden_hides_a_share_of_each_images_background_never_an_object():
    """With background_hidden, every image's questions lose a share of its background tokens, drawn per image
    (from a few to nearly all), and never an object's token; without it, phase 3 hides nothing."""
    from visroute.testbed.train import HIDDEN, TrainConfig, _Tok, block_mask, make_batch

    tok, step = _Tok(), 7950  # phase 3 of the default recipe
    plain = make_batch(TrainConfig(images=16, background_hidden=0.0), step, tok)["image"]
    assert not bool((plain.blk == HIDDEN).any())
    rows = make_batch(TrainConfig(images=16, background_hidden=1.0), step, tok)["image"]
    first = int((rows.ids[0] == IMAGE_ID).nonzero()[0])
    hidden = rows.blk[:, first:first + 144] == HIDDEN
    objects = rows.labels[..., 0] > 0
    assert not bool((hidden & objects).any())
    shares = (hidden.sum(1) / (~objects).sum(1)).tolist()
    assert min(shares) < 0.25 and max(shares) > 0.75 and len({round(s, 2) for s in shares}) > 8, shares
    # the hidden tokens are out of every question's sight: a question token attends to none of them
    mask = block_mask(rows.blk)[:, 0]
    question = rows.lab != -100
    for r in range(4):
        q = int(question[r].nonzero()[0])
        assert not bool(mask[r, q, first:first + 144][hidden[r]].any())
        assert bool(mask[r, q, first:first + 144][objects[r]].all())


def test_hop_pointer_targets_are_the_tokens_of_the_object_the_answer_names():
    """Every multi-hop question of the pointer families points, at its last question token, at the patches of
    one object, and the patch labels of those patches give the question's own answer (its colour or shape, or
    its box); without hop_pointer there are no pointers."""
    from visroute.testbed.train import COLOR_IDS, SHAPE_IDS, TrainConfig, _Tok, make_batch

    tok, step = _Tok(), 7950  # phase 3: every listed family is asked
    families = ("relation_attribute", "relation_grounding", "same_attribute")
    cfg = TrainConfig(images=16, questions=families + ("attribute",), text_rows=0, hop_pointer=0.5,
                      hop_pointer_families=families)
    rows = make_batch(cfg, step, tok)["image"]
    plain = TrainConfig(images=16, questions=cfg.questions, text_rows=0, hop_pointer=0.0)
    assert make_batch(plain, step, tok)["image"].pointer is None
    colors = {i: c for c, i in COLOR_IDS.items()}
    shapes = {i: s for s, i in SHAPE_IDS.items()}
    asked = sum(1 for r in range(16) for k in set(rows.blk[r].tolist()) if k >= 1
                and rows.fams[r][int(((rows.blk[r] == k) & (rows.lab[r] != -100)).nonzero()[0])] in families)
    assert asked >= 16 and len(rows.pointer) == asked
    for r, at, *patches in rows.pointer.tolist():
        on = [i for i, x in enumerate(patches) if x]
        assert rows.fams[r][at] in families and rows.lab[r, at - 1] == -100  # the first answer token's position
        block = rows.blk[r] == rows.blk[r, at]
        answer = tok.tok.decode(rows.lab[r][block & (rows.lab[r] != -100)][:-1].tolist())
        color, shape = {int(x) for x in rows.labels[r, on, 0]}, {int(x) for x in rows.labels[r, on, 1]}
        assert len(on) in (1, 4) and len(color) == 1 and len(shape) == 1
        if rows.fams[r][at] != "relation_grounding":
            assert answer in (colors[color.pop()], shapes[shape.pop()])
        else:
            ys, xs = [i // 12 for i in on], [i % 12 for i in on]
            assert answer == f"{min(xs)} {min(ys)} {max(xs) + 1} {max(ys) + 1}"


def test_hop_pointer_starts_at_its_step_and_older_states_read_as_the_default():
    """With hop_pointer_start, the steps before it carry no pointers and the steps from it on carry the same
    pointers as a run that points from the start; a saved config without the field (written before it existed)
    is the default recipe, so such a run still resumes."""
    from dataclasses import asdict

    from visroute.testbed.train import TrainConfig, _recipe, _Tok, make_batch

    tok, step = _Tok(), 7950
    families = ("relation_attribute", "relation_grounding")
    kw = dict(images=16, questions=families, text_rows=0, hop_pointer=0.5, hop_pointer_families=families)
    always = make_batch(TrainConfig(**kw), step, tok)["image"].pointer
    assert make_batch(TrainConfig(**kw, hop_pointer_start=step + 1), step, tok)["image"].pointer is None
    assert torch.equal(make_batch(TrainConfig(**kw, hop_pointer_start=step), step, tok)["image"].pointer, always)
    old = asdict(TrainConfig())
    del old["hop_pointer_start"]
    assert _recipe(old) == _recipe(asdict(TrainConfig()))
    assert _recipe(old) != _recipe(asdict(TrainConfig(hop_pointer_start=100)))


def test_pointer_loss_and_the_tapped_layer_against_slow_references():
    """The pointer loss is -log of the softmax mass on the pointed tokens, computed here by hand; the tapped
    hidden state is the output of that decoder layer (the model's own hidden_states), the last one unchanged."""
    import math

    from visroute.testbed.train import SymbolicTokens, TrainConfig, _Tok, decoder_hidden, make_batch, pointer_loss

    gen = torch.Generator().manual_seed(0)
    tapped, visual = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 144, 8, generator=gen)
    pointer = torch.zeros(2, 146, dtype=torch.long)
    pointer[0, :2], pointer[1, :2] = torch.tensor([1, 3]), torch.tensor([0, 4])
    pointer[0, 2 + 7] = pointer[0, 2 + 8] = pointer[1, 2 + 100] = 1
    expected = 0.0
    for row, at, on in ((1, 3, [7, 8]), (0, 4, [100])):
        scores = [sum(tapped[row, at, d].item() * visual[row, t, d].item() for d in range(8)) / math.sqrt(8)
                  for t in range(144)]
        expected -= math.log(sum(math.exp(scores[t]) for t in on) / sum(math.exp(s) for s in scores)) / 2
    assert pointer_loss(tapped, visual, pointer).item() == pytest.approx(expected, rel=1e-5)

    model = build_model("tiny", seed=1).eval()
    tok = _Tok()
    rows = make_batch(TrainConfig(size="tiny", images=2, text_rows=0), 7950, tok)["image"]
    visual = SymbolicTokens(model.config.text_config.hidden_size, tok)(rows.labels, model.get_input_embeddings().weight)
    with torch.no_grad():
        last, layer_3 = decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual, tap=3)
        assert torch.allclose(last, decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual), atol=1e-5)
        from visroute.testbed.train import block_mask

        embeds = model.get_input_embeddings()(rows.ids).masked_scatter((rows.ids == IMAGE_ID)[..., None], visual)
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=block_mask(rows.blk),
                                         position_ids=rows.pos, output_hidden_states=True)
        assert torch.allclose(layer_3, out.hidden_states[4], atol=1e-5)
        with pytest.raises(ValueError, match="does not run"):
            decoder_hidden(model, rows.ids, rows.pos, rows.blk, visual, [1, 5, 7], tap=3)
