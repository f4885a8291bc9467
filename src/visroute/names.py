"""Names the command line lists in its help, kept free of torch so that `visroute <command> --help` does not
import it: the dtypes taken by name (`visroute.loading.DTYPES` maps them to torch's), the papers' avg_T tiers and
the Reroute reference code's presets (`visroute.budget` solves them)."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")

TIERS = (192, 128, 64)  # LLaVA-1.5 and Qwen2.5-VL; a shape may name its own (`ModelShape.tiers`)

PRESETS = {
    "fastv": "FastV K=3, prune: one stage at layer 3",
    "pdrop": "PyramidDrop, prune: geometric keeps at [2, 7, 15, 23]",
    "reroute-fastv": "reroute matched to FastV: FastV's keep, re-selected at [3, 7, 15, 23]",
    "reroute-pdrop": "reroute matched to PyramidDrop: keeps [a, a, a/2, a/4] at [2, 7, 15, 23]",
}
