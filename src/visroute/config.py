"""Routing configurations: `Stage`, `RoutingConfig`, their validation and dict / YAML round-trip."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from visroute.tensors import floor_keep

ACTIONS = ("prune", "reroute")


def check_increasing(layers: list[int] | tuple[int, ...]) -> None:
    """Stage layers must be strictly increasing."""
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"Stage layers must be strictly increasing, got {list(layers)}")


@dataclass(frozen=True)
class Stage:
    """From decoder layer `layer` (0-based, before it runs) until the next stage, `keep` visual tokens per
    sample are active. `keep` is an int count or a float fraction of that sample's visual tokens (floored)."""

    layer: int
    keep: int | float

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"Stage.layer must be an int, got {self.layer!r}")
        if self.layer < 0:
            raise ValueError(f"Stage.layer must be >= 0, got {self.layer}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"Stage.keep must be an int count or a float fraction, got {self.keep!r}")
        if isinstance(self.keep, float) and not math.isfinite(self.keep):
            raise ValueError(f"Stage.keep must be finite, got {self.keep}")
        if self.keep < 0:
            raise ValueError(f"Stage.keep must be >= 0, got {self.keep}")

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
        return {"layer": self.layer, "keep": self.keep}


@dataclass
class RoutingConfig:
    """What to do with the visual tokens: `action` ("prune" or "reroute"), the registered `scorer` that ranks
    them, the `stages` of the schedule (strictly increasing layers) and the scorer's `scorer_options`.
    `RoutingConfig()` has no stage: every visual token stays active (keep-all)."""

    action: str = "prune"
    scorer: str = "last_token_attention"
    stages: list[Stage] = field(default_factory=list)
    scorer_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"Unknown action {self.action!r}; choose one of {', '.join(ACTIONS)}")
        from visroute.scoring import get_scorer_class

        self.scorer_options = dict(self.scorer_options or {})
        get_scorer_class(self.scorer).check_options(self.scorer_options)  # unknown scorer or bad option: an error
        stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        check_increasing([s.layer for s in stages])
        self.stages = stages

    def validate_for(self, num_layers: int) -> None:
        """Check the schedule against a decoder with `num_layers` layers."""
        for s in self.stages:
            if s.layer >= num_layers:
                raise ValueError(
                    f"Stage layer {s.layer} is outside the model's decoder layers 0..{num_layers - 1}"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "scorer": self.scorer,
            "stages": [s.to_dict() for s in self.stages],
            "scorer_options": dict(self.scorer_options),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoutingConfig":
        unknown = set(data) - {"action", "scorer", "stages", "scorer_options"}
        if unknown:
            raise ValueError(f"Unknown RoutingConfig fields: {sorted(unknown)}")
        stages = data.get("stages") or []
        if not isinstance(stages, list):
            raise ValueError(f"RoutingConfig stages must be a list of {{layer, keep}}, got {stages!r}")
        return cls(
            action=data.get("action", "prune"),
            scorer=data.get("scorer", "last_token_attention"),
            stages=[Stage(**s) if isinstance(s, dict) else s for s in stages],
            scorer_options=data.get("scorer_options") or {},
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


def parse_stages(spec: str) -> list[Stage]:
    """Parse the CLI form "2:0.5,7:0.25" (layer:keep; keep with a '.' is a fraction, else a count)."""
    stages = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layer_s, keep_s = part.split(":")
            keep: int | float = float(keep_s) if any(c in keep_s for c in ".eE") else int(keep_s)
            stages.append(Stage(layer=int(layer_s), keep=keep))
        except ValueError as e:
            raise ValueError(f"Bad stage {part!r} in {spec!r}: expected layer:keep, e.g. 2:0.5 or 7:64 ({e})")
    if not stages:
        raise ValueError(f"No stages in {spec!r}")
    return stages
