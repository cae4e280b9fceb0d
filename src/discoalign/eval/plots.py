"""PNG plots written to `output_dir/plots/` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_history(log_history: list[dict], keys: list[str], path: str, title: str) -> str | None:
    """Plot each of `keys` against `step` from a Trainer's `state.log_history`; keys never logged are skipped.

    Returns the path written, or None when none of the keys was logged.
    """
    series = {k: [(e["step"], e[k]) for e in log_history if k in e and "step" in e] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(conf: np.ndarray, acc: np.ndarray, count: np.ndarray, path: str, title: str) -> str:
    """Reliability diagram: accuracy against mean confidence per bin, with the diagonal of perfect calibration."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0.5, 1.0], [0.5, 1.0], "k--", linewidth=1, label="perfect calibration")
    filled = count > 0
    ax.plot(conf[filled], acc[filled], "o-", label="model")
    for c, a, n in zip(conf[filled], acc[filled], count[filled]):
        ax.annotate(str(int(n)), (c, a), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xlim(0.45, 1.02)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("confidence (P of predicted winner)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
