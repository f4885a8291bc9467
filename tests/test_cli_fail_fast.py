"""The command line checks its inputs before any model loads: each bad input is exit code 2 with a message that
names it, in well under a second, and no model is built. Also: configs from a path or from YAML text, import
errors inside a subcommand, `python -m visroute`, and the shared spelling of `--dtype`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

import visroute.bench.run
import visroute.loading
from visroute import RoutingConfig, Stage
from visroute.cli import build_parser, main


@pytest.fixture
def no_model(monkeypatch):
    """Loading or building any model is an error."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(visroute.loading, "load_model", refuse)
    monkeypatch.setattr(visroute.bench.run, "build_model", refuse)


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "scene.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


def _fails_fast(argv, capsys, *messages):
    t0 = time.perf_counter()
    rc = main([str(a) for a in argv])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, err
    for message in messages:
        assert message in err
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    return err


def _generate(image, *more):
    return ["generate", "--model", "no-such-model", "--image", image, "--prompt", "what is it ?", *more]


def _write(tmp_path, name, text) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_image_file(no_model, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    _fails_fast(_generate(missing, "--stages", "1:0.5"), capsys, f"no image at {missing}")


def test_missing_image_flag(no_model, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "what is it ?"])
    assert e.value.code == 2 and "--image" in capsys.readouterr().err


def test_mistyped_config_path_names_it(no_model, image, tmp_path, capsys):
    missing = tmp_path / "confg.yaml"
    _fails_fast(_generate(image, "--config", missing), capsys, f"No routing config file at {missing}")


@pytest.mark.parametrize("text, message", [
    ("- layer: 1\n  keep: 0.5\n", "must be a YAML mapping"),
    ("just words\n", "must be a YAML mapping"),
    ("action: prune\nstages: [{layer: 1, keep: 0.5}\n", "is not valid YAML"),
    ("action: prune\nscorer: nope\nstages: [{layer: 1, keep: 0.5}]\n", "Unknown scorer 'nope'"),
    ("action: drop\nstages: [{layer: 1, keep: 0.5}]\n", "Unknown action 'drop'"),
    ("scorer: embedding_similarity\nscorer_options: {reduce: 3}\nstages: [{layer: 1, keep: 0.5}]\n",
     "Option 'reduce' of scorer 'embedding_similarity' must be str"),
])
def test_bad_config_file(no_model, image, tmp_path, capsys, text, message):
    config = _write(tmp_path, "cfg.yaml", text)
    _fails_fast(_generate(image, "--config", config), capsys, message)


@pytest.mark.parametrize("more, message", [
    (["--scorer", "nope", "--stages", "1:0.5"], "Unknown scorer 'nope'"),
    (["--scorer", "embedding_similarity", "--scorer-option", "reduce=3", "--stages", "1:0.5"],
     "Option 'reduce' of scorer 'embedding_similarity' must be str, got 3"),
    (["--scorer", "embedding_similarity", "--scorer-option", "reduce=median", "--stages", "1:0.5"],
     "must be one of ['max', 'mean']"),
    (["--scorer", "random", "--scorer-option", "sed=1", "--stages", "1:0.5"], "Unknown option(s) ['sed']"),
    (["--scorer-option", "reduce", "--stages", "1:0.5"], "expected key=value"),
    (["--stages", "1-0.5"], "layer:keep"),
    (["--stages", "3:0.5,1:0.2"], "strictly increasing"),
])
def test_bad_routing_options(no_model, image, capsys, more, message):
    _fails_fast(_generate(image, *more), capsys, message)


def test_both_config_and_stages(no_model, image, tmp_path, capsys):
    config = tmp_path / "cfg.yaml"
    RoutingConfig("prune", "random", [Stage(1, 0.5)]).to_yaml(config)
    _fails_fast(_generate(image, "--config", config, "--stages", "1:0.5"), capsys, "--config", "--stages")


def test_bench_checks_its_config_before_building(no_model, tmp_path, capsys):
    missing = tmp_path / "confg.yaml"
    _fails_fast(["bench", "--shape", "llava-1.5-tiny", "--config", missing], capsys,
                f"No routing config file at {missing}")
    _fails_fast(["bench", "--shape", "llava-1.5-tiny", "--stages", "2:0.5", "--scorer", "nope"], capsys,
                "Unknown scorer 'nope'")


def test_the_checks_do_not_refuse_good_input(image, tmp_path, monkeypatch):
    """With good input, `generate` gets as far as loading the model (the point the checks guard)."""
    loaded = []

    def stop(*args, **kwargs):
        loaded.append(args)
        raise FileNotFoundError("stopped at the model")

    monkeypatch.setattr(visroute.loading, "load_model", stop)
    monkeypatch.setattr(visroute.loading, "check_model_path", lambda path: None)  # the model name is a stand-in
    config = tmp_path / "cfg.yaml"
    RoutingConfig("prune", "embedding_similarity", [Stage(1, 0.5)], scorer_options={"reduce": "max"}).to_yaml(config)
    assert main([str(a) for a in _generate(image, "--config", config)]) == 2
    assert main([str(a) for a in _generate(image, "--scorer-option", "reduce=max", "--scorer",
                                           "embedding_similarity", "--stages", "1:0.5")]) == 2
    assert len(loaded) == 2


# ---- configs from a path or from text -------------------------------------------------------------------------
def test_from_yaml_names_a_missing_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        RoutingConfig.from_yaml(missing)
    with pytest.raises(FileNotFoundError, match="action: prune"):  # YAML text is not a path
        RoutingConfig.from_yaml("action: prune")


def test_from_yaml_text_parses_text():
    cfg = RoutingConfig.from_yaml_text("action: reroute\nscorer: random\nstages: [{layer: 1, keep: 0.5}, {layer: 3, keep: 4}]\n"
                                       "scorer_options: {seed: 2}\n")
    assert cfg == RoutingConfig("reroute", "random", [Stage(1, 0.5), Stage(3, 4)], scorer_options={"seed": 2})
    assert RoutingConfig.from_yaml_text(cfg.to_yaml()) == cfg
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        RoutingConfig.from_yaml_text("- 1\n- 2\n")


# ---- the command itself ---------------------------------------------------------------------------------------
def test_an_import_error_inside_a_subcommand_surfaces_as_itself(monkeypatch, capsys):
    with pytest.raises(SystemExit):  # for contrast: what a command that does not exist gives
        main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err
    # `visroute bench` imports `visroute.bench.run` when it runs: make that import fail
    import visroute.bench

    monkeypatch.setitem(sys.modules, "visroute.bench.run", None)
    monkeypatch.delattr(visroute.bench, "run_bench", raising=False)  # a name loaded before is cached there
    with pytest.raises(ImportError, match="visroute.bench.run"):
        main(["bench", "--shape", "llava-1.5-tiny"])


def test_python_dash_m_visroute_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "visroute", "scorers"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "last_token_attention" in out.stdout and "embedding_similarity" in out.stdout


def test_dtype_is_spelled_the_same_everywhere(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    spelled = {}
    for name, p in sub.choices.items():
        for action in p._actions:
            if "--dtype" in action.option_strings:
                spelled[name] = list(action.choices)
    assert {"generate", "bench"} <= set(spelled)
    assert all(choices == ["float32", "bfloat16", "float16"] for choices in spelled.values()), spelled
    for command in ("generate", "bench"):
        with pytest.raises(SystemExit) as e:
            main([command, "--dtype", "fp32"])
        assert e.value.code == 2 and "invalid choice: 'fp32'" in capsys.readouterr().err
