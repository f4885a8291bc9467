"""`visroute demo` on a few questions: every config appears, at one avg_T, with FLOPs below the unrouted model's,
and the oracle keeps every relevant token (the budget covers the few tokens a question's objects paint)."""

from __future__ import annotations

import json

import pytest

from visroute.cli.demo import demo_configs
from visroute.testbed.questions import VISION_FAMILIES


def test_configs_share_the_fastv_budget():
    from visroute.budget import schedule_avg_T

    configs = demo_configs(8, 144, 16, first=2)
    fastv = schedule_avg_T(configs["fastv prune"], 8, 144)
    assert fastv == (2 * 144 + 6 * 16) / 8
    for name, cfg in configs.items():
        if cfg is not None:
            assert schedule_avg_T(cfg, 8, 144) == pytest.approx(fastv, abs=0.5), name
    assert configs["pdrop reroute"].action == "reroute"
    assert [s.keep for s in configs["pdrop reroute"].stages] == [s.keep for s in configs["pdrop prune"].stages]
    with pytest.raises(ValueError, match="--keep"):
        demo_configs(8, 144, 144)
    with pytest.raises(ValueError, match="--layer"):
        demo_configs(8, 144, 16, first=6)


def test_demo_runs_every_config(tmp_path, capsys):
    from visroute.cli import main

    out = tmp_path / "demo.json"
    assert main(["demo", "--n", "18", "--batch-size", "18", "--json", str(out)]) == 0  # every family twice
    text = capsys.readouterr().out
    for name in ("unrouted", "fastv prune", "pdrop reroute", "hidden_similarity", "random", "oracle",
                 "blind control", "majority", "rel-attr", "same-attr", "rel-ground", "hop-1", "hop-2"):
        assert name in text
    reports = json.loads(out.read_text())
    assert reports["unrouted"]["flops_relative"] == 1.0
    vision = [f for f in VISION_FAMILIES if f in reports["unrouted"]["accuracy"]]  # two items each: pooled
    mean = {k: sum(reports[k]["accuracy"][f] for f in vision) / len(vision) for k in ("unrouted", "blind")}
    assert mean["unrouted"] > mean["blind"] + 0.3, mean
    for name, rep in reports.items():
        if name not in ("unrouted", "blind"):
            assert rep["flops_relative"] < 0.6, name
            assert rep["avg_T"] == pytest.approx((3 * 144 + 9 * 16) / 12, abs=0.5), name  # 16 from layer 3 of 12
    assert reports["oracle"]["recall"]["all"] == [1.0]
    assert reports["random"]["recall"]["all"][0] < 1.0
    # per hop, on the multi-hop items: the oracle keeps both hops' tokens; a random 16 of 144 misses some
    assert reports["oracle"]["hop_recall"] == {"1": 1.0, "2": 1.0}
    assert all(v < 1.0 for v in reports["random"]["hop_recall"].values())
    assert reports["unrouted"]["hop_recall"] == {"1": None, "2": None}  # nothing routed, no stages
