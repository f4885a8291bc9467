"""Tables of `visroute bench` results: for the terminal, and as Markdown for BENCHMARKS.md. One table of prefill,
FLOPs and memory per config, one of decode per config and batch size."""

from __future__ import annotations

from typing import Any


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median'] * 1e3:.1f} [{stats['q1'] * 1e3:.1f}-{stats['q3'] * 1e3:.1f}]"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _render(head: list[str], lines: list[list[str]], markdown: bool, title: str) -> str:
    if markdown:
        rows = [head, ["---"] * len(head), *lines]
        return "\n".join("| " + " | ".join(r) + " |" for r in rows)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([title, fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)])


def prefill_table(result: dict[str, Any], markdown: bool = False) -> str:
    """Prefill latency at the prefill batch against the FLOPs ideal, FLOPs, K/V and memory of one prompt."""
    batch = result["settings"].get("prefill_batch", 1)
    head = ["config", "avg_T", f"prefill ms x{batch} [IQR]", "speedup", "ideal", "% ideal", "exec TFLOPs",
            "formula TFLOPs", "K/V MiB", "peak MiB", "scoring ms (% unrouted)"]
    lines = []
    for r in result["results"]:
        acc = r["accounting"]
        score = r.get("scoring_s")
        lines.append([
            r["label"], f"{r['avg_T']:.2f}", _ms(r["prefill_s"]), f"{r['prefill_speedup']:.2f}",
            f"{r['ideal_speedup']:.2f}", f"{100 * r['fraction_of_ideal']:.0f}%",
            f"{acc['flops']['total'] / 1e12:.3f}", f"{acc['formula_tflops']:.3f}",
            f"{(acc['kv_bytes'] or 0) / 2**20:.1f}", f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-",
            f"{score['median'] * 1e3:.1f} ({100 * r['scoring_fraction_of_unrouted_prefill']:.2f}%)" if score else "-",
        ])
    m = result["machine"]
    title = (f"{result['shape']} ({result['settings']['dtype']}, {m['device']}, {result['settings']['threads']} threads, "
             f"{result['model_config']['prompt_tokens']} prompt tokens, {result['model_config']['visual_tokens']} "
             f"visual; prefill of {batch} prompts; FLOPs, K/V and memory of one)")
    return _render(head, lines, markdown, title)


def decode_table(result: dict[str, Any], markdown: bool = False) -> str:
    """Decode per config and batch: step latency, tokens per second, the K/V held and read, and the speedup over
    the unrouted model (its default cache) against the bandwidth ideal (weights + K/V read per step), and over the
    unrouted model on a static cache and the routed keep-all row."""
    head = ["config", "avg_T", "batch", "ms/step [IQR]", "tok/s", "K/V MiB held", "K/V MiB read/step",
            "GiB read/step", "speedup", "ideal", "% ideal", "% gain", "vs static", "vs keep-all"]
    lines = []
    rows = result["results"]
    for r in rows[:1] + result.get("decode_only", []) + rows[1:]:
        for d in r.get("decode", []):
            lines.append([
                r["label"], f"{r['avg_T']:.2f}", str(d["batch"]), _ms(d["step_s"]), f"{d['tokens_per_s']:.1f}",
                f"{d['kv_bytes'] / 2**20:.0f}", f"{d['kv_read_bytes'] / 2**20:.0f}", f"{d['step_bytes'] / 2**30:.2f}",
                f"{d['speedup']:.2f}", f"{d['ideal_speedup']:.2f}", _pct(d["fraction_of_ideal"]),
                _pct(d["fraction_of_ideal_gain"]),
                f"{d['speedup_vs_static']:.2f}" if "speedup_vs_static" in d else "-",
                f"{d['speedup_vs_keep_all']:.2f}" if "speedup_vs_keep_all" in d else "-",
            ])
    if not lines:
        return ""
    s = result["settings"]
    title = (f"decode: {s['new_tokens'] - 1} timed steps x {s['decode_repeats']} runs per batch; ideal = bytes read "
             "per step (weights + valid K/V)")
    return _render(head, lines, markdown, title)


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The result as terminal tables, or as Markdown tables: prefill, then decode."""
    return "\n\n".join(t for t in (prefill_table(result, markdown), decode_table(result, markdown)) if t)
