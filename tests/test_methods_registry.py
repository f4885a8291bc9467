"""The methods registry: one module per method registers it, a taken name is refused, a third-party package adds
methods through the entry-point group `visroute.methods` (usable by name from Python, `NAME@TIER` specs and the
command line), the reference code's configs are methods of their own (`ref-*`), and bench's `--preset` runs them."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

import visroute.methods as methods_module
from visroute.budget import PRESETS, preset
from visroute.cli import main
from visroute.config import RoutingConfig, Stage
from visroute.methods import Method, method_config, methods, parse_method_spec, register_method

PLUGIN = '''
"""A third-party method (test)."""
from visroute.config import RoutingConfig, Stage
from visroute.methods import Method


def build(tier, num_layers, num_visual, family, opts=None):
    return RoutingConfig("prune", "random", [Stage(0, int(tier))])


MINE = Method("mine-method", "third-party test method: random tokens before the decoder", build)
'''


@pytest.fixture
def scratch_methods(monkeypatch):
    saved = dict(methods_module.METHODS)
    monkeypatch.setitem(methods_module._loaded, "entry_points", False)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("visroute_plugin"):
            del sys.modules[name]
    methods_module.METHODS.clear()
    methods_module.METHODS.update(saved)


def test_a_taken_name_is_refused(scratch_methods):
    def build(tier, num_layers, num_visual, family, opts=None):
        return RoutingConfig("prune", "random", [Stage(0, 1)])

    with pytest.raises(ValueError, match="A method named 'fastv' is already registered"):
        register_method(Method("fastv", "another fastv", build))
    mine = register_method(Method("scratch", "a new one", build))
    assert register_method(mine) is mine  # the same method again is fine
    with pytest.raises(ValueError, match="Bad method name"):
        register_method(Method("a@b", "bad", build))
    with pytest.raises(TypeError):
        register_method("fastv")


def test_each_builtin_lives_in_its_own_module():
    modules = {m.build.__module__ for m in methods().values()}
    assert {"visroute.methods.fastv", "visroute.methods.nuwa", "visroute.methods.reroute",
            "visroute.methods.reference", "visroute.methods.sparsevlm"} <= modules


def test_entry_points_add_a_method(tmp_path, monkeypatch, scratch_methods):
    package = "visroute_plugin_method"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(PLUGIN)
    info = tmp_path / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(f"""
        [visroute.methods]
        mine-method = {package}:MINE
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "mine-method" not in methods_module.METHODS  # entry points load when the registry is first read
    assert parse_method_spec("mine-method@12") == ("mine-method", 12, {})
    assert method_config("mine-method@12", 32, 576).stages == [Stage(0, 12)]
    assert list(methods())[-1] == "mine-method"


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("layers, visual", [(32, 576), (28, 391)])
def test_reference_configs_are_methods(name, layers, visual):
    for tier in (192, 128, 64):
        want = preset(name, tier, num_visual=visual, num_layers=layers)
        assert method_config(f"ref-{name}@{tier}", layers, visual) == want
    cfg = method_config(f"ref-{name}@64:scorer=random", layers, visual)
    assert cfg.scorer == "random"
    with pytest.raises(ValueError, match="Unknown scorer"):
        method_config(f"ref-{name}@64:scorer=nope", layers, visual)


def test_bench_preset_runs_the_reference_method(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--shape", "llava-1.5-tiny", "--dtype", "float32", "--preset", "fastv@128",
                 "--method", "ref-fastv@128", "--method", "fastv@128", "--repeats", "1", "--warmup", "0",
                 "--decode-repeats", "0", "--no-memory", "--no-keep-all", "--quiet", "--out", str(out)]) == 0
    _, alias, ref, paper = json.loads(out.read_text())["results"]
    assert (alias["label"], ref["label"], paper["label"]) == ("fastv@128", "ref-fastv@128", "fastv@128")
    assert alias["avg_T"] == ref["avg_T"] == paper["avg_T"]
    assert alias["config"] == ref["config"] != paper["config"]  # the paper's FastV scores at K-1, the reference at K
