"""PNG plots of training runs and evaluations (matplotlib, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from refocus.evaluation import ALL, Row  # noqa: E402


def _smooth(values: list[float], window: int = 10) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """Reward and entropy per step; validation accuracy and evidence recall per budget."""
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["reward"] for r in train], alpha=0.3, color="tab:blue")
    axes[0].plot(steps, _smooth([r["reward"] for r in train]), color="tab:blue")
    axes[0].set(title="reward (mean of the group samples)", xlabel="step", ylabel="tanh(margin/2)")
    axes[1].plot(steps, [r["entropy"] for r in train], color="tab:orange")
    axes[1].set(title="policy entropy per pick", xlabel="step", ylabel="nats")
    for key in sorted({k for r in val for k in r if k.startswith(("accuracy@", "evidence"))}):
        style = "-" if key.startswith("accuracy") else "--"
        axes[2].plot([r["step"] for r in val], [r[key] for r in val], style, marker="o",
                     markersize=3, label=key)
    axes[2].set(title="validation (greedy selections)", xlabel="step", ylim=(0, 1))
    axes[2].legend(fontsize=8)
    for budget_change in sorted({r["budget"] for r in train})[1:]:
        first = next(r["step"] for r in train if r["budget"] == budget_change)
        for ax in axes:
            ax.axvline(first, color="gray", lw=0.8, ls=":")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluation_chart(table: list[Row], path: Path) -> Path:
    """Accuracy and evidence recall per method (bars) and budget (groups), all questions."""
    rows = [r for r in table if r.category == ALL]
    methods = list(dict.fromkeys(r.method for r in rows))
    ks = sorted({r.k for r in rows})
    index = {(r.method, r.k): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, ("accuracy", "evidence_recall"), strict=True):
        for i, method in enumerate(methods):
            values = [getattr(index[(method, k)], metric) or 0.0 for k in ks]
            ax.bar([x + i * width for x in range(len(ks))], values, width, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(ks))],
                      [f"k={k}" for k in ks])
        ax.set(title=metric.replace("_", " "), ylim=(0, 1))
    axes[0].legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_kind_chart(table: list[Row], k: int, path: Path) -> Path:
    """Accuracy per question kind and method at one budget."""
    rows = [r for r in table if r.k == k and r.category != ALL]
    kinds = list(dict.fromkeys(r.category for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    values = defaultdict(dict)
    for r in rows:
        values[r.method][r.category] = r.accuracy
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        ax.bar([x + i * width for x in range(len(kinds))],
               [values[method].get(kind, 0.0) for kind in kinds], width, label=method)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(kinds))], kinds)
    ax.set(title=f"accuracy per question kind, k={k}", ylim=(0, 1))
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def selection_timelines(videos: list[dict[str, Any]], path: Path) -> Path:
    """Per video (one row each): its evidence spans (shaded), the uniform picks and the learned
    picks as ticks over time. ``videos``: ``{title, duration, evidence: [[a, b]], picks:
    {method: [seconds]}}``."""
    fig, axes = plt.subplots(len(videos), 1, figsize=(11, 1.3 * len(videos) + 0.6),
                             squeeze=False)
    for ax, video in zip(axes[:, 0], videos, strict=True):
        for a, b in video["evidence"]:
            ax.axvspan(a, b, color="#f4c542", alpha=0.5, lw=0)
        methods = list(video["picks"])
        for row, method in enumerate(methods):
            times = video["picks"][method]
            ax.scatter(times, [row] * len(times), marker="|", s=300,
                       color=["#7f7f7f", "#d62728", "#1f77b4"][row % 3], label=method)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_ylim(-0.7, len(methods) - 0.3)
        ax.set_xlim(0, video["duration"])
        ax.set_title(video["title"], fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("seconds (shaded: evidence)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
