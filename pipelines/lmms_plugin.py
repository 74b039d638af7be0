"""The ``refocus`` model of lmms-eval: any lmms-eval model, fed refocus's selected frames.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (pyproject.toml), so an
installed refocus adds it to lmms-eval's own CLI::

    lmms-eval --model refocus --tasks videomme \\
        --model_args model=llava_onevision,selections=OUT/score,frames_as=video,pretrained=...

``model`` names the wrapped lmms-eval model; ``selections`` the ``refocus score`` output folder
(default ``$REFOCUS_SELECTIONS``); ``frames_as`` is ``video`` (the frames as one video, with
fps and timestamps in the request metadata) or ``images``; ``frames`` is ``selected`` or
``uniform`` (the baseline: as many frames, evenly spaced, through the same path); ``shards``
where the frames are if they moved; ``id_fields`` the document fields holding a question id
(``question_id|id``). Every other key goes to the wrapped model. The task's own
``doc_to_visual`` is never called, so any video task works as it is, with no task file of its
own. A document without a selection stops the run before the model is called: one line on
stderr naming it, exit status 2.

This module needs lmms-eval; :mod:`pipelines.lmms_eval` holds the logic and does not.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from pipelines.lmms_eval import (
    DEFAULT_ID_FIELDS,
    RequestRouter,
    SelectedFrames,
    in_request_order,
    reader_for,
)
from stores.errors import UserError

MODEL_NAME = "refocus"
TASKS_DIR = Path(__file__).resolve().parent / "lmms_tasks"  # --include_path for our task files


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads (group ``lmms_eval.models``)."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.RefocusModel")


def _bool(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _stop(error: UserError) -> SystemExit:
    """lmms-eval's CLI catches every Exception and exits 0; a SystemExit it lets through."""
    print(f"refocus: {error}", file=sys.stderr, flush=True)
    return SystemExit(2)


class RefocusModel(lmms):
    """Wraps an lmms-eval model; see the module docstring for its model_args."""

    is_simple = True  # as registered; each instance takes its wrapped model's kind

    def __init__(self, model: str = "", selections: str | None = None,
                 frames_as: str = "video", frames: str = "selected", shards: str | None = None,
                 id_fields: str = "|".join(DEFAULT_ID_FIELDS), force_simple: Any = False,
                 **model_args: Any) -> None:
        super().__init__()
        try:
            if not model or model == MODEL_NAME:
                raise UserError("--model refocus needs model=<an lmms-eval model> in "
                                "--model_args (the model that gets the frames)")
            reader = SelectedFrames(selections, shards=shards) if selections or shards \
                else reader_for()
            self.router = RequestRouter(reader, frames_as=frames_as, frames=frames,
                                        id_fields=[f for f in id_fields.split("|") if f])
        except UserError as e:
            raise _stop(e) from e
        from lmms_eval.models import get_model  # not at the top: lmms-eval imports this module
        # while its lmms_eval.models is still loading (the entry point)

        inner_class = get_model(model, _bool(force_simple))
        extra = {k: v for k, v in model_args.items() if k in ("batch_size", "max_batch_size",
                                                                 "device")}
        args = ",".join(f"{k}={v}" for k, v in model_args.items() if k not in extra)
        self.inner: lmms = inner_class.create_from_arg_string(args, extra)
        self.is_simple = self.inner.is_simple
        self.task_dict = self.inner.task_dict  # one dict: lmms-eval fills ours, the model reads
        self.selections = str(reader.folder)

    # lmms-eval asks the model for its place in a distributed run
    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    def __getattr__(self, name: str) -> Any:  # accelerator, device, ... of the wrapped model
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _run(self, method: str, requests: list[Any]) -> list[Any]:
        try:
            groups = self.router.route(requests, self.task_dict, simple=self.is_simple)
        except UserError as e:
            raise _stop(e) from e
        call = getattr(self.inner, method)
        return in_request_order(groups, [call([r for _, r in group]) for group in groups])

    def generate_until(self, requests: list[Any]) -> list[Any]:
        return self._run("generate_until", requests)

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        return self._run("loglikelihood", requests)

    def generate_until_multi_round(self, requests: list[Any]) -> list[Any]:
        return self._run("generate_until_multi_round", requests)


if __name__ == "__main__":
    print(TASKS_DIR)  # for --include_path
