"""What a flow run shows in the Prefect UI besides its task states: Prefect artifacts.

* ``refocus-FLOW-summary`` (markdown): the run's summary, one table row per number or name
  (nested stages as ``ingest.videos``), with the count of failures in its headline.
* ``refocus-FLOW-failures`` (table): one row per item that did not land — stage, kind, where,
  video, error — the same items as the summary's ``failures`` lists (empty when all landed).
* ``refocus-STEP-progress`` (progress): a step's items (shards, chunks) finished so far, in
  per cent, updated as each task ends (``Progress``).

The artifacts sit beside the run's own records (ROOT/flow-runs/*.json, ROOT/logs/), which
stay the files a script reads. Artifact keys: lowercase letters, digits and dashes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

FAILURE_COLUMNS = ("stage", "kind", "where", "video_id", "error")


def artifact_key(*parts: str) -> str:
    """``refocus-…`` made of ``parts`` in the characters Prefect allows in a key."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(("refocus", *parts)).lower()).strip("-")


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The summary's numbers and names by dotted path (failures have their own table)."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name != "failures":
                yield from _leaves(item, f"{prefix}.{name}" if prefix else str(name))
    elif isinstance(value, (list, tuple)):
        short = all(not isinstance(v, (dict, list, tuple)) for v in value) and len(value) <= 8
        yield prefix, ", ".join(map(str, value)) if short else f"{len(value)} items"
    else:
        yield prefix, value


def failure_rows(summary: Any, stage: str = "") -> list[dict[str, Any]]:
    """Every ``failures`` list in the summary (at any depth) as rows of FAILURE_COLUMNS; a
    failure given as one line (``where: error``) is split at its first ``": "``."""
    if not isinstance(summary, dict):
        return []
    rows: list[dict[str, Any]] = []
    for name, item in summary.items():
        if name == "failures" and isinstance(item, list):
            rows.extend(_failure_row(stage, f) for f in item)
        elif isinstance(item, dict):
            rows.extend(failure_rows(item, f"{stage}.{name}" if stage else str(name)))
    return rows


def _failure_row(stage: str, failure: Any) -> dict[str, Any]:
    if isinstance(failure, dict):
        row = {"stage": stage, **{c: failure.get(c) for c in FAILURE_COLUMNS[1:]}}
        return {k: "" if v is None else str(v) for k, v in row.items()}
    where, _, error = str(failure).partition(": ")
    return {"stage": stage, "kind": "", "where": where if error else "",
            "video_id": "", "error": error or where}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def summary_markdown(flow: str, summary: dict[str, Any], status: str, failures: int) -> str:
    lines = [f"# refocus {flow}: {status}", "",
             f"**{_count(failures, 'failure')}**"
             + (f" (table `{artifact_key(flow, 'failures')}`)" if failures else ""), "",
             "| field | value |", "|---|---|"]
    for name, value in _leaves(json.loads(json.dumps(summary, default=str))):
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def publish_run(flow: str, summary: dict[str, Any], status: str) -> list[dict[str, Any]]:
    """The run's summary (markdown) and failures (table) as artifacts of the running flow;
    returns the failure rows."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    rows = failure_rows(summary)
    create_table_artifact(rows or {c: [] for c in FAILURE_COLUMNS},  # (columns, no rows)
                          key=artifact_key(flow, "failures"),
                          description=f"refocus {flow}: {_count(len(rows), 'item')} did not land")
    create_markdown_artifact(summary_markdown(flow, summary, status, len(rows)),
                             key=artifact_key(flow, "summary"),
                             description=f"refocus {flow}: what landed")
    return rows


def publish_table(flow: str, name: str, rows: list[dict[str, Any]], description: str) -> None:
    """Any table of a run (evaluate: the accuracy rows) as an artifact."""
    from prefect.artifacts import create_table_artifact

    create_table_artifact(json.loads(json.dumps(rows, default=str)),
                          key=artifact_key(flow, name), description=description)


@dataclass
class Progress:
    """A progress artifact of one step's items, updated as each item ends."""

    kind: str
    total: int
    artifact: Any = None
    done: int = 0
    failed: int = 0

    def __post_init__(self) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact = create_progress_artifact(
            self._percent(), key=artifact_key(self.kind, "progress"),
            description=self._text())

    def _percent(self) -> float:
        return 100.0 if self.total == 0 else round(100.0 * self.done / self.total, 2)

    def _text(self) -> str:
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.kind}: {self.done} of {self.total} finished{failed}"

    def item_done(self, failed: bool) -> None:
        from prefect.artifacts import update_progress_artifact

        self.done += 1
        self.failed += failed
        update_progress_artifact(self.artifact, self._percent(), description=self._text())
