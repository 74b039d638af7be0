"""The Prefect runner: a stage's per-item step as Prefect tasks of the running flow.

The flow's task runner decides where the tasks run (``flows/runtime.py``: a thread pool in
this process for ``prefect``, a Dask cluster for ``dask``); each task is retried as its
``Orchestration`` says (transient errors only), and every task's final state is noted for the
flow's run record. ``run_flow`` is how ``refocus ingest|embed|score --runner prefect|dask``
run their stage: inside the stage's flow (``flows/orchestrate.py``), under Prefect's temporary
API server (stopped with this process) unless ``PREFECT_API_URL`` names a running one.

What the UI shows of a mapped step: a progress artifact (``flows/artifacts.py``) updated as
each task ends, and in each task's log the stage's progress events (a line per video).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.artifacts import Progress
from flows.runtime import Orchestration, prepare_prefect, retry_options, task_runner
from pipelines.runners import Done, Failed, I, Report, Step, T, ignore, one_line


@task(cache_policy=NO_CACHE, task_run_name="{title}")
def step_task(run: Callable[[Any, Report], Any], item: Any, title: str) -> Any:
    """One item of a stage's step; its progress events go to the task's log: a line per
    video (landed with its frames, or failed with why), and a count of other units."""
    events = TaskEvents(get_run_logger())
    value = run(item, events)
    events.close(title)
    return value


@dataclass
class TaskEvents:
    """A stage's ``report`` inside a task: per-video events logged as they come, numbers
    (embed's frames) summed and logged once at the end."""

    logger: Any
    units: int = 0

    def __call__(self, event: Any) -> None:
        if isinstance(event, (int, float)):
            self.units += int(event)
        elif getattr(event, "error", None):
            self.logger.warning("video %s failed: %s", event.video_id, event.error)
        elif hasattr(event, "video_id"):
            self.logger.info("video %s: %d frames", event.video_id, event.frames)
        else:
            self.logger.info("%s", event)

    def close(self, title: str) -> None:
        if self.units:
            self.logger.info("%s: %d frames", title, self.units)


@dataclass
class PrefectRunner:
    """Each item a task of the running flow, retried on transient errors; ``states`` gets
    every task's final state by item name (the flow's run record)."""

    orchestration: Orchestration = field(default_factory=Orchestration)
    states: dict[str, str] = field(default_factory=dict)

    def map(self, step: Step[I, T], items: Sequence[I],
            report: Report = ignore) -> Iterator[Done[T] | Failed]:
        progress = Progress(step.kind, len(items))  # a progress artifact of the flow run
        if not items:
            return
        mapped = step_task.with_options(name=step.kind, **retry_options(self.orchestration))
        futures = list(mapped.map(unmapped(step.run), list(items),
                                  [step.title(item) for item in items]))
        names = {id(future): step.name(item) for future, item in zip(futures, items,
                                                                       strict=True)}
        for future in as_completed(futures):
            name = names[id(future)]
            value = future.result(raise_on_failure=False)
            self.states[name] = future.state.name
            progress.item_done(failed=isinstance(value, BaseException))
            yield Failed(name, one_line(value)) if isinstance(value, BaseException) \
                else Done(name, value)


def with_runner(flow_obj: Any, o: Orchestration) -> Any:
    """The flow with its mapped tasks on ``o``'s task runner (threads or Dask)."""
    return flow_obj.with_options(task_runner=task_runner(o))


def run_flow(flow_obj: Any, runner: str, workers: int, *args: Any, **kwargs: Any) -> Any:
    """``flow_obj(*args, **kwargs)`` with its tasks on ``runner`` (prefect: ``workers``
    threads; dask: a local cluster of ``workers`` processes)."""
    prepare_prefect()
    o = Orchestration(runner, max(1, workers))
    return with_runner(flow_obj, o)(*args, orchestration=o, **kwargs)
