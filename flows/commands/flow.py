"""refocus flow …: the stages as Prefect flows (mapped over shards, local or on Dask), and
refocus serve: the preprocessing flow as a scheduled deployment."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flows import console
from flows.commands.features import add_batch_size
from flows.commands.ingest import add_candidate_options, add_shard_size
from flows.options import (
    EXIT_FAILURES,
    EXIT_OK,
    add_command,
    add_network_options,
    default_of,
    network_settings,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from flows.runtime import Orchestration, prepare_prefect
from pipelines.settings import EXPORTS, SYNTH_ENCODER, ScoreSettings
from stores.errors import UserError
from stores.urls import is_url


def _runner_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the tasks run")
    g.add_argument("--runner", choices=("local", "dask"), default="local",
                   help="local: a thread pool in this process; dask: a Dask cluster")
    g.add_argument("--workers", type=positive_int, default=default_of(Orchestration, "workers"),
                   metavar="N",
                   help="threads (local) or Dask worker processes (a new local cluster)")
    g.add_argument("--address", metavar="TCP", default=None,
                   help="an existing Dask scheduler (tcp://host:8786) instead of a new local "
                        "cluster; its workers must see the same files")
    g.add_argument("--retries", type=non_negative_int, default=default_of(Orchestration, "retries"),
                   help="retries of a task that failed for a transient reason (I/O, network)")
    g.add_argument("--retry-delay", type=non_negative_float,
                   default=default_of(Orchestration, "retry_delay"), metavar="S",
                   help="seconds before the first retry, doubled after each")


def _preprocess_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="video files, folders of videos, or .jsonl manifests")
    p.add_argument("--root", required=True, type=Path, metavar="DIR",
                   help="data root: ROOT/shards, ROOT/features, ROOT/logs, ROOT/flow-runs")
    add_candidate_options(p)
    add_shard_size(p, "videos per shard (a shard is one task)")
    p.add_argument("--model", default=SYNTH_ENCODER, metavar="NAME",
                   help="open_clip encoder (see refocus embed --help)")
    p.add_argument("--pretrained", default=None, metavar="TAG|FILE", help="its weights")
    add_batch_size(p)
    p.add_argument("--no-index", action="store_true", help="do not build the FAISS index")
    add_network_options(p)


def add_flow(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "flow", "run a stage as a Prefect flow (tasks mapped over shards, local or Dask)",
        "Run the stages as Prefect flows: every shard is a task, retried with backoff when it\n"
        "fails for a transient reason, skipped when its done marker exists. Runs locally by\n"
        "default (Prefect's temporary API, nothing to start; set PREFECT_API_URL to report\n"
        "to a running 'prefect server' and see the runs in its UI). Logs and run records go\n"
        "under the data root (logs/, flow-runs/).\n\n"
        "examples:\n"
        "  refocus flow preprocess videos/ --root data/                 # ingest → embed\n"
        "  refocus flow preprocess corpus.jsonl --root data/ --runner dask --workers 8\n"
        "  refocus flow preprocess corpus.jsonl --root data/ --runner dask \\\n"
        "      --address tcp://scheduler:8786                            # a Dask cluster\n"
        "  refocus flow train --store data/features --out runs/          # reader → policy\n"
        "  refocus flow evaluate --store data/features --reward reader:runs/reader \\\n"
        "      --policy runs/policy --out runs/eval\n"
        "  refocus flow score new.jsonl --policy runs/policy --k 32 --out scored/",
    )
    flows = p.add_subparsers(dest="flow", required=True, metavar="FLOW")

    pre = add_command(flows, "preprocess", "ingest → embed (+ index) under one data root",
                      "Videos → ROOT/shards → ROOT/features, each shard a task.")
    _preprocess_options(pre)
    _runner_options(pre)
    pre.set_defaults(run=_run_preprocess)

    sc = add_command(flows, "score", "refocus score as a flow (ingest and embed mapped)",
                     "The same outputs as refocus score, with ingest and embed mapped over "
                     "shards on the chosen runner.")
    sc.add_argument("inputs", nargs="+", metavar="INPUT", help="manifests with questions "
                                                                "(+ videos, folders)")
    sc.add_argument("--policy", required=True, type=Path, metavar="RUN")
    sc.add_argument("--k", type=positive_int, default=None,
                    help="frames per question (default: the policy's largest trained budget)")
    sc.add_argument("--out", required=True, type=Path, metavar="DIR")
    sc.add_argument("--export", choices=EXPORTS, default=default_of(ScoreSettings, "export"))
    sc.add_argument("--device", default=None)
    add_network_options(sc)
    _runner_options(sc)
    sc.set_defaults(run=_run_score)

    tr = add_command(flows, "train", "train the reader (if needed) and the policy",
                     "From cached features: the reader reference into OUT/reader (when\n"
                     "--reward is 'reader'), then the GRPO policy into OUT/policy. Both resume.")
    tr.add_argument("--store", required=True, type=Path, metavar="DIR")
    tr.add_argument("--out", required=True, type=Path, metavar="DIR")
    tr.add_argument("--reward", default="reader", metavar="SPEC",
                    help="reader (train one), reader:PATH or lmm:MODEL")
    tr.add_argument("--steps", type=positive_int, default=None, help="GRPO steps")
    tr.add_argument("--retries", type=non_negative_int, default=1)
    tr.set_defaults(run=_run_train)

    ev = add_command(flows, "evaluate", "the policies against the baselines",
                     "refocus eval as a flow.")
    ev.add_argument("--store", required=True, type=Path, metavar="DIR")
    ev.add_argument("--reward", metavar="SPEC", help="a judge, as one --judge")
    ev.add_argument("--judge", action="append", default=[], metavar="SPEC",
                    help="a judge of the accuracy (repeat for several): ideal, reader:PATH or "
                         "lmm:MODEL")
    ev.add_argument("--policy", nargs="*", default=[], metavar="RUN")
    ev.add_argument("--out", required=True, type=Path, metavar="DIR")
    ev.add_argument("--split", default="test")
    ev.set_defaults(run=_run_evaluate)

    pr = add_command(flows, "precompute-reference", "the reference LMM's vision features",
                     "refocus precompute-reference as a flow (one GPU task; resumes by shard).")
    pr.add_argument("--shards", required=True, type=Path, metavar="DIR")
    pr.add_argument("--out", required=True, type=Path, metavar="DIR")
    pr.add_argument("--model", required=True, metavar="MODEL")
    pr.add_argument("--device", default=None)
    pr.set_defaults(run=_run_precompute)


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "serve", "schedule the preprocessing flow (needs a running prefect server)",
        "Register the preprocessing flow (ingest → embed) as a Prefect deployment with a\n"
        "cron schedule, then serve it: this process waits for scheduled runs and runs them.\n"
        "Schedules live in a Prefect server, so start one and point refocus at it first:\n\n"
        "  prefect server start                       # UI at http://127.0.0.1:4200\n"
        "  export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
        "  refocus serve videos/ --root data/ --cron '0 2 * * *'\n\n"
        "The UI then lists the deployment, its upcoming runs, and each run's tasks (one per\n"
        "shard) with their states. --register-only stores the deployment and exits.",
    )
    _preprocess_options(p)
    _runner_options(p)
    p.add_argument("--cron", required=True, metavar="EXPR",
                   help="when to run, a cron expression ('0 2 * * *': daily at 02:00)")
    p.add_argument("--timezone", default="UTC", metavar="TZ", help="of the cron schedule")
    p.add_argument("--name", default="preprocess", help="deployment name")
    p.add_argument("--register-only", action="store_true",
                   help="store the deployment and its schedule, then exit")
    p.set_defaults(run=_run_serve)


# ----------------------------------------------------------------------------- running

def _orchestration(args: argparse.Namespace) -> Any:
    from flows.runtime import Orchestration

    return Orchestration(args.runner, args.workers, args.address, args.retries,
                         args.retry_delay)


def _preprocess_parameters(args: argparse.Namespace) -> dict[str, Any]:
    return {"inputs": [i if is_url(i) and not Path(i).exists() else str(Path(i).resolve())
                       for i in args.inputs],
            "root": str(args.root.resolve()), "fps": args.fps, "max_frames": args.max_frames,
            "size": args.size, "shard_size": args.shard_size, "model": args.model,
            "pretrained": args.pretrained, "batch_size": args.batch_size,
            "index": not args.no_index, "retries": args.retries,
            "network": network_settings(args).as_dict()}


def _run_preprocess(args: argparse.Namespace) -> int:
    prepare_prefect()
    from flows.orchestrate import preprocess_flow
    from flows.runners import with_runner

    summary = with_runner(preprocess_flow, _orchestration(args))(**_preprocess_parameters(args))
    return _report({"ingest": summary["ingest"]["failures"],
                    "embed": summary["embed"]["failures"]}, args.root)


def _report(failures: dict[str, list], root: Path) -> int:
    from pipelines.ingest import Failure

    total = sum(len(v) for v in failures.values())
    console.headline("flow", f" done → {root} (logs: {root / 'logs'}, records: "
                     f"{root / 'flow-runs'})")
    for stage, items in failures.items():
        if items:
            console.alert(f"{stage}: {len(items)} failures")
            console.list_failures([str(Failure(**f)) if isinstance(f, dict) else f
                                   for f in items])
    return EXIT_FAILURES if total else EXIT_OK


def _run_score(args: argparse.Namespace) -> int:
    prepare_prefect()
    from flows.commands.score import print_score_summary
    from flows.orchestrate import score_flow
    from flows.runners import with_runner
    from pipelines.score import ScoreSettings

    o = _orchestration(args)
    settings = ScoreSettings(k=args.k, export=args.export, device=args.device,
                             network=network_settings(args))
    summary = with_runner(score_flow, o)([str(i) for i in args.inputs], str(args.policy),
                                         str(args.out), settings, orchestration=o)
    print_score_summary(summary)
    return EXIT_FAILURES if summary["failures"] else EXIT_OK


def _run_train(args: argparse.Namespace) -> int:
    prepare_prefect()
    from dataclasses import replace

    from flows.orchestrate import train_flow
    from refocus.settings import GRPOSettings

    grpo = GRPOSettings()
    if args.steps:
        grpo = replace(grpo, steps=args.steps)
    summary = train_flow(str(args.store), str(args.out), args.reward, grpo,
                         retries=args.retries)
    best = summary["policy"]["best"]
    console.headline("train", f" done → {args.out}: best validation at step "
                     f"{best['step']} (score {best['score']:.3f})")
    return EXIT_OK


def _run_evaluate(args: argparse.Namespace) -> int:
    prepare_prefect()
    from flows.orchestrate import evaluate_flow

    if not args.reward and not args.judge:
        raise UserError("flow evaluate: name a judge (--judge ideal, --judge reader:PATH, "
                        "--judge lmm:MODEL)")
    rows = evaluate_flow(str(args.store), args.reward, [str(p) for p in args.policy],
                         str(args.out), args.split, judges=args.judge)
    console.headline("evaluate", f" done → {args.out / 'eval.md'} ({len(rows)} rows)")
    return EXIT_OK


def _run_precompute(args: argparse.Namespace) -> int:
    prepare_prefect()
    from flows.orchestrate import precompute_flow

    summary = precompute_flow(str(args.shards), str(args.out), args.model, args.device)
    console.headline("precompute-reference", f" done → {args.out}: "
                     f"{summary['shards_written']} shards written")
    return EXIT_OK


def deployment(args: argparse.Namespace) -> Any:
    """The preprocessing flow as a deployment with the command's parameters and schedule."""
    from prefect.client.schemas.schedules import CronSchedule

    from flows.orchestrate import preprocess_flow
    from flows.runners import with_runner

    return with_runner(preprocess_flow, _orchestration(args)).to_deployment(
        name=args.name, parameters=_preprocess_parameters(args),
        schedule=CronSchedule(cron=args.cron, timezone=args.timezone), tags=["refocus"],
        description=f"refocus preprocess of {', '.join(args.inputs)} into {args.root}")


def _run_serve(args: argparse.Namespace) -> int:
    prepare_prefect(temporary_server=False)  # serve needs a running server
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL

    try:
        CronSchedule(cron=args.cron, timezone=args.timezone)
    except ValueError as e:
        raise UserError(f"--cron {args.cron!r} --timezone {args.timezone}: not a valid "
                        f"schedule ({str(e).splitlines()[0]}); e.g. '0 2 * * *'") from None

    if not PREFECT_API_URL.value():
        raise UserError("schedules need a running Prefect server: run 'prefect server start' "
                        "and set PREFECT_API_URL=http://127.0.0.1:4200/api, then run this again")
    d = deployment(args)
    deployment_id = d.apply()
    console.headline("serve", f" deployment refocus-preprocess/{args.name} "
                     f"({deployment_id}) runs on '{args.cron}' ({args.timezone})")
    if args.register_only:
        return EXIT_OK
    from prefect import serve

    console.out.print("  serving: waiting for scheduled runs (Ctrl-C stops)")
    serve(d)
    return EXIT_OK
