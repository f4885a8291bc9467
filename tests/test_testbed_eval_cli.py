"""`visroute testbed eval` takes a config the way every routing command does: --config, --stages or --method."""

from visroute.cli import main


def test_testbed_eval_takes_a_method_or_stages(capsys):
    from visroute.budget import PDROP_LAYERS, scale_layers
    from visroute.testbed import load_model

    layers = scale_layers(PDROP_LAYERS, load_model()[0].config.text_config.num_hidden_layers)
    assert main(["testbed", "eval", "--method", "pdrop@36", "--limit", "6", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out
    assert "pdrop@36 [" + "  ".join(f"L{l}" for l in layers) + "]" in out  # PyramidDrop's, scaled to the depth
    assert main(["testbed", "eval", "--stages", "2:16", "--scorer", "random", "--limit", "6", "--unrouted"]) == 0
    out = capsys.readouterr().out
    assert "prune 2:16 [L2]" in out and "unrouted" in out
    assert main(["testbed", "eval", "--method", "pdrop@36", "--stages", "2:16"]) == 2
    assert "one of --config, --stages or --method" in capsys.readouterr().err


def test_testbed_bars_checks_every_bar_against_the_runs_it_reports(tmp_path, capsys):
    """`visroute testbed bars` runs the unrouted model, the blind control, the oracle and random at one prune
    stage; each check follows from the accuracies it prints, and the exit status says whether all are met."""
    import json

    from visroute.testbed import DEFAULT_MODEL, DEFAULT_WORLD, HELDOUT_SEED, Evaluator, load_model, make_items
    from visroute.testbed.quality import UNROUTED_BARS

    out = tmp_path / "bars.json"
    status = main(["testbed", "bars", "--n", "18", "--layer", "2", "--keep", "6", "--json", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    acc, checks = report["accuracy"], report["checks"]
    assert status == (0 if all(c["met"] for c in checks) else 1)
    assert f"{sum(c['met'] for c in checks)} of {len(checks)} checks met" in text
    assert f"model {DEFAULT_MODEL} (shipped)" in text  # which model was checked, by name
    model, processor = load_model()
    items = make_items(18, HELDOUT_SEED, world=DEFAULT_WORLD)  # the command's default world
    plain = Evaluator(model, processor, items, progress=False).run(None)
    assert plain.accuracy() == acc["unrouted"]
    # each check's 95% interval: a bootstrap over the family's items, paired for the losses
    from visroute import RoutingConfig, Stage
    from visroute.evaluation.metrics import bootstrap_ci, paired_bootstrap_diff

    oracle = Evaluator(model, processor, items, progress=False).run(RoutingConfig("prune", "oracle", [Stage(2, 6)]))
    by_id = {r.id: r for r in oracle.results}
    right = {r.id: float(r.correct) for r in plain.results}
    for fam in {it.family for it in items}:
        ids = sorted(it.id for it in items if it.family == fam)
        (unrouted_check,) = [c for c in checks if c["family"] == fam and c["what"] == "unrouted"]
        assert tuple(unrouted_check["interval"]) == bootstrap_ci([right[i] for i in ids])
        lo, hi = unrouted_check["interval"]
        assert lo <= unrouted_check["value"] <= hi
        loss = [c for c in checks if c["family"] == fam and c["what"] == "oracle loss @L2:6"]
        if loss:
            want = paired_bootstrap_diff([right[i] for i in ids], [float(by_id[i].correct) for i in ids])
            assert tuple(loss[0]["interval"]) == want[1:] and abs(loss[0]["value"] - want[0]) < 1e-9
    assert "| 95% interval |" in text
    for c in checks:
        fam = c["family"]
        if c["what"] == "unrouted":
            assert c["met"] == (acc["unrouted"][fam] >= UNROUTED_BARS[fam])
        elif c["what"] == "oracle loss @L2:6":
            assert c["value"] == acc["unrouted"][fam] - acc["oracle"][fam]
        elif c["what"] == "random loss @L2:6":
            assert c["met"] == (acc["unrouted"][fam] - acc["random"][fam] >= 0.2 - 1e-9)
    from visroute.testbed import with_blank_context, with_bordering_tokens

    wide = Evaluator(model, processor, [with_bordering_tokens(it) for it in items], progress=False)
    assert wide.run(RoutingConfig("prune", "oracle", [Stage(2, 6)])).accuracy() == acc["oracle+border"]
    assert "| oracle+border |" in text
    # the exact oracle, item by item: each alone, keeping exactly its relevant tokens (and the blank context)
    for col, variant in (("oracle exact", None), ("exact+blank before", "before"), ("exact+blank after", "after")):
        right: dict[str, list[bool]] = {}
        for it in items:
            it = with_blank_context(it, 6, variant) if variant else it
            keep = RoutingConfig("prune", "oracle", [Stage(2, max(1, len(set(it.relevant_tokens))))])
            (r,) = Evaluator(model, processor, [it], progress=False).run(keep).results
            right.setdefault(it.family, []).append(r.correct)
        assert {f: sum(v) / len(v) for f, v in right.items()} == {f: a for f, a in acc[col].items() if f != "all"}
        assert f"| {col} |" in text
    # the oracle split by budget, against the items' own relevant tokens and runs on the items that fit
    fits = [it for it in items if len(set(it.relevant_tokens)) <= 6]
    for fam in acc["unrouted"]:
        if fam == "all":
            continue
        of_fam = [it for it in items if it.family == fam]
        assert acc["over budget"][fam] == sum(it not in fits for it in of_fam) / len(of_fam)
    small = Evaluator(model, processor, fits, progress=False)
    unrouted_fits = small.run(None).accuracy()
    oracle_fits = small.run(RoutingConfig("prune", "oracle", [Stage(2, 6)])).accuracy()
    assert acc["oracle loss, fits"].keys() == {it.family for it in fits}
    for fam, loss in acc["oracle loss, fits"].items():
        assert abs(loss - (unrouted_fits[fam] - oracle_fits[fam])) < 1e-9
    assert 0 < sum(acc["over budget"].values())  # the set holds items that do not fit in 6 tokens
    assert {c["what"] for c in checks if c["family"] == "relation_grounding"} == {
        "unrouted", "blind - majority", "oracle loss @L2:6", "random loss @L2:6"}


def test_by_form_prints_each_question_forms_accuracy_from_the_per_item_results(tmp_path, capsys):
    """`--by-form` splits a family by question form; its rows follow from the per-item results, counted here from
    the items' own templates, and each family's forms average (by items) to the family's accuracy."""
    import json

    from visroute.testbed import DEFAULT_WORLD, HELDOUT_SEED, make_items

    out = tmp_path / "reports.json"
    assert main(["testbed", "eval", "--by-form", "--limit", "27", "--blind", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    reports = json.loads(out.read_text())
    template = {it.id: (it.family, it.template) for it in make_items(300, HELDOUT_SEED, world=DEFAULT_WORLD)[:27]}
    for name in ("unrouted", "blind"):
        right: dict[tuple[str, str], list[bool]] = {}
        for r in reports[name]["items"]:
            right.setdefault(template[r["id"]], []).append(r["correct"])
        for fam in {f for f, _ in right}:
            forms = [v for (f, _), v in right.items() if f == fam]
            assert sum(map(sum, forms)) / sum(map(len, forms)) == reports[name]["accuracy"][fam]
    lines = text.split("accuracy per question form")[1].split("reports written")[0].strip().splitlines()
    assert lines[0].split() == ["family", "/", "form", "items", "unrouted", "blind"]
    assert len(lines) - 1 == len(right) > 9  # more forms than families
    for line in lines[1:]:
        fam, _, form, n, unrouted, blind = line.split()
        hits = {name: [r["correct"] for r in reports[name]["items"] if template[r["id"]] == (fam, form)]
                for name in ("unrouted", "blind")}
        assert int(n) == len(hits["unrouted"]) == len(hits["blind"])
        assert float(unrouted) == round(sum(hits["unrouted"]) / int(n), 3)
        assert float(blind) == round(sum(hits["blind"]) / int(n), 3)


def test_a_check_knows_when_its_bar_lies_inside_its_interval():
    """The report names the checks whose bar lies inside their 95% interval: on both sides for the blind margin,
    never for a check without an interval."""
    from visroute.testbed.quality import Check, format_bars

    inside = Check("counting", "oracle loss @L3:8", 0.08, "<= 0.05", False, (0.02, 0.14))
    outside = Check("counting", "unrouted", 0.91, ">= 0.75", True, (0.85, 0.96))
    blind_low = Check("counting", "blind - majority", -0.06, "within +-0.10", True, (-0.14, 0.02))
    blind_mid = Check("counting", "blind - majority", 0.0, "within +-0.10", True, (-0.05, 0.05))
    cosine = Check("visual tokens", "background cosine", 0.45, "<= 0.90", True)
    assert [c.bar_inside_interval for c in (inside, outside, blind_low, blind_mid, cosine)] == [
        True, False, True, False, False]
    text = format_bars([inside, outside, blind_low, blind_mid, cosine], {"unrouted": {}}, 100)
    assert "| counting | oracle loss @L3:8 | +0.080 | +0.02 .. +0.14 | <= 0.05 | **no** |" in text
    assert "| visual tokens | background cosine | 0.450 | - | <= 0.90 | yes |" in text
    assert text.endswith("2 with the bar inside the 95% interval (the items drawn decide them): "
                         "counting oracle loss @L3:8 (missed), counting blind - majority (met)")
