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
