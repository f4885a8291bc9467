"""Third-party scorers and families through entry points: a small package, installed as metadata only (a
`*.dist-info` folder with `entry_points.txt`) in a temporary folder on sys.path, publishes the scorer `mine`
(group `visroute.scorers`) and the family `mine_llava` (group `visroute.families`); both work from Python and
from the command line. A name that is already taken is an error."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import visroute.families as families_module
import visroute.scoring as scoring_module
from oracle import decoder_inputs
from tiny import llava_batch, tiny_llava
from visroute import RoutingConfig, Stage, apply_routing
from visroute.cli import main
from visroute.families import adapter_for, families, register_family
from visroute.scoring import available_scorers, register

PLUGIN = '''
"""A third-party visroute plug-in (test)."""
from dataclasses import dataclass

from transformers import LlavaForConditionalGeneration

from visroute.families import ModelShape
from visroute.families.llava import LlavaAdapter
from visroute.scoring import Scorer, option
from visroute.tensors import gather_rows


class MineScorer(Scorer):
    """The largest entry of each visual token's hidden state entering the stage's layer, times `sign`."""

    name = "mine"
    description = "third-party test scorer: largest hidden-state entry"
    before_decoder = True

    @dataclass(frozen=True)
    class Options:
        sign: float = option(1.0, "multiplies the scores")

    def score(self, ctx):
        return self.options.sign * gather_rows(ctx.hidden, ctx.layout.positions).float().amax(-1)


class MineLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    pass


class MineFamily(LlavaAdapter):
    name = "mine_llava"
    model_classes = ("MineLlavaForConditionalGeneration",)
    model_types = ("mine_llava",)
    box_frame = "scale_1000"
    shapes = (
        ModelShape("mine-tiny", "mine_llava",
                   dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256),
                   dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=8),
                   "a third-party shape (test)"),
    )

    @classmethod
    def model_class(cls, config):
        return MineLlavaForConditionalGeneration
'''

METADATA = "Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n"


def _install(root, package: str, source: str, entry_points: str) -> None:
    (root / package).mkdir()
    (root / package / "__init__.py").write_text(source)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(METADATA.format(name=package))
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


@pytest.fixture
def fresh_registries(monkeypatch):
    """The registries as if no entry point had been read yet; restored (and the plug-ins forgotten) after."""
    scorers, fams = dict(scoring_module._REGISTRY), dict(families_module._FAMILIES)
    monkeypatch.setattr(scoring_module.REGISTRY, "loaded", False)
    monkeypatch.setattr(families_module.REGISTRY, "loaded", False)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("visroute_plugin"):
            del sys.modules[name]
    scoring_module._REGISTRY.clear()
    scoring_module._REGISTRY.update(scorers)
    families_module._FAMILIES.clear()
    families_module._FAMILIES.update(fams)


@pytest.fixture
def plugin(tmp_path, monkeypatch, fresh_registries):
    _install(tmp_path, "visroute_plugin_mine", PLUGIN, """
        [visroute.scorers]
        mine = visroute_plugin_mine:MineScorer

        [visroute.families]
        mine_llava = visroute_plugin_mine:MineFamily
    """)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_points_register_a_scorer_and_a_family_used_from_python(plugin):
    assert "mine" not in scoring_module._REGISTRY  # entry points load when the registry is first read
    assert "mine" in available_scorers() and "mine_llava" in families()
    module = sys.modules["visroute_plugin_mine"]
    assert available_scorers()["mine"] is module.MineScorer
    base = tiny_llava()
    model = module.MineLlavaForConditionalGeneration(base.config).eval()
    model.load_state_dict(base.state_dict())
    assert type(adapter_for(model)) is module.MineFamily and adapter_for(model).box_frame == "scale_1000"
    inputs = llava_batch(model, [[1, 5, 6, 7], [1, 8]], [1, 2])
    cfg = RoutingConfig("prune", "mine", [Stage(0, 4)], scorer_options={"sign": -1.0})
    with apply_routing(model, cfg) as router, torch.no_grad():
        model(**inputs)
    assert type(router.adapter) is module.MineFamily
    # layer 0: the scores are the input embeddings' largest entries, negated: the 4 smallest are kept
    embeds = decoder_inputs(model, inputs)[0]
    for b, selected in enumerate(router.last_record.stages[0].selected):
        positions = inputs["input_ids"][b].eq(model.config.image_token_id).nonzero().flatten()
        expected = embeds[b, positions].amax(-1).topk(4, largest=False).indices.sort().values
        assert selected.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="Option 'sign' of scorer 'mine' must be float"):
        RoutingConfig("prune", "mine", [Stage(0, 4)], scorer_options={"sign": "down"})


def test_entry_points_are_used_from_the_command_line(plugin, saved_llava, tmp_path, capsys):
    assert main(["scorers"]) == 0
    out = capsys.readouterr().out
    assert "mine                     third-party test scorer: largest hidden-state entry" in out
    assert "sign=1.0 (float): multiplies the scores" in out
    folder, image = saved_llava
    rc = main(["generate", "--model", str(folder), "--image", str(image), "--prompt", "what is the colour ?",
               "--scorer", "mine", "--scorer-option", "sign=-1", "--stages", "0:4", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "routing: prune by mine; 16 visual tokens" in out
    # the family's bench shape, built by its own model class
    rc = main(["bench", "--shape", "mine-tiny", "--dtype", "float32", "--stages", "1:4", "--repeats", "1",
               "--warmup", "0", "--decode-repeats", "0", "--text-tokens", "8", "--no-keep-all", "--no-memory",
               "--quiet", "--out", str(tmp_path / "bench.json")])
    assert rc == 0 and "mine-tiny" in capsys.readouterr().out


def test_a_name_that_is_taken_is_an_error(plugin, tmp_path, monkeypatch):
    module_scorer = available_scorers()["mine"]

    class Again(module_scorer):
        pass

    with pytest.raises(ValueError, match="A scorer named 'mine' is already registered"):
        register(Again)
    with pytest.raises(ValueError, match="model family named 'mine_llava' is already registered"):
        register_family(type("AgainFamily", (families()["mine_llava"],), {}))
    # a plug-in whose entry point names a built-in scorer's name: reading the registry says so
    _install(tmp_path, "visroute_plugin_clash", textwrap.dedent('''
        from visroute.scoring import Scorer

        class Clash(Scorer):
            name = "random"
            description = "clashes with the built-in control"
    '''), """
        [visroute.scorers]
        clash = visroute_plugin_clash:Clash
    """)
    monkeypatch.setattr(scoring_module.REGISTRY, "loaded", False)
    with pytest.raises(ValueError, match="A scorer named 'random' is already registered"):
        available_scorers()


def test_a_broken_plugin_names_its_entry_point(tmp_path, monkeypatch, fresh_registries):
    _install(tmp_path, "visroute_plugin_broken", "import visroute_no_such_dependency\n", """
        [visroute.scorers]
        broken = visroute_plugin_broken:Broken
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="scorer entry point 'broken'.*visroute_no_such_dependency"):
        available_scorers()
