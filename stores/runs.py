"""A training run's folder (``refocus train --out RUN``): one format, owned here.

```
RUN/.refocus-output.json   kind "run" (stores/owned.py)
RUN/run.json               the run's identity: training store, questions, reward (and
                           surrogate), GRPO and run settings; a resume must match it
RUN/checkpoint/            the trainer's whole state (stores/checkpoints.py)
RUN/metrics.jsonl          one JSON row per step and per validation
RUN/config.json            the best policy on validation: the run folder is itself a
RUN/weights.safetensors      policy model folder (its config.json records the encoder, the
                             candidate settings, the training settings and the reward)
RUN/policy-last/           the last step's policy, a model folder of its own
RUN/training.png, RUN/summary.json
RUN/complete.json          written last, when every output above is in place
```

Runs written before this layout kept the best policy in ``RUN/policy/`` (so a run called
``policy`` held ``policy/policy/``); they still load (:func:`find_policy_folder`), and a
finished run's outputs re-written here move it to the flat layout; the path ``RUN/policy``
still names a run's best policy.

:func:`find_policy_folder` is the one resolution of a path given as a policy: a run folder
(either layout), its ``policy-last/``, or a bare policy model folder; with the run's
``run.json`` when it is found beside the policy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stores import checkpoints
from stores.checkpoints import CONFIG, HUB_WEIGHTS, WEIGHTS, Checkpoint, MetricsLog
from stores.errors import UserError
from stores.owned import Owned, claim
from stores.shards import write_json_atomic

RUN_KIND = "run"  # the owned-folder marker's kind
POLICY_KIND = "policy"  # the model kind in a policy's config.json
RUN_FILE = "run.json"
METRICS = "metrics.jsonl"
LAST = "policy-last"  # the last step's policy
OLD_BEST = "policy"  # where runs before the flat layout kept their best policy
CURVES, SUMMARY, COMPLETE = "training.png", "summary.json", "complete.json"
FINAL_OUTPUTS = (CONFIG, f"{LAST}/{CONFIG}", CURVES, SUMMARY, COMPLETE)  # complete.json last


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: damaged ({e}); re-create it or choose another folder") from None


@dataclass(frozen=True)
class RunFolder:
    """A run folder: ``owned`` when this process writes it (claimed), else read only."""

    path: Path
    owned: Owned | None = None

    def __fspath__(self) -> str:
        return str(self.path)

    @classmethod
    def claim(cls, path: str | os.PathLike[str],
              inputs: Iterable[str | os.PathLike[str] | None] = ()) -> RunFolder:
        """Claim ``path`` as a run folder (new, or one refocus made for a run; anything else
        is refused in one line, see stores/owned.py)."""
        return cls(Path(path), claim(path, RUN_KIND, inputs=inputs))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> RunFolder:
        """A run folder to read (and, on the other ranks of a distributed run, resume from)."""
        return cls(Path(path))

    def _writer(self) -> Owned:
        if self.owned is None:
            raise ValueError(f"{self.path}: opened to read; claim it to write")
        return self.owned

    def lock(self) -> AbstractContextManager[None]:
        return self._writer().lock()

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any] | None:
        """The run's ``run.json``, or None when there is none."""
        path = self.path / RUN_FILE
        return _read_json(path) if path.is_file() else None

    def write_identity(self, identity: dict[str, Any]) -> None:
        self._writer()
        write_json_atomic(self.path / RUN_FILE, identity)

    # ------------------------------------------------------------------ checkpoint, metrics
    def checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint (see stores/checkpoints.py), or None."""
        return checkpoints.load_checkpoint(self.path)

    def save_checkpoint(self, state: Checkpoint, resumed_from: str = checkpoints.CHECKPOINT,
                        ) -> None:
        checkpoints.save_checkpoint(self._writer(), state.tensors, state.meta, state.cache,
                                    resumed_from)

    def metrics(self) -> MetricsLog:
        return MetricsLog(self.path / METRICS)

    def clear_metrics(self) -> None:
        self._writer().remove(METRICS)

    # ------------------------------------------------------------------ policies, completion
    def write_policy(self, config: dict[str, Any], weights: dict[str, torch.Tensor],
                     last: bool = False, **record: Any) -> None:
        """The best policy (into the run folder itself; an old-layout ``policy/`` is removed
        once it is written) or, with ``last``, the last step's (``policy-last/``)."""
        if last:
            checkpoints.save_model(self.path / LAST, POLICY_KIND, config, weights, **record)
            return
        checkpoints.write_model(self._writer(), POLICY_KIND, config, weights, **record)
        old = self.path / OLD_BEST
        if (old / CONFIG).is_file() and _policy_record(old) is not None:
            self._writer().remove(OLD_BEST)

    def missing_outputs(self) -> list[str]:
        return [name for name in FINAL_OUTPUTS if not (self.path / name).exists()]

    def uncomplete(self) -> None:
        """Remove ``complete.json`` (until every final output is in place again)."""
        self._writer().remove(COMPLETE)

    def is_complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    def write_complete(self, steps: int, best: dict[str, Any]) -> None:
        self._writer()
        write_json_atomic(self.path / COMPLETE, {"steps": steps, "best": best,
                                                 "outputs": list(FINAL_OUTPUTS[:-1])})

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._writer()
        write_json_atomic(self.path / SUMMARY, summary)


def same_run(before: dict[str, Any], identity: dict[str, Any],
             setting_defaults: dict[str, Any]) -> bool:
    """Whether a run folder's ``run.json`` (``before``) names the run ``identity`` describes;
    a setting added since that run was written counts as its default
    (``setting_defaults``) there."""
    now = json.loads(json.dumps(identity))
    defaults = json.loads(json.dumps(setting_defaults))
    old = dict(before.get("settings") or {})
    for key, value in now.get("settings", {}).items():
        if key not in old and key in defaults and value == defaults[key]:
            old[key] = value
    return {**before, "settings": old} == now


# ----------------------------------------------------------------------------- finding a policy

@dataclass(frozen=True)
class PolicyFolder:
    """Where a path given as a policy leads: ``path`` is the model folder (config.json and
    weights), ``record`` its config.json, ``run`` the run.json of the run it came from (None
    when not found beside it)."""

    given: Path
    path: Path
    record: dict[str, Any]
    run: dict[str, Any] | None


def _policy_record(folder: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(meta, dict) and meta.get("kind") == POLICY_KIND
    weights = any((folder / name).is_file() for name in (WEIGHTS, HUB_WEIGHTS))  # either format
    return meta if ok and weights else None


def find_policy_folder(path: str | os.PathLike[str]) -> PolicyFolder | None:
    """The policy a path names: a run folder's best policy (the folder itself, or its
    ``policy/`` in the old layout), or a policy model folder; None when it holds none.
    ``RUN/policy``, the old layout's path of the best policy, names it in either layout."""
    given = Path(path)
    alias = [given.parent] if given.name == OLD_BEST and not given.exists() else []
    for folder in (given, given / OLD_BEST, *alias):
        record = _policy_record(folder)
        if record is not None:
            run = next((RunFolder.open(f).identity() for f in (folder, folder.parent)
                        if (f / RUN_FILE).is_file()), None)
            return PolicyFolder(given, folder, record, run)
    return None
