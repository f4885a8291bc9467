"""`visroute bench`: latency, memory, FLOPs and K/V of real-shaped random-weight models, routed and unrouted.

    shapes.py   the named shapes (from the model families), random-weight models, synthetic inputs
    measure.py  timers, peak memory, the machine
    run.py      the benchmark: settings, configs, one row per config against the unrouted model
    report.py   terminal and Markdown tables
"""

from visroute.bench.report import format_table
from visroute.bench.run import DTYPES, METHOD, BenchSettings, default_configs, run_bench
from visroute.bench.shapes import SHAPES, build_model, make_inputs, model_config, parse_image_size, visual_count

__all__ = ["BenchSettings", "DTYPES", "METHOD", "SHAPES", "build_model", "default_configs", "format_table",
           "make_inputs", "model_config", "parse_image_size", "run_bench", "visual_count"]
