"""Sweep grids: which model, which tasks, which routing configs.

A grid is a YAML file (or the name of a shipped grid, `visroute/grids/<name>.yaml`):

    name: my-sweep
    version: 1                     # bump when results of the old grid must not mix with the new one
    model:
      path: testbed                # a model folder or hub id; "testbed" is the shipped testbed checkpoint
      dtype: float32               # float32 | bfloat16 | float16
      device: cpu                  # or device_map: auto
      batch_size: 16
      box_frame: grid              # the frame the model writes boxes in (default: its family's)
    tasks:
      - name: pope
        data: data/pope.parquet    # or {data: ..., images: ...}
        limit: 500
        options: {normalization: llava}
    configs:                       # listed configs, each a routing-config dict, a YAML path, or a method preset
      - {name: fastv, config: {action: prune, scorer: last_token_attention, stages: [{layer: 2, keep: 0.25}]}}
      - {name: mine, config: configs/mine.yaml}
      - {name: pdrop, method: pdrop@128}   # visroute.methods, solved for the model (optional: scorer)
      - {name: flat-prune, method: reroute-pdrop@128, action: prune}  # a method's schedule under another action
      - {name: rr-prev, method: "reroute-fastv@128:scoring=previous:reentry=quota"}  # a method's options
    sweep:                         # products over action x scorer x stage layers x budget
      - action: [prune, reroute]
        scorer: [last_token_attention, random]
        layers: [2, 0.5, [0.25, 0.5, 0.75]]   # int: a decoder layer; float in [0, 1): that share of the depth;
                                              # a list: one stage at each (the same budget re-selected);
                                              # every: one config per decoder layer of the model
        keep: [0.25, 16]                      # float <= 1: share of each sample's visual tokens, int: a count
                                              # (a float above 1, e.g. 16.0, is an error)
        avg_T: [0.11]                         # and/or: a target avg_T (float <= 1: share of the visual tokens)
                                              # solved to integer keeps by visroute.budget
        seeds: [0, 1, 2, 3, 4]                # optional: each scorer with a `seed` option (random) once per
                                              # seed, named <scorer>-s<seed> (seed 0: <scorer>)
        merge: {pool: pool_average}           # optional: a scorer's layer-0 stages merge (the pooling control)

Declared primary contrasts (optional; a report gives them Holm-corrected and labels every other comparison
exploratory): each is a - b of two configs of the grid (or unrouted / blind) on the same items, on every item
or on the vision-required ones (the default):

    primary:
      - {a: prune/last_token_attention/L1/T0.25, b: prune/random/L1/T0.25}
      - {a: reroute-fastv, b: fastv, items: all}

Where to prune at matched compute: `layers: every` with `avg_T` gives one single-stage config per layer whose
keep is solved for that avg_T (a later stage keeps fewer tokens); with `keep` as well, the same sweep at matched
keep. A stage at layer l of L cannot bring avg_T below l/L of the visual tokens: with `every` and an avg_T
given as a share, the layers where the target needs a keep of 0 or less are left out of the sweep (a stage
that keeps nothing selects nothing, and every scorer would tie there); an avg_T given as a count is checked
once the model is known, and an unreachable one is an error naming the config. The pooling control at equal
visual tokens: `{scorer: pool, layers: [0], avg_T: [0.25], merge: {pool: pool_average}}` (a stage at layer 0
keeps avg_T tokens; with the sweep's own avg_T it lands in the same tables and plot panels).

Several models: `models:` lists them (each a path or testbed name, or a mapping like `model:`); with it, `model:`
(optional, without `path`) holds the settings every model shares, and an entry overrides them:

    model: {dtype: bfloat16, device: cuda, batch_size: 16}
    models: [llava-hf/llava-1.5-7b-hf, {path: Qwen/Qwen2.5-VL-7B-Instruct, batch_size: 8, label: qwen}]

Each model's results go to a database of its own, named after the `--db` given and the model's label (the last
part of its path, or `label:`): `--db study.sqlite` gives `study.llava-1.5-7b-hf.sqlite` and `study.qwen.sqlite`,
each bound to the grid and that model exactly as a single-model run with `--model` would be (so each is resumed,
shared and refused like any results database, and `study pooled` reads them), and `study.sqlite` becomes the
study's index, bound to the grid and its list of models (see `visroute.evaluation.layout`).

Every grid also runs the unrouted model and the blind control on every task. Configs are resolved against the
model once it is loaded (its decoder depth, its visual tokens per image); a layer outside the model is an
error naming the config."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from visroute.config import RoutingConfig, Stage
from visroute.loading import DTYPES

if TYPE_CHECKING:
    from visroute.evaluation.tasks import Task

GRIDS_PACKAGE = "visroute.grids"
# the keys each part of a grid takes (anything else is refused, naming these); the model's: ModelSpec's fields
GRID_KEYS = {"name", "version", "description", "model", "models", "tasks", "configs", "sweep", "primary"}
TASK_KEYS = {"name", "label", "data", "limit", "options"}
CONFIG_KEYS = {"name", "config", "method", "scorer", "action"}
SWEEP_KEYS = {"action", "scorer", "layers", "keep", "avg_T", "scorer_options", "seeds", "merge"}
CONTRAST_KEYS = {"a", "b", "items"}


def shipped_grids() -> dict[str, Path]:
    """Name -> path of the grids shipped with the package."""
    from importlib import resources

    folder = resources.files(GRIDS_PACKAGE)
    return {p.name[: -len(".yaml")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def grid_path(spec: str | Path) -> Path:
    """A grid file from a path or a shipped grid's name."""
    p = Path(spec)
    if p.exists():
        return p
    shipped = shipped_grids()
    if str(spec) in shipped:
        return shipped[str(spec)]
    raise FileNotFoundError(f"no grid file {spec} (and no shipped grid of that name; shipped: "
                            f"{', '.join(sorted(shipped))})")


@dataclass
class ModelSpec:
    path: str = "testbed"
    dtype: str = "float32"
    device: str | None = None
    device_map: str | dict | None = None
    batch_size: int = 16
    box_frame: str | None = None
    attn_implementation: str = "sdpa"
    label: str = ""  # its name in file names and reports (default: the last part of its path)

    def __post_init__(self) -> None:
        self.label = self.label or model_label(self.path)

    def fingerprint(self) -> dict[str, Any]:
        """What changes a model's answers (not where it runs, nor the batch size)."""
        return {"path": self.path, "dtype": self.dtype, "box_frame": self.box_frame,
                "attn_implementation": self.attn_implementation}


def model_label(path: str) -> str:
    """A model's name in file names and reports: the last part of its path or hub id, with any character other
    than letters, digits, ".", "_" and "-" replaced by "_" (llava-hf/llava-1.5-7b-hf -> llava-1.5-7b-hf)."""
    last = next((part for part in reversed(str(path).replace("\\", "/").split("/")) if part), str(path))
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in last) or "model"


@dataclass
class TaskSpec:
    """A task of the grid: `name` a registered task, `label` its name in the results (default: `name`; two
    entries of one task, e.g. RefCOCO testA and testB, need two labels)."""

    name: str
    data: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.name

    def build(self) -> "Task":
        from visroute.evaluation.tasks import build_task

        return build_task(self.name, data=self.data, limit=self.limit, **self.options)


@dataclass
class ConfigSpec:
    """One routing config of the grid before it meets the model: `routing` is a config dict with stage layers
    and keeps as written (relative layers, budgets to solve), or `method` a preset name@tier."""

    name: str
    routing: dict[str, Any] | None = None
    method: str | None = None
    scorer: str | None = None
    action: str | None = None  # a method's schedule under this action (the 2 x 2 of schedule and action)
    avg_T: float | None = None  # for a sweep budget given as avg_T
    every_layer: bool = False  # one single-stage config per decoder layer (the name holds "{layer}")

    def needs_num_visual(self) -> bool:
        return self.method is not None or self.avg_T is not None

    def expand(self, num_layers: int) -> list["ConfigSpec"]:
        """The specs this one stands for on a model with `num_layers` decoder layers (itself, or one per layer)."""
        if not self.every_layer:
            return [self]
        out = []
        for layer in range(num_layers):
            if self.avg_T is not None and self.avg_T <= 1 and layer >= self.avg_T * num_layers - 1e-9:
                continue  # this deep, the target needs a keep <= 0 (see the module docstring)
            routing = copy.deepcopy(self.routing)
            routing["stages"][0]["layer"] = layer
            out.append(ConfigSpec(self.name.format(layer=layer), routing, avg_T=self.avg_T))
        return out

    def resolve(self, num_layers: int, num_visual: int | None, family: str | None = None) -> RoutingConfig:
        """The RoutingConfig on a model with `num_layers` decoder layers and `num_visual` visual tokens per
        image (needed only for methods and avg_T budgets); `family` (the model family's registry name) picks a
        method's own variant for that family where it has one."""
        try:
            if self.method is not None:
                from visroute.methods import method_config

                cfg = method_config(self.method, num_layers, num_visual, family)
                if self.scorer is not None:  # the method's schedule with another scorer
                    cfg = RoutingConfig.from_dict({**cfg.to_dict(), "scorer": self.scorer, "scorer_options": {}})
                if self.action is not None:
                    cfg = with_action(cfg, self.action)
                return cfg
            routing = copy.deepcopy(self.routing)
            layers = [resolve_layer(s["layer"], num_layers) for s in routing["stages"]]
            if self.avg_T is not None:
                from visroute.budget import Shape, solve

                target = self.avg_T * num_visual if self.avg_T <= 1 else self.avg_T
                sol = solve(Shape.uniform(layers), num_layers, num_visual, target)
                routing["stages"] = [{**given, "layer": s.layer, "keep": s.keep}
                                     for given, s in zip(routing["stages"], sol.stages)]
            else:
                for s, layer in zip(routing["stages"], layers):
                    s["layer"] = layer
            cfg = RoutingConfig.from_dict(routing)
            cfg.validate_for(num_layers)
            return cfg
        except ValueError as e:
            raise ValueError(f"config {self.name!r}: {e}") from None


def with_action(cfg: RoutingConfig, action: str) -> RoutingConfig:
    """`cfg`'s schedule under `action`: "prune" prunes at every stage (re-entry policy dropped); "reroute"
    reroutes at every stage that does not name its own action (Nüwa's stage 1 stays a prune)."""
    data = cfg.to_dict()
    data["action"] = action
    if action == "prune":
        data.pop("reentry", None)
        data.pop("reentry_options", None)
        for stage in data["stages"]:
            stage.pop("action", None)
    return RoutingConfig.from_dict(data)


def resolve_layer(layer: int | float, num_layers: int) -> int:
    """An int is a decoder layer; a float in [0, 1) that share of the depth, rounded to the nearest layer."""
    if isinstance(layer, bool) or not isinstance(layer, (int, float)):
        raise ValueError(f"a stage layer must be an int or a float share of the depth, got {layer!r}")
    if isinstance(layer, float):
        if not 0.0 <= layer < 1.0:
            raise ValueError(f"a relative stage layer must lie in [0, 1), got {layer}")
        return min(num_layers - 1, int(layer * num_layers + 0.5))
    if not 0 <= layer < num_layers:
        raise ValueError(f"stage layer {layer} lies outside the model's {num_layers} decoder layers "
                         f"(0..{num_layers - 1})")
    return layer


CONTRAST_ITEMS = ("vision_required", "all")


@dataclass(frozen=True)
class Contrast:
    """A declared primary contrast: config `a` minus config `b` on the same items (`items`: the vision-required
    ones or all)."""

    a: str
    b: str
    items: str = "vision_required"

    @property
    def label(self) -> str:
        return f"{self.a} - {self.b}"


@dataclass
class Grid:
    name: str
    version: int
    model: ModelSpec
    tasks: list[TaskSpec]
    configs: list[ConfigSpec]
    source: Path | None = None
    primary: list[Contrast] = field(default_factory=list)
    models: list[ModelSpec] = field(default_factory=list)  # every model, in order (`model` is the first)

    def __post_init__(self) -> None:
        self.models = self.models or [self.model]

    @property
    def multi_model(self) -> bool:
        return len(self.models) > 1

    def for_model(self, spec: ModelSpec) -> "Grid":
        """This grid on one of its models only (what one model's database is bound to)."""
        return dataclasses.replace(self, model=spec, models=[spec])

    def identity(self) -> dict[str, Any]:
        """What a results database is bound to: results of another grid version are never mixed in."""
        return {"grid": self.name, "version": self.version, "model": self.model.fingerprint()}

    def identity_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]


def _check_keys(d: dict, allowed: set[str], where: str) -> None:
    bad = sorted(set(d) - allowed)
    if bad:
        raise ValueError(f"{where}: unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(allowed))}")


def _listify(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def keep_name(keep) -> str:
    """A keep as a name: a fraction always reads as one (1.0 -> "1.0"), so it is never taken for a count."""
    if not isinstance(keep, float):
        return str(keep)
    text = f"{keep:g}"
    return text if any(c in text for c in ".e") else f"{text}.0"


def _layer_name(layer) -> str:
    return f"{layer:g}" if isinstance(layer, float) else str(layer)


def expand_sweep(sweep: dict[str, Any], where: str) -> list[ConfigSpec]:
    """The configs of one sweep block: action x scorer x layers x (keep or avg_T)."""
    _check_keys(sweep, SWEEP_KEYS, where)
    for key in ("scorer", "layers"):
        if key not in sweep:
            raise ValueError(f"{where}: a sweep needs {key!r}")
    if "keep" not in sweep and "avg_T" not in sweep:
        raise ValueError(f"{where}: give the budget as keep, avg_T or both")
    budgets = [("keep", b) for b in _listify(sweep.get("keep", []))] + \
              [("avg_T", b) for b in _listify(sweep.get("avg_T", []))]
    for kind, budget in budgets:
        if kind == "keep":
            try:
                Stage(0, budget)  # a float keep above 1 or a negative keep fails here, before any model loads
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: keep {budget!r}: {e}") from None
    options = sweep.get("scorer_options") or {}
    merges = sweep.get("merge") or {}
    if not isinstance(merges, dict):
        raise ValueError(f"{where}: merge maps a scorer to the merge of its layer-0 stages, "
                         "e.g. {pool: pool_average}")
    seeds = [int(s) for s in _listify(sweep.get("seeds", [0]))]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{where}: seeds must differ, got {seeds}")
    scorers = []  # (name part, scorer, its options)
    for scorer in _listify(sweep["scorer"]):
        base = dict(options.get(scorer, {}))
        if len(seeds) > 1 or seeds != [0]:
            from visroute.scoring import get_scorer_class

            if "seed" not in {f.name for f in get_scorer_class(scorer).option_specs()}:
                scorers.append((scorer, scorer, base))  # a deterministic scorer runs once
                continue
            scorers += [(scorer if s == 0 else f"{scorer}-s{s}", scorer, {**base, "seed": s}) for s in seeds]
        else:
            scorers.append((scorer, scorer, base))
    out = []
    for action, (label, scorer, scorer_opts), layers, (kind, budget) in itertools.product(
            _listify(sweep.get("action", "prune")), scorers, _listify(sweep["layers"]), budgets):
        every = layers == "every"
        layer_list = [0] if every else _listify(layers)
        if any(isinstance(l, str) for l in layer_list):
            raise ValueError(f"{where}: a layer is an int, a float share of the depth or `every`, got {layers!r}")
        keep = budget if kind == "keep" else 0
        layer_part = "{layer}" if every else "-".join(_layer_name(l) for l in layer_list)
        name = f"{action}/{label}/L{layer_part}/{'k' if kind == 'keep' else 'T'}{keep_name(budget)}"
        stages = [{"layer": l, "keep": keep} for l in layer_list]
        if scorer in merges:
            stages[0]["merge"] = merges[scorer]  # only a stage at layer 0 may merge: checked once resolved
        routing = {"action": action, "scorer": scorer, "stages": stages, "scorer_options": scorer_opts}
        out.append(ConfigSpec(name=name, routing=routing, avg_T=float(budget) if kind == "avg_T" else None,
                              every_layer=every))
    return out


def _listed_config(entry: dict[str, Any], root: Path, where: str) -> ConfigSpec:
    _check_keys(entry, CONFIG_KEYS, where)
    if "name" not in entry:
        raise ValueError(f"{where}: a listed config needs a name")
    if ("config" in entry) == ("method" in entry):
        raise ValueError(f"{where}: give exactly one of config (a dict or YAML path) or method (name@tier)")
    if "action" in entry and "method" not in entry:
        raise ValueError(f"{where}: action overrides a method's action; a listed config names its own")
    if "method" in entry:
        action = entry.get("action")
        if action is not None and action not in ("prune", "reroute"):
            raise ValueError(f"{where}: action must be prune or reroute, got {action!r}")
        return ConfigSpec(name=str(entry["name"]), method=str(entry["method"]), scorer=entry.get("scorer"),
                          action=action)
    cfg = entry["config"]
    if isinstance(cfg, str):
        p = Path(cfg) if Path(cfg).is_absolute() else root / cfg
        cfg = RoutingConfig.from_yaml(p).to_dict()
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: config must be a routing-config mapping or a YAML path")
    try:
        RoutingConfig.from_dict(cfg)  # fields and values checked now, layers once the model is known
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}, config {entry['name']!r}: {e}") from None
    return ConfigSpec(name=str(entry["name"]), routing=cfg)


def parse_grid(data: dict[str, Any], source: Path | None = None) -> Grid:
    """A Grid from its YAML mapping (paths relative to the grid file's folder)."""
    where = f"grid {source}" if source else "grid"
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a YAML mapping")
    _check_keys(data, GRID_KEYS, where)
    root = source.parent if source else Path(".")
    models = _models(data, where)
    tasks = []
    for i, t in enumerate(data.get("tasks") or []):
        t = {"name": t} if isinstance(t, str) else dict(t)
        _check_keys(t, TASK_KEYS, f"{where}, task {i + 1}")
        if "name" not in t:
            raise ValueError(f"{where}, task {i + 1}: a task needs a name")
        d = t.get("data") or {}
        d = {"data": d} if isinstance(d, str) else dict(d)
        d = {k: str(v if Path(v).is_absolute() else root / v) for k, v in d.items()}
        tasks.append(TaskSpec(name=t["name"], data=d, limit=t.get("limit"), options=dict(t.get("options") or {}),
                              label=str(t.get("label") or "")))
    if not tasks:
        raise ValueError(f"{where}: no tasks")
    labels = [t.label for t in tasks]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: task labels must differ; give repeated tasks a label (got {labels})")
    configs = [_listed_config(c, root, f"{where}, config {i + 1}") for i, c in enumerate(data.get("configs") or [])]
    for i, s in enumerate(_listify(data.get("sweep") or [])):
        configs += expand_sweep(s, f"{where}, sweep {i + 1}")
    names = [c.name for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1} | ({"unrouted", "blind"} & set(names)))
    if dup:
        raise ValueError(f"{where}: config name(s) {', '.join(dup)} occur twice (unrouted and blind are built in)")
    primary = _contrasts(data.get("primary") or [], configs, where)
    grid = Grid(name=str(data.get("name") or (source.stem if source else "grid")), version=int(data.get("version", 1)),
                model=models[0], tasks=tasks, configs=configs, source=source, primary=primary, models=models)
    check_names(grid)
    return grid


def _model_spec(m: dict[str, Any], where: str) -> ModelSpec:
    _check_keys(m, set(ModelSpec.__dataclass_fields__), where)
    model = ModelSpec(**m)
    if model.dtype not in DTYPES:
        raise ValueError(f"{where}: dtype must be one of {', '.join(DTYPES)}, not {model.dtype!r}")
    if model.batch_size < 1:
        raise ValueError(f"{where}: batch_size must be at least 1")
    return model


def _models(data: dict[str, Any], where: str) -> list[ModelSpec]:
    """The grid's models: `model` alone, or each entry of `models` over the settings `model` gives them all."""
    m = data.get("model") or {}
    m = {"path": m} if isinstance(m, str) else dict(m)
    if "models" not in data:
        return [_model_spec(m, f"{where}, model")]
    entries = data["models"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: models must be a non-empty list of model paths or mappings")
    if "path" in m or "label" in m:
        raise ValueError(f"{where}: with models, model holds only the settings they share (no path or label)")
    out = []
    for i, e in enumerate(entries):
        e = {"path": e} if isinstance(e, str) else e
        if not isinstance(e, dict) or "path" not in e:
            raise ValueError(f"{where}, models entry {i + 1}: give a path (or testbed name), or a mapping with path")
        out.append(_model_spec({**m, **e}, f"{where}, models entry {i + 1}"))
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{where}: model labels must differ (they name each model's database); give repeated "
                         f"ones a label (got {labels})")
    return out


def _contrasts(entries: list, configs: list[ConfigSpec], where: str) -> list[Contrast]:
    """The grid's primary contrasts, each naming configs of the grid (a sweep over every layer by any layer)."""
    import re

    exact = {c.name for c in configs if not c.every_layer} | {"unrouted", "blind"}
    patterns = [re.compile(re.escape(c.name).replace(re.escape("{layer}"), r"\d+") + "$")
                for c in configs if c.every_layer]
    out = []
    for i, e in enumerate(_listify(entries)):
        here = f"{where}, primary contrast {i + 1}"
        if isinstance(e, (list, tuple)) and len(e) == 2:
            e = {"a": e[0], "b": e[1]}
        if not isinstance(e, dict):
            raise ValueError(f"{here}: give {{a: config, b: config}} (optionally items: vision_required | all)")
        _check_keys(e, CONTRAST_KEYS, here)
        c = Contrast(str(e.get("a")), str(e.get("b")), str(e.get("items", "vision_required")))
        for name in (c.a, c.b):
            if name not in exact and not any(p.match(name) for p in patterns):
                raise ValueError(f"{here}: no config named {name!r} in the grid")
        if c.items not in CONTRAST_ITEMS:
            raise ValueError(f"{here}: items must be one of {', '.join(CONTRAST_ITEMS)}, not {c.items!r}")
        out.append(c)
    return out


def check_names(grid: Grid) -> None:
    """Tasks, methods and scorers must be known (checked before any model is loaded)."""
    from visroute.evaluation.tasks import get_task_class
    from visroute.scoring import build_scorer

    for t in grid.tasks:
        get_task_class(t.name)
        t.build()  # options checked
    for c in grid.configs:
        if c.method is not None:
            from visroute.methods import get_method, parse_method

            try:
                get_method(parse_method(c.method)[0])
            except ValueError as e:
                raise ValueError(f"config {c.name!r}: {e}") from None
        scorer = (c.routing or {}).get("scorer") or c.scorer
        if scorer is not None:
            try:
                build_scorer(scorer, (c.routing or {}).get("scorer_options"))
            except (ValueError, TypeError) as e:
                raise ValueError(f"config {c.name!r}: {e}") from None


def load_grid(spec: str | Path) -> Grid:
    """A grid from a YAML path or a shipped grid's name."""
    path = grid_path(spec)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"grid {path} is not valid YAML: {e}") from None
    return parse_grid(data, path)
