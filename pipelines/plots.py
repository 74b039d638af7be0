"""PNG plots of training runs and evaluations (matplotlib, no display needed)."""

from __future__ import annotations

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


def budget_stages(train: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """The curriculum's stages from the train rows: (first step, last step, budget) of each
    run of steps with the same largest budget so far, in step order (a cumulative curriculum
    also draws the smaller budgets within a stage)."""
    stages: list[tuple[int, int, int]] = []
    for r in sorted(train, key=lambda r: r["step"]):
        if stages and r["budget"] <= stages[-1][2]:
            stages[-1] = (stages[-1][0], r["step"], stages[-1][2])
        else:
            stages.append((r["step"], r["step"], r["budget"]))
    return stages


def best_step(val: list[dict[str, Any]]) -> int | None:
    """The first validation step with the highest mean accuracy over the budgets (the rule
    the training run keeps its best policy by)."""
    best, score = None, float("-inf")
    for r in val:
        values = [v for key, v in r.items() if key.startswith("accuracy@")]
        mean = sum(values) / len(values) if values else 0.0
        if mean > score:
            best, score = r["step"], mean
    return best


PANELS = (("reward", "reward per budget (mean of the group samples)", "tanh(margin/2)"),
          ("reward_std", "reward std within the groups", "std"),
          ("advantage_abs", "mean |advantage|", "|A|"),
          ("entropy", "policy entropy per pick", "nats"),
          ("loss", "loss", ""))


def training_curves(rows: list[dict[str, Any]], path: Path, best: int | None = None) -> Path:
    """Per step: reward (a line per budget, smoothed over its raw values), reward std within
    the groups, mean |advantage|, entropy and loss; validation accuracy and evidence recall per
    budget. The curriculum's stages are shaded and labelled by their largest k; the best step
    (``best``, else the best validation by ``best_step``) is marked on every panel."""
    train = sorted((r for r in rows if r.get("kind") == "train"), key=lambda r: r["step"])
    val = [r for r in rows if r.get("kind") == "val"]
    best = best if best is not None else best_step(val)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    flat = list(axes.flat)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    budgets = sorted({r["budget"] for r in train})
    colour = {k: colours[i % len(colours)] for i, k in enumerate(budgets)}
    for ax, (key, title, unit) in zip(flat, PANELS, strict=False):
        for k in budgets:
            mine = [r for r in train if r["budget"] == k and r.get(key) is not None]
            if not mine:
                continue
            values = [float(r[key]) for r in mine]
            steps = [r["step"] for r in mine]
            ax.plot(steps, values, alpha=0.25, color=colour[k])
            ax.plot(steps, _smooth(values), color=colour[k], label=f"k={k}")
        ax.set(title=title, xlabel="step", ylabel=unit)
    ax = flat[5]
    for key in sorted({k for r in val for k in r if k.startswith(("accuracy@", "evidence"))}):
        style = "-" if key.startswith("accuracy") else "--"
        ax.plot([r["step"] for r in val], [r[key] for r in val], style, marker="o",
                markersize=3, label=key)
    ax.set(title="validation (greedy selections)", xlabel="step", ylim=(0, 1))
    for ax in flat:
        _mark_stages(ax, budget_stages(train), best)
    flat[0].legend(fontsize=8)
    flat[5].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark_stages(ax: Any, stages: list[tuple[int, int, int]], best: int | None) -> None:
    """Alternate shading per curriculum stage with its largest budget (``k≤8``) at the top;
    the best step as a red line."""
    for i, (first, last, k) in enumerate(stages):
        ax.axvspan(first - 0.5, last + 0.5, color="gray" if i % 2 else "white", alpha=0.12,
                   lw=0)
        ax.text((first + last) / 2, 0.98, f"stage k≤{k}" if i else f"stage k={k}",
                transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7,
                color="dimgray")
    if best is not None:
        ax.axvline(best, color="tab:red", lw=1, ls="--", label=f"best (step {best})")


def evaluation_chart(table: list[Row], path: Path) -> Path:
    """All questions: one panel of accuracy against the budget per judge (a line per method,
    error bars its bootstrap interval, hollow markers where self-judged, the judge's chance
    level dashed and its all-frames ceiling dotted), then the evidence recall."""
    rows = [r for r in table if r.category == ALL]
    methods = list(dict.fromkeys(r.method for r in rows))
    judges = list(dict.fromkeys(r.judge for r in rows))
    ks = sorted({r.k for r in rows})
    index = {(r.method, r.k, r.judge): r for r in rows}
    first = {r.method: r for r in rows}  # a row of each method (its rewards' label)
    panels = [*judges, None]  # None: evidence recall
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1, 4.4),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    spread = 0.25 / max(1, len(methods))  # methods side by side around each budget
    for ax, judge in zip(axes[0], panels, strict=True):
        for i, method in enumerate(methods):
            _method_line(ax, [index.get((method, k, j)) for k in ks for j in
                              ([judge] if judge is not None else judges[:1])],
                         ks, i * spread - 0.125, colours[i % len(colours)], judge is None,
                         _label(method, first[method].rewards_by))
        if judge is not None:
            _judge_lines(ax, [r for r in rows if r.judge == judge])
            judged = next(r.judged for r in rows if r.judge == judge)
            total = next(r.questions for r in rows if r.judge == judge)
            note = "" if judged == total else f", {judged} of {total} questions"
            ax.set(title=f"accuracy, judged by {judge}{note}", ylabel="accuracy (95 % CI)")
        else:
            ax.set(title="evidence recall (no model)")
        ax.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
        ax.set(ylim=(0, 1.05), xlim=(-0.5, len(ks) - 0.5))
    handles, names = axes[0][0].get_legend_handles_labels()
    if any(r.self_judged for r in rows):
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="white",
                              markeredgecolor="black"))
        names.append("self-judged (judge = reward model)")
    axes[0][0].legend(handles, names, fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _label(method: str, rewards: str | None) -> str:
    return f"{method} (rewards: {rewards})" if rewards else method


def _method_line(ax: Any, cells: list[Row | None], ks: list[int], offset: float, colour: str,
                 recall: bool, label: str) -> None:
    """One method's accuracy (or recall) per budget, error bars from its interval."""
    xs, ys, low, high, hollow = [], [], [], [], []
    for x, cell in enumerate(cells):
        value = None if cell is None else (cell.evidence_recall if recall else cell.accuracy)
        if value is None:
            continue
        xs.append(x + offset)
        ys.append(value)
        has_ci = not recall and cell.ci_low is not None and cell.ci_high is not None
        low.append(value - cell.ci_low if has_ci else 0.0)
        high.append(cell.ci_high - value if has_ci else 0.0)
        hollow.append(not recall and cell.self_judged)
    if not xs:
        return
    ax.errorbar(xs, ys, yerr=[low, high], color=colour, marker="o", markersize=4, capsize=3,
                lw=1.2, label=label)
    for x, y, h in zip(xs, ys, hollow, strict=True):
        if h:
            ax.plot([x], [y], marker="o", markersize=6, color=colour, markerfacecolor="white")


def _judge_lines(ax: Any, rows: list[Row]) -> None:
    """The judge's chance level (dashed) and all-frames ceiling (dotted)."""
    chance = next((r.chance for r in rows if r.chance), None)
    ceiling = next((r.ceiling for r in rows if r.ceiling is not None), None)
    for value, style, colour, name in ((chance, "--", "gray", "chance"),
                                       (ceiling, ":", "black", "all frames (ceiling)")):
        if value is None:
            continue
        ax.axhline(value, color=colour, ls=style, lw=1.2, label=name)
        ax.text(1.0, value, f" {name} {100 * value:.0f} %", transform=ax.get_yaxis_transform(),
                ha="right", va="bottom", fontsize=7, color=colour)


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
