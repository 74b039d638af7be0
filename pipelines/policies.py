"""Trained policies as the commands that use them see them: one resolution of a path given as
a policy (``stores.runs.find_policy_folder``: a run folder of either layout, its
``policy-last/``, or a policy model folder), the torch policy built from it, and what its
folder and its run record (training store, budgets, reward)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from refocus.policy import FrameSelector, PolicyConfig
from stores import checkpoints
from stores.errors import UserError
from stores.features import FeatureStore
from stores.runs import POLICY_KIND, PolicyFolder, find_policy_folder


def policy_folder(path: str | os.PathLike[str]) -> PolicyFolder:
    """The policy a path names, or a one-line refusal."""
    found = find_policy_folder(path)
    if found is not None:
        return found
    if not Path(path).exists():
        raise UserError(f"{path}: no such policy (give a refocus train --out folder)")
    raise UserError(f"{path}: holds no refocus policy (give a refocus train --out folder "
                    "or a policy folder)")


def policy_record(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a policy's config.json records besides its weights (encoder, candidate
    settings, training settings …); empty when the path holds no policy."""
    found = find_policy_folder(path)
    return found.record if found is not None else {}


def load_policy(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                ) -> FrameSelector:
    """The policy a path names (a run folder's best policy, or a policy folder), on
    ``device``, in eval mode."""
    found = find_policy_folder(path)
    if found is not None and not (found.path / checkpoints.WEIGHTS).is_file():
        # exported for the Hugging Face Hub (pipelines/hub.py): the mixin's own loading
        return FrameSelector.from_pretrained(found.path, map_location=str(device))
    config, weights, _ = checkpoints.load_model(found.path if found else path, POLICY_KIND)
    policy = FrameSelector(PolicyConfig(**config))
    policy.load_state_dict(weights)
    return policy.to(device).eval()


def policy_reward(path: str | os.PathLike[str]) -> str | None:
    """The id of the reference that gave a policy its rewards: from its config.json, else from
    its run's run.json; None when neither says."""
    found = find_policy_folder(path)
    if found is None:
        return None
    reward = found.record.get("reward") or (found.run or {}).get("reward")
    return str(reward) if reward else None


@dataclass(frozen=True)
class TrainedPolicy:
    """A policy as given (``path``), the feature store it was trained on, and the frame
    budgets of its training curriculum (empty when neither its folder nor its run records
    them)."""

    path: Path
    store: FeatureStore | None
    budgets: tuple[int, ...] = ()


def _recorded_budgets(record: dict[str, Any]) -> tuple[int, ...]:
    budgets = (record.get("settings") or {}).get("budgets") or ()
    return tuple(int(k) for k in budgets)


def find_policy(path: str | os.PathLike[str]) -> TrainedPolicy:
    """A training run folder or a policy model folder, with its run's training store (when
    it is still where run.json says: what older policies, which do not record their encoder
    and candidate settings themselves, are scored with)."""
    found = policy_folder(path)
    run = found.run or {}
    store = run.get("store")
    return TrainedPolicy(Path(path),
                         FeatureStore(store) if store and Path(store).exists() else None,
                         _recorded_budgets(found.record) or _recorded_budgets(run))
