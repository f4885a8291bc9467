"""The Reroute paper's table: every config reaches its tier on both model shapes, and --dry-run lists the runs
(neither needs lmms-eval)."""

from __future__ import annotations


def test_paper_table_configs_hit_their_tiers_and_dry_run_lists_the_runs(tmp_path, capsys):
    from visroute.budget import schedule_avg_T
    from visroute.cli import main
    from visroute.families import get_shape
    from visroute.integrations.lmms.paper_table import MODELS, TIERS, paper_configs

    for model in MODELS:
        shape = get_shape(MODELS[model].shape)
        rows = paper_configs(model)
        assert len(rows) == 2 + 4 * len(TIERS)
        for row in rows:
            if row.config is not None:
                assert abs(schedule_avg_T(row.config, shape.num_layers, 576) - row.tier) <= 0.5, row.label
    assert main(["paper-table", "--model", "llava-1.5", "--tier", "64", "--tasks", "pope,gqa", "--out",
                 str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 of 12 runs to do" in out and "Reroute vs PDrop @64" in out
