"""A run's evaluation records as a table (one row per step, one column per task/metric) and as
one plot per metric against training step. Step 0 is the initial (random) weights: the baseline."""
from __future__ import annotations

import posixpath
from typing import Sequence

import fsspec


def metric_columns(records: Sequence[dict]) -> list[tuple[str, str]]:
    """(task, metric) pairs in first-seen order."""
    cols: dict[tuple[str, str], None] = {}
    for rec in records:
        for task, res in rec.get("results", {}).items():
            for metric in res:
                cols[(task, metric)] = None
    return list(cols)


def records_table(records: Sequence[dict]) -> str:
    records = sorted(records, key=lambda r: r["step"])
    cols = metric_columns(records)
    header = ["step"] + [f"{t}/{m}" for t, m in cols] + ["errors"]
    rows = []
    for rec in records:
        row = [str(rec["step"]) + (" (init)" if rec["step"] == 0 else "")]
        for task, metric in cols:
            value = rec.get("results", {}).get(task, {}).get(metric)
            row.append("ERR" if value is None and task in rec.get("errors", {}) else
                       "-" if value is None else f"{value:.4f}")
        row.append(", ".join(sorted(rec.get("errors", {}))) or "")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines)


def plot_metrics(records: Sequence[dict], out_dir: str) -> list[str]:
    """One PNG per (task, metric): value against training step. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    records = sorted(records, key=lambda r: r["step"])
    fs, root = fsspec.core.url_to_fs(out_dir)
    fs.makedirs(root, exist_ok=True)
    written = []
    for task, metric in metric_columns(records):
        points = [(r["step"], r["results"][task][metric]) for r in records
                  if metric in r.get("results", {}).get(task, {})]
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o")
        base = [v for s, v in points if s == 0]
        if base:
            ax.axhline(base[0], color="grey", linestyle="--", linewidth=1, label="initial weights (step 0)")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.set_title(f"{task}/{metric}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = posixpath.join(root, f"{task}_{metric}.png")
        with fs.open(path, "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
        written.append(path)
    return written
