"""Tables of `visroute bench` results: for the terminal, and as Markdown for BENCHMARKS.md."""

from __future__ import annotations

from typing import Any


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median'] * 1e3:.1f} [{stats['q1'] * 1e3:.1f}-{stats['q3'] * 1e3:.1f}]"


def format_table(result: dict[str, Any], markdown: bool = False) -> str:
    """The result as a terminal table, or as a Markdown table."""
    head = ["config", "avg_T", "prefill ms [IQR]", "speedup", "ideal", "% ideal", "decode ms/tok [IQR]", "dec x", "dec ideal",
            "exec TFLOPs", "formula TFLOPs", "K/V MiB", "peak MiB", "scoring ms (% unrouted)"]
    lines = []
    for r in result["results"]:
        acc = r["accounting"]
        score = r.get("scoring_s")
        lines.append([
            r["label"], f"{r['avg_T']:.2f}", _ms(r["prefill_s"]), f"{r['prefill_speedup']:.2f}",
            f"{r['ideal_speedup']:.2f}", f"{100 * r['fraction_of_ideal']:.0f}%", _ms(r.get("decode_step_s")),
            f"{r['decode_speedup']:.3f}" if "decode_speedup" in r else "-", f"{r['decode_ideal_speedup']:.3f}",
            f"{acc['flops']['total'] / 1e12:.3f}", f"{acc['formula_tflops']:.3f}",
            f"{(acc['kv_bytes'] or 0) / 2**20:.1f}", f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "-",
            f"{score['median'] * 1e3:.1f} ({100 * r['scoring_fraction_of_unrouted_prefill']:.2f}%)" if score else "-",
        ])
    if markdown:
        rows = [head, ["---"] * len(head), *lines]
        return "\n".join("| " + " | ".join(r) + " |" for r in rows)
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    m = result["machine"]
    title = (f"{result['shape']} ({result['settings']['dtype']}, {m['device']}, {result['settings']['threads']} threads, "
             f"{result['model_config']['prompt_tokens']} prompt tokens, {result['model_config']['visual_tokens']} visual)")
    return "\n".join([title, fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)])
