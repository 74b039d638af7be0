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
    """All questions: one panel of accuracy per judge (bars per method, grouped by budget,
    the judge's chance level dashed, self-judged bars hatched), then the evidence recall."""
    rows = [r for r in table if r.category == ALL]
    methods = list(dict.fromkeys(r.method for r in rows))
    judges = list(dict.fromkeys(r.judge for r in rows))
    ks = sorted({r.k for r in rows})
    index = {(r.method, r.k, r.judge): r for r in rows}
    first = {r.method: r for r in rows}  # a row of each method (its rewards' label)
    panels = [*judges, None]  # None: evidence recall
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.4),
                             squeeze=False)
    width = 0.8 / max(1, len(methods))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, judge in zip(axes[0], panels, strict=True):
        for i, method in enumerate(methods):
            cells = [index.get((method, k, judge)) if judge is not None else
                     next((index[(method, k, j)] for j in judges if (method, k, j) in index),
                          None) for k in ks]
            values = [(c.evidence_recall if judge is None else c.accuracy) or 0.0
                      if c else 0.0 for c in cells]
            hatch = ["//" if judge is not None and c is not None and c.self_judged else ""
                     for c in cells]
            rewards = first[method].rewards_by
            label = f"{method} (rewards: {rewards})" if rewards else method
            bars = ax.bar([x + i * width for x in range(len(ks))], values, width,
                          color=colours[i % len(colours)], label=label)
            for bar, h in zip(bars, hatch, strict=True):
                bar.set_hatch(h)
        if judge is not None:
            chance = next((r.chance for r in rows if r.judge == judge and r.chance), None)
            if chance:
                ax.axhline(chance, color="gray", ls="--", lw=1, label="chance")
            judged = next(r.judged for r in rows if r.judge == judge)
            total = next(r.questions for r in rows if r.judge == judge)
            note = "" if judged == total else f", {judged} of {total} questions"
            ax.set(title=f"accuracy, judged by {judge}{note}")
        else:
            ax.set(title="evidence recall (no model)")
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(ks))],
                      [f"k={k}" for k in ks])
        ax.set(ylim=(0, 1))
    handles, names = axes[0][0].get_legend_handles_labels()
    if any(r.self_judged for r in rows):
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//"))
        names.append("self-judged (judge = reward model)")
    axes[0][0].legend(handles, names, fontsize=7, ncol=2)
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
