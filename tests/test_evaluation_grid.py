"""Grid configs resolved against a model: relative layers, avg_T budgets solved by visroute.budget, method
presets, listed configs from YAML files."""

import pytest
import yaml

from visroute.budget import schedule_avg_T
from visroute.evaluation import parse_grid
from visroute.evaluation.grid import resolve_layer


def test_relative_and_absolute_layers():
    assert [resolve_layer(x, 32) for x in (0.0, 0.125, 0.25, 0.5, 0.75)] == [0, 4, 8, 16, 24]
    assert [resolve_layer(x, 8) for x in (0.0, 0.125, 0.25, 0.5, 0.75)] == [0, 1, 2, 4, 6]
    assert resolve_layer(3, 8) == 3
    with pytest.raises(ValueError, match="outside the model's 8 decoder layers"):
        resolve_layer(8, 8)


def test_sweep_product_and_avg_T_budgets():
    g = parse_grid({"name": "g", "tasks": ["testbed"], "sweep": [
        {"action": ["prune", "reroute"], "scorer": ["random", "uniform"], "layers": [0.25, [0.25, 0.5]],
         "avg_T": [0.3, 200]}]})
    assert len(g.configs) == 2 * 2 * 2 * 2
    for spec in g.configs:
        cfg = spec.resolve(num_layers=32, num_visual=576)
        target = spec.avg_T * 576 if spec.avg_T <= 1 else spec.avg_T
        # integer keeps solved to the closest avg_T: within one token per layer of the target
        assert abs(schedule_avg_T(cfg, 32, 576) - target) < 1.0
        assert [s.layer for s in cfg.stages] in ([8], [8, 16])
    unreachable = parse_grid({"name": "g", "tasks": ["testbed"], "sweep": [
        {"scorer": "random", "layers": [0.5], "avg_T": [60]}]}).configs[0]
    with pytest.raises(ValueError, match=r"config 'prune/random/L0.5/T60': Target avg_T 60.0 is out of reach"):
        unreachable.resolve(num_layers=32, num_visual=576)


def test_method_preset_and_yaml_config(tmp_path):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(
        {"action": "reroute", "scorer": "random", "stages": [{"layer": 1, "keep": 0.5}, {"layer": 3, "keep": 0.25}]}))
    g = parse_grid({"name": "g", "tasks": ["testbed"], "configs": [
        {"name": "pdrop", "method": "pdrop@128", "scorer": "random"}, {"name": "mine", "config": "mine.yaml"}]},
        source=tmp_path / "grid.yaml")
    pdrop = g.configs[0].resolve(num_layers=32, num_visual=576, family="llava")
    assert pdrop.scorer == "random" and [s.layer for s in pdrop.stages] == [2, 7, 15, 23]
    assert schedule_avg_T(pdrop, 32, 576) == pytest.approx(128, abs=0.5)
    fastv = parse_grid({"name": "g", "tasks": ["testbed"], "configs": [{"name": "f", "method": "fastv@64"}]})
    cfg = fastv.configs[0].resolve(num_layers=8, num_visual=144, family="llava")
    assert cfg.scorer == "last_token_attention" and schedule_avg_T(cfg, 8, 144) == pytest.approx(64, abs=0.5)
    mine = g.configs[1].resolve(num_layers=8, num_visual=144)
    assert mine.action == "reroute" and [(s.layer, s.keep) for s in mine.stages] == [(1, 0.5), (3, 0.25)]
    with pytest.raises(ValueError, match=r"config 'pdrop': Unknown method 'pdorp'"):
        parse_grid({"name": "g", "tasks": ["testbed"], "configs": [{"name": "pdrop", "method": "pdorp@128"}]})


def test_a_testbed_checkpoint_in_any_folder_scores_its_boxes_in_the_frame_it_declares(tmp_path):
    """The testbed model writes boxes in visual-token grid units and says so in its config
    (`visroute_box_frame`): a copy run by folder is scored as the shipped one is; without the key the folder is
    read in its family's (LLaVA's normalised) frame and its boxes miss."""
    import json
    import shutil
    import sqlite3

    from visroute.evaluation import run_grid
    from visroute.testbed import checkpoint_path

    copy = tmp_path / "copy"
    shutil.copytree(checkpoint_path(), copy)
    plain = tmp_path / "plain"
    shutil.copytree(checkpoint_path(), plain)
    config = json.loads((plain / "config.json").read_text())
    del config["visroute_box_frame"]
    (plain / "config.json").write_text(json.dumps(config))

    def correct(path) -> dict[str, bool]:
        grid = parse_grid({"name": "boxes", "model": {"path": str(path), "batch_size": 8},
                           "tasks": [{"name": "testbed", "limit": 8, "options": {"families": ["grounding"]}}]})
        db = tmp_path / f"{getattr(path, 'name', path)}.sqlite"
        run_grid(grid, db, progress=False)
        con = sqlite3.connect(db)
        rows = dict(con.execute("SELECT item_id, correct FROM results JOIN runs USING (run_id) WHERE runs.name = "
                                "'unrouted'"))
        con.close()
        return rows

    shipped = correct("testbed")
    assert sum(shipped.values()) >= 5  # the shipped model grounds (0.93 held out)
    assert correct(copy) == shipped
    assert sum(correct(plain).values()) < sum(shipped.values())


def test_where_to_prune_at_matched_avg_T_next_to_matched_keep():
    g = parse_grid({"name": "g", "tasks": ["testbed"], "sweep": [
        {"scorer": "random", "layers": "every", "keep": [36], "avg_T": [0.25]}]})
    specs = [one for c in g.configs for one in c.expand(8)]
    keep_specs = [s for s in specs if s.avg_T is None]
    avg_specs = [s for s in specs if s.avg_T is not None]
    assert len(keep_specs) == 8  # matched keep: every layer
    # matched avg_T 0.25 of 144 = 36 tokens on 8 layers: a stage at layer l keeps (8*36 - 144 l) / (8 - l),
    # so layers 0 and 1 (keeps 36, 144/7 = 20.6 -> 21); from layer 2 on it would keep nothing: left out
    assert [s.name for s in avg_specs] == [f"prune/random/L{l}/T0.25" for l in (0, 1)]
    cfgs = [s.resolve(8, 144) for s in avg_specs]
    assert [c.stages[0].keep for c in cfgs] == [36, 21]
    assert all(abs(schedule_avg_T(c, 8, 144) - 36) <= 0.5 for c in cfgs)
    # matched keep is not matched compute: the later stage costs more
    k = [s.resolve(8, 144) for s in keep_specs]
    assert schedule_avg_T(k[6], 8, 144) > schedule_avg_T(k[1], 8, 144)


def test_single_stage_keep_is_the_closest_integer_keep():
    from visroute.budget import reachable_layers, single_stage_keep
    from visroute import Stage

    for layers, visual in ((8, 144), (32, 576), (28, 256)):
        for target in (0.11 * visual, 64, 0.5 * visual):
            for layer in reachable_layers(layers, visual, target):
                keep = single_stage_keep(layer, layers, visual, target)
                best = min(abs(schedule_avg_T([Stage(layer, k)], layers, visual) - target) for k in range(visual + 1))
                assert abs(schedule_avg_T([Stage(layer, keep)], layers, visual) - target) == pytest.approx(best)
            beyond = max(reachable_layers(layers, visual, target)) + 1
            with pytest.raises(ValueError, match="out of reach"):
                single_stage_keep(beyond, layers, visual, target)


def test_sweep_seeds_and_the_pooling_control():
    g = parse_grid({"name": "g", "tasks": ["testbed"], "sweep": [
        {"scorer": ["random", "uniform"], "layers": [2], "keep": [16], "seeds": [0, 1, 2]},
        {"scorer": "pool", "layers": [0], "avg_T": [36], "merge": {"pool": "pool_average"}}]})
    names = [c.name for c in g.configs]
    assert names == ["prune/random/L2/k16", "prune/random-s1/L2/k16", "prune/random-s2/L2/k16",
                     "prune/uniform/L2/k16", "prune/pool/L0/T36"]
    assert [c.routing["scorer_options"] for c in g.configs[:3]] == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
    pool = g.configs[-1].resolve(8, 144)
    assert (pool.stages[0].layer, pool.stages[0].keep, pool.stages[0].merge) == (0, 36, "pool_average")
    bad = parse_grid({"name": "g", "tasks": ["testbed"], "sweep": [
        {"scorer": "pool", "layers": [2], "keep": [16], "merge": {"pool": "pool_average"}}]})
    with pytest.raises(ValueError, match="Only a stage at layer 0"):
        bad.configs[0].resolve(8, 144)
    with pytest.raises(ValueError, match="seeds must differ"):
        parse_grid({"name": "g", "tasks": ["testbed"], "sweep": [
            {"scorer": "random", "layers": [2], "keep": [16], "seeds": [1, 1]}]})


def test_primary_contrasts_name_configs_of_the_grid():
    from visroute.evaluation.grid import Contrast

    base = {"name": "g", "tasks": ["testbed"], "configs": [{"name": "f", "method": "fastv@64"}],
            "sweep": [{"scorer": ["random", "last_token_attention"], "layers": "every", "avg_T": [0.25]}]}
    g = parse_grid({**base, "primary": [{"a": "prune/last_token_attention/L1/T0.25", "b": "prune/random/L1/T0.25"},
                                        ["f", "unrouted"], {"a": "f", "b": "blind", "items": "all"}]})
    assert g.primary == [Contrast("prune/last_token_attention/L1/T0.25", "prune/random/L1/T0.25"),
                         Contrast("f", "unrouted"), Contrast("f", "blind", "all")]
    with pytest.raises(ValueError, match="primary contrast 1: no config named 'x'"):
        parse_grid({**base, "primary": [["f", "x"]]})
    with pytest.raises(ValueError, match="items must be one of"):
        parse_grid({**base, "primary": [{"a": "f", "b": "blind", "items": "some"}]})
