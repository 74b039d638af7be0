"""Training metrics streamed to an experiment tracker (``--report-to tensorboard|wandb``).

The run folder's ``metrics.jsonl`` (a reader's log rows, for ``train-reader``) stays the
record: a :class:`Reporter` only mirrors each row written there, as scalars at the row's step.
A row ``{"kind": "train", "step": 7, "budget": 8, "reward": 0.4, ...}`` becomes the scalars
``train/reward``, ``train/budget`` … at step 7, plus ``train/reward@k8`` (the reward per
budget, one curve per budget of the curriculum); nested numbers are flattened with ``/``
(``val/reward_subsets/...``) and text values (``reward_from``) are left out.

* ``tensorboard``: event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN``). The
  writer opens on the first row, with that row's step as TensorBoard's purge step: a run
  resumed from its checkpoint hides the steps a killed run wrote past it, as ``metrics.jsonl``
  drops them.
* ``wandb``: a Weights & Biases run (project ``$WANDB_PROJECT``, else ``refocus``; named after
  the run folder; its files in ``RUN/wandb``; ``WANDB_MODE=offline`` keeps it local), with the
  run's resolved configuration. Each call (a resumed run too) is a new W&B run.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from refocus.settings import REPORT_TO
from stores.errors import UserError
from stores.owned import Owned

NO_REPORT = REPORT_TO[0]  # metrics.jsonl alone
TENSORBOARD_FOLDER = "tensorboard"  # in the run (or reader) folder
WANDB_FOLDER = "wandb"  # made by wandb inside the folder it is given
WANDB_PROJECT = "refocus"  # when $WANDB_PROJECT is not set
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # module each tracker needs


class Reporter(Protocol):
    """Mirrors metrics rows into an experiment tracker."""

    def add(self, row: Mapping[str, Any]) -> None:
        """One metrics row (it has a ``step``)."""

    def close(self) -> None:
        """Flush and finish."""


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A metrics row's numbers by tag (``KIND/NAME``; see the module docstring)."""
    kind = str(row.get("kind", "train"))
    found: dict[str, float] = {}
    _flatten(kind, {k: v for k, v in row.items() if k not in ("kind", "step")}, found)
    if isinstance(row.get("budget"), int) and _is_number(row.get("reward")):
        found[f"{kind}/reward@k{row['budget']}"] = float(row["reward"])
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flatten(prefix: str, value: Any, found: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, found)
    elif _is_number(value) or isinstance(value, bool):
        found[prefix] = float(value)


class NoReporter:
    """``--report-to none`` (and the ranks of a distributed run that do not write)."""

    def add(self, row: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter:
    """Event files in ``folder``, opened on the first row (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.writer: Any = None

    def add(self, row: Mapping[str, Any]) -> None:
        step = int(row["step"])
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.folder), purge_step=step)
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbReporter:
    """A Weights & Biases run, started on the first row."""

    def __init__(self, folder: Path, config: Mapping[str, Any]) -> None:
        self.folder, self.config = folder, dict(config)
        self.run: Any = None

    def add(self, row: Mapping[str, Any]) -> None:
        if self.run is None:
            import wandb

            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
                                  name=self.folder.name, dir=str(self.folder),
                                  config=self.config, mode=os.environ.get("WANDB_MODE"))
        self.run.log(scalars(row), step=int(row["step"]))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


def require(report_to: str) -> None:
    """Refuse, in one line, a tracker that is unknown or whose package is not installed
    (before anything is written)."""
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to {report_to!r}: expected one of {', '.join(REPORT_TO)}")
    module = PACKAGES.get(report_to)
    if module is None:
        return
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {report_to}: the {module} package is not installed; "
                        f"pip install {module} (or choose --report-to none)") from None


@contextmanager
def reporter(report_to: str, owned: Owned | None, config: Mapping[str, Any],
             ) -> Iterator[Reporter]:
    """The reporter of a run folder (``owned``; None on a rank that does not write), closed
    when the block ends, an error included."""
    require(report_to)
    chosen: Reporter = NoReporter()
    if owned is not None and report_to == "tensorboard":
        chosen = TensorBoardReporter(owned.path / TENSORBOARD_FOLDER)
    elif owned is not None and report_to == "wandb":
        chosen = WandbReporter(owned.path, config)
    try:
        yield chosen
    finally:
        chosen.close()


def teed(log: Callable[[dict], None] | None, to: Reporter) -> Callable[[dict], None]:
    """A log callback that also hands each row to the reporter ``to``."""

    def both(row: dict) -> None:
        to.add(row)
        if log is not None:
            log(row)

    return both
