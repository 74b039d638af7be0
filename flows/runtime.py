"""How flows run: the task runner (local threads or a Dask cluster), which errors are
retried, and the records a flow leaves under its data root.

* **Task runners.** ``local`` (default; ``prefect`` on the stage commands) runs mapped tasks
  in a thread pool inside the flow's process, against Prefect's ephemeral API (nothing to
  start). ``dask`` runs them on a Dask
  cluster: a local one with ``workers`` processes, or an existing scheduler at ``address``
  (``tcp://host:8786``) whose workers see the same file system, so preprocessing goes past
  one machine.
* **Retries.** A task is retried, with exponential backoff, only when it failed for a reason
  that may pass: an I/O or connection error. Bad input (``UserError``, missing files, bad
  values) fails at once; bad videos never fail a task at all, they are recorded in their
  shard's marker.
* **Records.** Each flow run appends its log to ``ROOT/logs/<flow>.log`` and writes
  ``ROOT/flow-runs/<time>-<flow>.json`` (parameters, per-task states, summary); a run that
  finishes also publishes its summary and failures as Prefect artifacts (flows/artifacts.py),
  so the UI shows what landed and what failed.
* **No orphan server.** Without ``PREFECT_API_URL`` Prefect starts a temporary API server
  process and stops it when the flow's process exits; a ``kill -9`` skips that. So the
  command line starts that server itself (``guard_temporary_server``) together with a small
  guard process that ends it (SIGTERM, then SIGKILL) as soon as the flow's process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.artifacts import publish_run
from pipelines.runners import one_line
from stores.errors import UserError
from stores.shards import write_json_atomic

RUNNERS = ("local", "prefect", "dask")  # local and prefect: threads (refocus flow says local)
NEVER_RETRIED = (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                 PermissionError, ValueError, TypeError, KeyError)
TRANSIENT = (OSError, TimeoutError, ConnectionError)


@dataclass(frozen=True)
class Orchestration:
    runner: str = "local"  # local or prefect: threads; dask: a Dask cluster
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # threads / Dask workers
    address: str | None = None  # an existing Dask scheduler
    retries: int = 3
    retry_delay: float = 2.0  # seconds before the first retry, doubled after each

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise UserError(f"unknown runner {self.runner!r}; choose one of {', '.join(RUNNERS)}")
        if self.workers < 1:
            raise UserError(f"workers must be at least 1, got {self.workers}")
        if self.address and self.runner != "dask":
            raise UserError("--address names a Dask scheduler; use it with --runner dask")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def task_runner(o: Orchestration) -> Any:
    if o.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if o.address:
            return DaskTaskRunner(address=o.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": o.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=o.workers)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: I/O and connection trouble, not bad input."""
    return isinstance(error, TRANSIENT) and not isinstance(error, NEVER_RETRIED)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed task only on a transient error."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, re-raised by the state
        return is_transient(error)
    return False


def retry_options(o: Orchestration) -> dict[str, Any]:
    from prefect.tasks import exponential_backoff

    delay: Any = exponential_backoff(o.retry_delay) if o.retry_delay > 0 else 0
    return {"retries": o.retries, "retry_delay_seconds": delay,
            "retry_condition_fn": retry_transient}


@dataclass
class FlowRecord:
    """What a flow run leaves under its data root; ``tasks`` and ``summary`` are filled in
    by the flow."""

    flow: str
    root: Path
    parameters: dict[str, Any]
    tasks: dict[str, str]
    summary: dict[str, Any]
    status: str = "running"


class _RunFormatter(logging.Formatter):
    """Time, level, which run (Prefect puts the run's name on the record) and the message."""

    def format(self, record: logging.LogRecord) -> str:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", "")
        stamp = self.formatTime(record)
        return f"{stamp} {record.levelname:<7} {run or record.name}: {record.getMessage()}"


@contextmanager
def flow_record(root: str | Path, flow: str, parameters: dict[str, Any]) -> Iterator[FlowRecord]:
    """Log to ``ROOT/logs/<flow>.log`` during the run; write ``ROOT/flow-runs/…json`` at the
    end, whether the flow finished or failed."""
    root = Path(root)
    (root / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(root / "logs" / f"{flow}.log", encoding="utf-8")
    handler.setFormatter(_RunFormatter())
    prefect_logger = logging.getLogger("prefect")
    prefect_logger.addHandler(handler)
    record = FlowRecord(flow, root, parameters, {}, {})
    started = time.time()
    try:
        yield record
        record.status = "completed"
        publish_run(flow, record.summary, record.status)  # the Prefect UI's view of the run
    except BaseException as e:
        record.status = f"failed: {one_line(e)}"
        raise
    finally:
        prefect_logger.removeHandler(handler)
        handler.close()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
        (root / "flow-runs").mkdir(exist_ok=True)
        write_json_atomic(root / "flow-runs" / f"{stamp}-{flow}.json", {
            "flow": flow, "flow_run_id": _flow_run_id(), "status": record.status,
            "started": started, "seconds": round(time.time() - started, 2),
            "parameters": json.loads(json.dumps(parameters, default=str)),
            "tasks": record.tasks, "summary": json.loads(json.dumps(record.summary,
                                                                    default=str)),
        })


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return str(run_id) if run_id else None


# ----------------------------------------------------------------------------- the server

STARTUP_TIMEOUT = "90"  # Prefect's temporary server takes 11–19 s to start on a small machine


def prepare_prefect(temporary_server: bool = True) -> None:
    """Before a command runs a flow: time for the temporary server to start and, when it is
    used (no ``PREFECT_API_URL``), a guard that stops it even after kill -9 of this process."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", STARTUP_TIMEOUT)
    if temporary_server:
        guard_temporary_server()


SERVER_STOP_WAIT = 5.0  # seconds between SIGTERM and SIGKILL of an orphaned server
GUARD_POLL = 0.2  # seconds between the guard's looks at the flow's process


def guard_temporary_server() -> int | None:
    """Start Prefect's temporary API server now (when no ``PREFECT_API_URL`` is set; Prefect
    would start it lazily) and a guard process that stops it once this process is gone, even
    after ``kill -9``. Returns the server's pid, or None when no temporary server is used."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's own clients use
    server.start()
    if server.server_process is None:
        return None
    pid = server.server_process.pid
    subprocess.Popen([sys.executable, "-m", "flows.runtime", str(pid), str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, close_fds=True)
    return pid


def _guard(server: int, parent: int) -> None:
    """Wait until ``parent`` (the flow's process) is gone, then stop ``server``; return at
    once when the server ends first. A pidfd names the server, so a recycled pid is never hit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the flow, not its guard
    try:
        handle = os.pidfd_open(server)
    except (AttributeError, OSError):  # not Linux ≥ 5.3, or the server is already gone
        return
    ended = select.poll()
    ended.register(handle, select.POLLIN)
    while os.getppid() == parent:
        if ended.poll(GUARD_POLL * 1000):
            return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            signal.pidfd_send_signal(handle, sig)
        except ProcessLookupError:
            return
        if ended.poll(SERVER_STOP_WAIT * 1000):
            return


if __name__ == "__main__":  # the guard: python -m flows.runtime SERVER_PID PARENT_PID
    _guard(int(sys.argv[1]), int(sys.argv[2]))
