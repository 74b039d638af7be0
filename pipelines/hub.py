"""Trained policies as Hugging Face Hub models (``refocus export-policy``, and ``refocus score
--policy ORG/NAME``).

A policy leaves its run folder through ``huggingface_hub.PyTorchModelHubMixin``
(refocus/policy.py): ``save_pretrained`` into an export folder or ``push_to_hub`` to a repo,
both writing ``config.json`` (the policy's own record, as its run folder keeps it: shape,
encoder identity, candidate-frame settings, training settings and budgets, the reward model),
``model.safetensors`` and the model card ``README.md``. The card says what a user needs to
trust and use the policy: encoder, candidate settings, the model that gave the rewards, the
training data, the cross-judged evaluation (``--eval DIR``, a ``refocus eval`` folder) and the
command that trained it (the run's resolved-config.yaml).

:func:`resolve_policy` is the one reading of a ``--policy`` value: an existing path is a
local policy (a run folder of either layout, a policy folder, an export folder); anything
else that is a valid repo id is a Hub model, fetched into (or, with ``HF_HUB_OFFLINE=1``,
found in) the Hugging Face cache, and its snapshot folder is then read like a local one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import validate_repo_id

from pipelines.policies import load_policy, policy_folder
from refocus.policy import FrameSelector
from stores.checkpoints import CONFIG, HUB_WEIGHTS
from stores.errors import UserError
from stores.owned import claim
from stores.runs import RUN_FILE

CARD = "README.md"
HUB_FILES = (CONFIG, HUB_WEIGHTS, CARD)  # what an export folder and a Hub repo hold
EXPORT_KIND = "hub-policy"  # the owned-folder marker of an export folder
RESOLVED_CONFIG = "resolved-config.yaml"  # flows/config.py writes it into every output folder


# ----------------------------------------------------------------------------- resolution

def is_repo_id(spec: str) -> bool:
    """``org/name``: a valid Hugging Face repo id with its namespace."""
    if spec.count("/") != 1:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


def resolve_policy(spec: str | os.PathLike[str]) -> Path:
    """The local folder a ``--policy`` value names: the path itself when it exists, else the
    Hub model's snapshot in the Hugging Face cache (downloaded when the Hub is reachable and
    ``HF_HUB_OFFLINE`` is not set)."""
    path = Path(spec)
    if path.exists() or not is_repo_id(str(spec)):
        return path
    repo = str(spec)
    try:
        return Path(snapshot_download(repo, allow_patterns=list(HUB_FILES)))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise UserError(f"{repo}: no such folder, and this Hugging Face model is not in the "
                        "local cache (offline); download it where the Hub is reachable "
                        f"(hf download {repo}) or give a policy folder") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"{repo}: no such folder, and the Hugging Face Hub refused it "
                        f"({first}); check the id and your token") from None


# ----------------------------------------------------------------------------- the card

def _bullets(record: dict[str, Any] | None, keys: tuple[str, ...] | None = None) -> str:
    if not record:
        return "not recorded"
    keys = keys or tuple(record)
    return "\n".join(f"- {k}: `{json.dumps(record[k])}`" for k in keys if k in record)


ENCODER_KEYS = ("model", "pretrained", "weights_sha256", "config_sha256", "dim",
                "context_length", "text_template")


def _training(record: dict[str, Any], run: dict[str, Any] | None) -> str:
    settings = record.get("settings") or {}
    lines = [f"- rewards given by: `{record.get('reward') or 'not recorded'}` (the judge "
             "whose cells the evaluation marks self-judged)"]
    if record.get("surrogate"):
        lines.append(f"- surrogate reward model: `{record['surrogate']}`, the reward model "
                     f"every {record.get('lmm_every')} steps")
    if run:
        lines.append(f"- training data: the feature store `{run.get('store')}`"
                     + (f" with the questions of {run['qa']}" if run.get("qa") else ""))
    lines += [f"- frame budgets (k): {settings.get('budgets', 'not recorded')}",
              f"- steps: {settings.get('steps', 'not recorded')}, questions per step "
              f"{settings.get('questions_per_step', '?')}, group {settings.get('group', '?')}",
              f"- this checkpoint: {record.get('chosen', 'not recorded')}"
              + (f" ({json.dumps(record['best'])})" if record.get("best") else "")]
    return "\n".join(lines)


def _scores(eval_dir: Path | None, reward: str | None) -> str:
    if eval_dir is None:
        return ("No evaluation was given at export (refocus export-policy --eval DIR, a "
                "refocus eval folder).")
    table = eval_dir / "eval.md"
    if not table.is_file():
        raise UserError(f"{eval_dir}: no eval.md; give a refocus eval --out folder")
    return (f"From `refocus eval` ({eval_dir.name}/eval.md). Rewards were given by "
            f"`{reward or 'not recorded'}`: a cell judged by that model is self-judged (*); "
            "the other judges are independent of training.\n\n"
            + table.read_text(encoding="utf-8").strip())


def _command(run_dir: Path | None) -> str:
    resolved = (run_dir / RESOLVED_CONFIG) if run_dir is not None else None
    if resolved is None or not resolved.is_file():
        return "The training command was not recorded beside the policy."
    text = resolved.read_text(encoding="utf-8").strip()
    command = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("command:")), "train")
    return (f"`refocus {command} --config {RESOLVED_CONFIG}` with the run's resolved "
            f"options:\n\n```yaml\n{text}\n```")


@dataclass(frozen=True)
class Export:
    """What leaves a run: the policy module, its config.json record and the card's fields."""

    policy: FrameSelector
    record: dict[str, Any]
    card: dict[str, Any]


def _usage(policy: str, k: int) -> str:
    """How to run the policy: one call in Python, or a corpus with refocus score."""
    return (f'```python\nfrom pipelines import select_frames\n\n'
            f'picked = select_frames("video.mp4", "What does the person pick up?",\n'
            f'                       ["a cup", "a book", "a phone"], k={k}, policy="{policy}")\n'
            f'picked.timestamps, picked.images  # seconds, PIL images\n```\n\n'
            f'or for a corpus: `refocus score corpus.jsonl --policy {policy} --out scored/`.')


def prepare_export(run: str | os.PathLike[str], eval_dir: str | os.PathLike[str] | None = None,
                   repo_id: str | None = None) -> Export:
    """The policy a run (or policy folder) holds, ready for ``save_pretrained`` /
    ``push_to_hub``; refuses a policy that does not record what scoring needs."""
    found = policy_folder(run)
    record = dict(found.record)
    for needed in ("encoder", "candidates"):
        if not record.get(needed):
            raise UserError(f"{found.path}: its config.json records no {needed}; scoring "
                            "could not rebuild its inputs. Retrain with this refocus version")
    policy = load_policy(found.path)
    budgets = (record.get("settings") or {}).get("budgets") or [8]
    run_dir = next((f for f in (found.path, found.path.parent) if (f / RUN_FILE).is_file()),
                   None)
    name = repo_id or Path(found.given).resolve().name
    card = {
        "title": f"refocus frame-selection policy {name}",
        "repo_id": repo_id or str(found.given),
        "usage": _usage(repo_id or str(found.given), max(int(k) for k in budgets)),
        "encoder": _bullets(record.get("encoder"), ENCODER_KEYS),
        "candidates": _bullets(record.get("candidates")),
        "training": _training(record, found.run),
        "scores": _scores(Path(eval_dir) if eval_dir else None, record.get("reward")),
        "command": _command(run_dir),
    }
    return Export(policy, record, card)


def export_policy(run: str | os.PathLike[str], out: str | os.PathLike[str],
                  eval_dir: str | os.PathLike[str] | None = None,
                  repo_id: str | None = None) -> Path:
    """Write the policy as a Hub model folder (``HUB_FILES``) into ``out``, a folder refocus
    owns (made, or an earlier export, whose files are replaced)."""
    export = prepare_export(run, eval_dir, repo_id)
    owned = claim(out, EXPORT_KIND, inputs=[run, eval_dir])
    with owned.lock():
        owned.remove(*HUB_FILES)  # save_pretrained keeps an existing README.md
        export.policy.save_pretrained(owned.path, config=export.record,
                                      model_card_kwargs=export.card)
    return owned.path


def push_policy(run: str | os.PathLike[str], repo_id: str,
                eval_dir: str | os.PathLike[str] | None = None, private: bool | None = None,
                ) -> str:
    """Upload the policy to ``repo_id`` (the files of an export) through the mixin's
    ``push_to_hub``; returns the commit URL."""
    if not is_repo_id(repo_id):
        raise UserError(f"--push-to-hub {repo_id}: not a Hugging Face repo id (ORG/NAME)")
    export = prepare_export(run, eval_dir, repo_id)
    try:
        return str(export.policy.push_to_hub(
            repo_id, config=export.record, model_card_kwargs=export.card, private=private,
            commit_message="refocus export-policy", allow_patterns=list(HUB_FILES)))
    except OfflineModeIsEnabled:
        raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it where "
                        "the Hub is reachable, or export a folder and upload it later"
                        ) from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0]
        raise UserError(f"--push-to-hub {repo_id}: the Hub refused the upload ({first}); "
                        "log in (hf auth login) with a token that may write there") from None

