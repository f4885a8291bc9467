"""The training log of the testbed model (log.jsonl, one JSON object a line) and its curve."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from visroute.testbed.questions import FAMILIES


def append(path: Path, line: dict) -> None:
    """Append one line to the log."""
    with Path(path).open("a") as f:
        f.write(json.dumps(line) + "\n")


def truncate(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (a resumed run writes them again)."""
    path = Path(path)
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a log.jsonl, or of its gzip copy (log.jsonl.gz: how a finished run's
    log is kept in the repository)."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    return [x for x in lines if "eval" not in x], [x for x in lines if "eval" in x]


def plot_curve(log_path: str | Path, png: str | Path) -> None:
    """Answer loss and per-patch loss (left) and held-out accuracy per family (right) against steps, with the
    phase boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_lines, eval_lines = read_log(log_path)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label in (("loss", "answer loss"), ("patch_loss", "per-patch loss"), ("cls_loss", "tower [CLS] loss")):
        pts = [(x["step"], x[key]) for x in train_lines if key in x]
        if pts:
            ax1.plot(*zip(*pts), lw=1, label=label)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training losses")
    ax1.legend(fontsize=8)
    # before any held-out evaluation (a run still in phase 1): the teacher-forced training accuracy instead
    held_out = bool(eval_lines)
    for fam in FAMILIES:
        if held_out:
            pts = [(x["step"], x["eval"][fam]) for x in eval_lines if fam in x["eval"]]
        else:
            pts = [(x["step"], x["train_acc"][fam]) for x in train_lines if fam in x.get("train_acc", {})]
        if pts:
            ax2.plot(*zip(*pts), marker="o" if held_out else None, ms=3, lw=1 if held_out else 0.8, label=fam,
                     ls="--" if fam.startswith(("relation_", "same_")) else "-")
    ax2.set_xlabel("step")
    ax2.set_ylabel("held-out accuracy (greedy)" if held_out else "training accuracy (teacher-forced)")
    ax2.set_ylim(0, 1.02)
    if ax2.lines:
        ax2.legend(fontsize=7, ncol=2)
    ax2.set_title("held-out accuracy per family (real image path)" if held_out
                  else "training accuracy per family (no held-out evaluation yet)")
    previous = None
    for x in train_lines:
        if previous is not None and x.get("phase") != previous:
            for ax in (ax1, ax2):
                ax.axvline(x["step"], color="grey", lw=0.8, ls="--")
            ax1.text(x["step"], ax1.get_ylim()[1], f" {x.get('phase')}", va="top", fontsize=7, color="grey")
        previous = x.get("phase")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
