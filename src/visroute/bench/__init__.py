"""`visroute bench`: latency, memory, FLOPs and K/V of real-shaped random-weight models, routed and unrouted.

    settings.py what a benchmark measures and how (`BenchSettings`: also the command's flags)
    shapes.py   the named shapes (from the model families), random-weight models, synthetic inputs
    measure.py  timers, peak memory, the machine
    run.py      the benchmark: configs, one row per config against the unrouted model
    report.py   terminal and Markdown tables
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from visroute.bench.settings import BenchSettings, parse_image_size
from visroute.lazy import lazy_exports

if TYPE_CHECKING:
    from visroute.bench.report import format_table
    from visroute.bench.run import DTYPES, METHOD, default_configs, run_bench
    from visroute.bench.shapes import SHAPES, build_model, make_inputs, model_config, visual_count

# the names whose modules import torch load on first use (PEP 562), so that the settings (the command line's
# flags) read without it
_EXPORTS = {"format_table": "visroute.bench.report", "DTYPES": "visroute.bench.run", "METHOD": "visroute.bench.run",
            "default_configs": "visroute.bench.run", "run_bench": "visroute.bench.run",
            "SHAPES": "visroute.bench.shapes", "build_model": "visroute.bench.shapes",
            "make_inputs": "visroute.bench.shapes", "model_config": "visroute.bench.shapes",
            "visual_count": "visroute.bench.shapes"}

__all__ = ["BenchSettings", "DTYPES", "METHOD", "SHAPES", "build_model", "default_configs", "format_table",
           "make_inputs", "model_config", "parse_image_size", "run_bench", "visual_count"]


__getattr__ = lazy_exports(__name__, _EXPORTS)
