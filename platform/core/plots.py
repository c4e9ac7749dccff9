"""Pictures users look at before they read: training curves and per-type metric bars (PNG, Agg backend)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path, *, smooth: int = 20) -> Path:
    """One panel per (phase, metric) from a metrics.jsonl of {"phase", "step", <metric>: float} records."""
    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        for key, value in rec.items():
            if key not in ("phase", "step") and isinstance(value, int | float):
                series[(rec.get("phase", "train"), key)].append((rec["step"], float(value)))
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(4 * max(1, len(series)), 3), squeeze=False)
    for ax, ((phase, key), points) in zip(axes[0], sorted(series.items()), strict=False):
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, alpha=0.3, color="tab:blue")
        if len(values) >= smooth:
            avg = [sum(values[i - smooth + 1 : i + 1]) / smooth for i in range(smooth - 1, len(values))]
            ax.plot(steps[smooth - 1 :], avg, color="tab:blue")
        ax.set_title(f"{phase}: {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_metric_bars(per_type: dict[str, dict[str, float]], out_png: str | Path, *, title: str) -> Path:
    """Bars of the main score per question type (accuracy for closed types, recall for open ones)."""
    plt = _pyplot()
    names = sorted(per_type)
    scores = [per_type[n]["score"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names)), 3))
    ax.bar(names, scores, color="tab:green")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
