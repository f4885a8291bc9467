"""Routing configurations: `Stage`, `RoutingConfig`, their validation and dict / YAML round-trip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visroute.tensors import floor_keep

ACTIONS = ("prune", "reroute")
DEFAULT_REENTRY = "reference"
_STAGE_FIELDS = ("layer", "keep", "scorer", "scorer_options", "score_layer", "merge", "merge_options", "action")


def check_increasing(layers: list[int] | tuple[int, ...]) -> None:
    """Stage layers must be strictly increasing."""
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"Stage layers must be strictly increasing, got {list(layers)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Stage:
    """From decoder layer `layer` (0-based, before it runs) until the next stage, `keep` visual tokens per
    sample are active. `keep` is an int count or a float fraction in [0, 1] of that sample's visual tokens
    (floored); a float above 1 (16.0) is an error, never read as a count.

    Optional, per stage:
      scorer, scorer_options   rank with this scorer instead of the config's (methods whose stages use
                               different signals, e.g. Nüwa: vision-tower attention, then last-token attention)
      score_layer              take the scores at this earlier layer (the hidden states entering it and its
                               projections) and act at `layer`: FastV and Nüwa score with layer K-1's attention
                               and drop before layer K. It must lie in the previous stage's span. Default:
                               `layer` itself.
      merge, merge_options     a stage at layer 0 may merge what it drops into what it keeps (a registered
                               merge, `visroute.merge`): kept tokens enter the decoder with merged features.
      action                   "prune" or "reroute" for this stage instead of the config's: a prune stage
                               chooses among the tokens active before it and the rest are gone for good; a
                               reroute stage chooses among every token no earlier prune stage removed (Nüwa +
                               Reroute: prune and merge at layer 0, then reroute among the survivors).
    """

    layer: int
    keep: int | float
    scorer: str | None = None
    scorer_options: dict[str, Any] = field(default_factory=dict, hash=False)
    score_layer: int | None = None
    merge: str | None = None
    merge_options: dict[str, Any] = field(default_factory=dict, hash=False)
    action: str | None = None

    def __post_init__(self) -> None:
        if self.action is not None and self.action not in ACTIONS:
            raise ValueError(f"Unknown stage action {self.action!r}; choose one of {', '.join(ACTIONS)}")
        if not _is_int(self.layer):
            raise TypeError(f"Stage.layer must be an int, got {self.layer!r}")
        if self.layer < 0:
            raise ValueError(f"Stage.layer must be >= 0, got {self.layer}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"Stage.keep must be an int count or a float fraction, got {self.keep!r}")
        if isinstance(self.keep, float) and not math.isfinite(self.keep):
            raise ValueError(f"Stage.keep must be finite, got {self.keep}")
        if self.keep < 0:
            raise ValueError(f"Stage.keep must be >= 0, got {self.keep}")
        if isinstance(self.keep, float) and self.keep > 1:  # 16.0 would silently read as 1600% (keep all)
            count = f"{self.keep:.0f}" if self.keep.is_integer() else "an int"
            raise ValueError(f"Stage.keep {self.keep!r} is a float above 1, which reads as a fraction: write "
                             f"{count} for a count or a fraction <= 1 (0.25 keeps a quarter)")
        object.__setattr__(self, "scorer_options", dict(self.scorer_options or {}))
        object.__setattr__(self, "merge_options", dict(self.merge_options or {}))
        if self.scorer is not None:
            from visroute.scoring import get_scorer_class

            get_scorer_class(self.scorer).check_options(self.scorer_options)
        elif self.scorer_options:
            raise ValueError("Stage.scorer_options need Stage.scorer (the config's scorer takes the config's options)")
        if self.score_layer is not None:
            if not _is_int(self.score_layer):
                raise TypeError(f"Stage.score_layer must be an int, got {self.score_layer!r}")
            if not 0 <= self.score_layer <= self.layer:
                raise ValueError(f"Stage.score_layer must lie in 0..layer ({self.layer}), got {self.score_layer}")
        if self.merge is not None:
            from visroute.merge import get_merge_class

            if self.layer != 0:
                raise ValueError(f"Only a stage at layer 0 (before the decoder) can merge; this one is at {self.layer}")
            get_merge_class(self.merge).check_options(self.merge_options)
        elif self.merge_options:
            raise ValueError("Stage.merge_options need Stage.merge")

    @property
    def scoring_layer(self) -> int:
        """The layer whose input states and projections the scores come from."""
        return self.layer if self.score_layer is None else self.score_layer

    def keep_count(self, num_visual: int) -> int:
        """How many visual tokens this stage asks to keep for a sample with `num_visual` visual tokens."""
        return int(self.keep_counts(torch.tensor([num_visual]))[0])

    def keep_counts(self, num_visual: torch.Tensor) -> torch.Tensor:
        """(B,) long: the keep count this stage asks for, per sample, for samples with `num_visual` visual tokens
        (a fraction is floored)."""
        if isinstance(self.keep, int):
            return torch.full_like(num_visual, self.keep, dtype=torch.long)
        return floor_keep(self.keep, num_visual)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "keep": self.keep}
        for name in _STAGE_FIELDS[2:]:
            value = getattr(self, name)
            if value:  # only what differs from the defaults, so plain stages stay {layer, keep}
                out[name] = dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Stage":
        if not isinstance(data, dict):
            raise ValueError(f"A stage must be a mapping with layer and keep, got {data!r}")
        unknown = sorted(set(data) - set(_STAGE_FIELDS))
        if unknown:
            raise ValueError(f"Unknown stage fields {unknown}; a stage takes {', '.join(_STAGE_FIELDS)}")
        missing = [k for k in ("layer", "keep") if k not in data]
        if missing:
            raise ValueError(f"A stage needs {' and '.join(missing)}: {data!r}")
        return cls(**data)


@dataclass
class RoutingConfig:
    """What to do with the visual tokens: `action` ("prune" or "reroute"), the registered `scorer` that ranks
    them (a stage may name its own), the `stages` of the schedule (strictly increasing layers), the scorer's
    `scorer_options`, and `family_options` for the model family's adapter (e.g. LLaVA-NeXT's newline tokens).
    `reentry` names the re-entry policy of the reroute stages (`visroute.reentry`: "reference", the plain top
    `keep` over all candidates, or one that keeps some of a pruning cascade's filtering) with its
    `reentry_options`. `RoutingConfig()` has no stage: every visual token stays active (keep-all)."""

    action: str = "prune"
    scorer: str = "last_token_attention"
    stages: list[Stage] = field(default_factory=list)
    scorer_options: dict[str, Any] = field(default_factory=dict)
    family_options: dict[str, Any] = field(default_factory=dict)
    reentry: str = DEFAULT_REENTRY
    reentry_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Unknown action {self.action!r}; choose one of {', '.join(ACTIONS)}")
        from visroute.reentry import get_reentry_class
        from visroute.scoring import get_scorer_class

        self.reentry_options = dict(self.reentry_options or {})
        get_reentry_class(self.reentry).check_options(self.reentry_options)

        self.scorer_options = dict(self.scorer_options or {})
        self.family_options = dict(self.family_options or {})
        get_scorer_class(self.scorer).check_options(self.scorer_options)  # unknown scorer or bad option: an error
        stages = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in self.stages]
        check_increasing([s.layer for s in stages])
        for prev, cur in zip(stages, stages[1:]):
            if cur.score_layer is not None and cur.score_layer < prev.layer:
                raise ValueError(
                    f"The stage at layer {cur.layer} scores at layer {cur.score_layer}, before the previous stage "
                    f"(layer {prev.layer}) has chosen its tokens; score_layer must lie in {prev.layer}..{cur.layer}"
                )
        self.stages = stages
        if (self.reentry != DEFAULT_REENTRY or self.reentry_options) and stages and \
                "reroute" not in self.stage_actions:
            raise ValueError(f"The re-entry policy {self.reentry!r} applies to reroute stages; this config has none")

    def action_of(self, stage: Stage) -> str:
        """The action of `stage`: its own, else the config's."""
        return stage.action or self.action

    @property
    def stage_actions(self) -> list[str]:
        """Each stage's action, in schedule order."""
        return [self.action_of(s) for s in self.stages]

    def scorer_of(self, stage: Stage) -> tuple[str, dict[str, Any]]:
        """(scorer name, options) that rank `stage`: its own, else the config's."""
        if stage.scorer is not None:
            return stage.scorer, dict(stage.scorer_options)
        return self.scorer, dict(self.scorer_options)

    def validate_for(self, num_layers: int) -> None:
        """Check the schedule against a decoder with `num_layers` layers."""
        for s in self.stages:
            if s.layer >= num_layers:
                raise ValueError(
                    f"Stage layer {s.layer} is outside the model's decoder layers 0..{num_layers - 1}"
                )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "action": self.action,
            "scorer": self.scorer,
            "stages": [s.to_dict() for s in self.stages],
            "scorer_options": dict(self.scorer_options),
        }
        if self.family_options:
            out["family_options"] = dict(self.family_options)
        if self.reentry != DEFAULT_REENTRY or self.reentry_options:  # only when set, so older configs stay as they were
            out["reentry"] = self.reentry
            out["reentry_options"] = dict(self.reentry_options)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingConfig":
        unknown = set(data) - {"action", "scorer", "stages", "scorer_options", "family_options", "reentry",
                               "reentry_options"}
        if unknown:
            raise ValueError(f"Unknown RoutingConfig fields: {sorted(unknown)}")
        stages = data.get("stages") or []
        if not isinstance(stages, list):
            raise ValueError(f"RoutingConfig stages must be a list of {{layer, keep}}, got {stages!r}")
        return cls(
            action=data.get("action", "prune"),
            scorer=data.get("scorer", "last_token_attention"),
            stages=[Stage.from_dict(s) if isinstance(s, dict) else s for s in stages],
            scorer_options=data.get("scorer_options") or {},
            family_options=data.get("family_options") or {},
            reentry=data.get("reentry") or DEFAULT_REENTRY,
            reentry_options=data.get("reentry_options") or {},
        )

    def to_yaml(self, path: str | Path | None = None) -> str:
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RoutingConfig":
        """The config in the YAML file at `path` (`from_yaml_text` reads YAML text)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"No routing config file at {p}")
        return cls.from_yaml_text(p.read_text(), source=str(p))

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "the YAML text") -> "RoutingConfig":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{source} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"A routing config must be a YAML mapping (action, scorer, stages, ...); {source} is not")
        return cls.from_dict(data)


def _parse_keep(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_stages(spec: str) -> list[Stage]:
    """Parse the command-line form of a schedule: stages separated by ",", each `layer:keep` (keep with a "."
    is a fraction, else a count) followed by optional `:key=value` parts for `scorer`, `score_layer`, `merge` and
    `action`, e.g. "0:112:scorer=vision_cls_attention,16:16:score_layer=15". Per-stage options need a YAML config."""
    import yaml

    stages = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            pieces = part.split(":")
            if len(pieces) < 2:
                raise ValueError("expected layer:keep")
            extras: dict[str, Any] = {}
            for piece in pieces[2:]:
                key, sep, value = piece.partition("=")
                if not sep or key not in ("scorer", "score_layer", "merge", "action"):
                    raise ValueError(f"{piece!r} is not scorer=..., score_layer=..., merge=... or action=...")
                extras[key] = yaml.safe_load(value)
            stages.append(Stage(layer=int(pieces[0]), keep=_parse_keep(pieces[1]), **extras))
        except (TypeError, ValueError) as e:
            raise ValueError(f"Bad stage {part!r} in {spec!r}: expected layer:keep[:key=value], e.g. 2:0.5 or "
                             f"16:16:score_layer=15 ({e})") from None
    if not stages:
        raise ValueError(f"No stages in {spec!r}")
    return stages
