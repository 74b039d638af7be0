"""refocus train-reader, refocus train and refocus eval: the learning stages."""

from __future__ import annotations

import argparse
from contextlib import nullcontext
from pathlib import Path

from flows import console
from flows.options import (
    EXIT_OK,
    add_command,
    default_of,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from stores.errors import UserError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 4,8,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers like 4,8,16, got {text!r}")
    return values


def _int(text: str) -> int:
    """Any integer; its range is checked with the settings (one line, exit 2)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, type=Path, metavar="DIR",
                   help="feature folder (refocus embed --out)")
    p.add_argument("--qa", nargs="*", metavar="MANIFEST",
                   help="manifests with the questions' splits, kinds and evidence (default: "
                        "the manifest that was ingested)")
    p.add_argument("--device", help="torch device (default: cuda when present)")


REWARD_HELP = ("reference model: reader:PATH (a refocus train-reader folder) or lmm:MODEL (a "
               "Hugging Face video-LLM: hub id or local folder, e.g. "
               "lmm:Qwen/Qwen2.5-VL-7B-Instruct)")
PRESENT_HELP = ("with lmm:, how the model is shown the frames: video (its native video input, "
                "with the frames' times) or images (each frame after a 'frame at t s' marker, a "
                "fallback); default: as the family's model card feeds video (see README)")


def _report_option(p: argparse.ArgumentParser) -> None:
    """--report-to: where the training metrics also stream (pipelines/reporting.py)."""
    from refocus.settings import REPORT_TO, RunSettings

    p.add_argument("--report-to", choices=REPORT_TO,
                   default=default_of(RunSettings, "report_to"),
                   help="also stream the training metrics to TensorBoard (event files in "
                        "OUT/tensorboard: tensorboard --logdir OUT) or Weights & Biases (needs "
                        "pip install wandb; WANDB_MODE=offline keeps it local); the metrics "
                        "rows stay the record")


def _reward_options(p: argparse.ArgumentParser, reward_help: str = REWARD_HELP,
                    required: bool = True) -> None:
    p.add_argument("--reward", required=required, metavar="SPEC", help=reward_help)
    lmm_options(p)


def lmm_options(p: argparse.ArgumentParser) -> None:
    """How a reference LMM is run (--reference-features, --reference-cache-gb, --present)."""
    from refocus.settings import REFERENCE_CACHE_GB

    p.add_argument("--reference-features", metavar="DIR",
                   help="with lmm:, the model's per-frame vision features from refocus "
                        "precompute-reference (default: computed from the frame shards)")
    p.add_argument("--reference-cache-gb", type=non_negative_float, default=REFERENCE_CACHE_GB,
                   metavar="GB", help="with lmm:, device memory for per-frame vision features "
                   "kept between subsets (least recently used ones are dropped and "
                   "recomputed or reread)")
    p.add_argument("--present", metavar="video|images", help=PRESENT_HELP)


# ----------------------------------------------------------------------------- train-reader

def add_train_reader(sub: argparse._SubParsersAction) -> None:
    from refocus.settings import ReaderTrainSettings

    d = ReaderTrainSettings()
    p = add_command(
        sub, "train-reader", "train the reader, the cheap reference model of the rewards",
        "Train the reader — a small network that answers the questions from a subset of a\n"
        "video's cached frame embeddings — on the corpus's train split, with random subsets\n"
        "of many sizes (half of them holding the evidence). Reports its accuracy on the\n"
        "validation split with all frames, the evidence only, and k random/uniform frames.\n"
        "With --distill lmm:MODEL it learns that LMM's option distributions and margins on\n"
        "stored frame subsets instead of the answers (refocus precompute-margins; computed\n"
        "into OUT/margins unless --margins is given) and reports its margin error against\n"
        "held-out LMM margins (the val split's) before and after.\n\n"
        "examples:\n"
        "  refocus train-reader --store data/features --out runs/reader\n"
        "  refocus train-reader --store data/features --out runs/reader-vlm \\\n"
        "      --distill lmm:Qwen/Qwen2.5-VL-7B-Instruct --architecture generic \\\n"
        "      --margins data/margins",
    )
    _store_options(p)
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="reader folder")
    p.add_argument("--steps", type=positive_int, default=d.steps)
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=non_negative_float, default=d.lr)
    p.add_argument("--seed", type=non_negative_int, default=d.seed)
    p.add_argument("--architecture", choices=("hand", "generic"), default=None,
                   help="hand: features pooled by hand for the synthetic question kinds; "
                        "generic: only frame features, their times and the text embeddings "
                        "(default: hand, generic with --distill)")
    g = p.add_argument_group("distillation")
    g.add_argument("--distill", metavar="lmm:MODEL",
                   help="learn this LMM's outputs on stored frame subsets, not the answers")
    g.add_argument("--margins", type=Path, metavar="DIR",
                   help="the LMM's stored margins (refocus precompute-margins --out; default: "
                        "computed into OUT/margins)")
    from flows.commands.margins import add_margin_options

    add_margin_options(g)
    _report_option(p)
    p.set_defaults(run=_run_train_reader)


def _run_train_reader(args: argparse.Namespace) -> int:
    from pipelines.learn import train_reader_stage
    from refocus.settings import ReaderTrainSettings

    settings = ReaderTrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed)
    if args.distill is None and args.margins is not None:
        raise UserError("--margins: only with --distill lmm:MODEL")
    with console.progress_bar("train-reader", "steps") as bar:
        task = bar.add_task("train-reader", total=settings.steps, detail="")

        def log(row: dict) -> None:
            bar.update(task, completed=row["step"], detail=f"loss {row['loss']:.3f}")

        if args.distill:
            from flows.commands.margins import distill_from_args

            report = distill_from_args(args, settings, log)
        else:
            report = train_reader_stage(args.store, args.qa, args.out, settings, args.device,
                                        log, args.architecture or "hand", args.report_to)
    out = console.out
    console.headline("train-reader", f" → {args.out} ({report['train_seconds']} s)")
    out.print(f"  {report['split']} accuracy over {report['questions']} questions:")
    for key, value in report.items():
        if isinstance(value, float) and key != "train_seconds":
            out.print(f"    {key:<12} {100 * value:5.1f} %")
    if "margin_error" in report:
        e = report["margin_error"]
        out.print(f"  against {report['distilled_from']} on {e['subsets']} held-out subsets "
                  f"({e['held_out']}):")
        for when in ("before", "after"):
            m = e[when]
            out.print(f"    {when:<7} margin error {m['margin_mae']:.3f}, same answer "
                      f"{100 * m['agreement']:.1f} %")
    return EXIT_OK


# ----------------------------------------------------------------------------- train

def add_train(sub: argparse._SubParsersAction) -> None:
    from refocus.settings import FILTER_STATISTICS, GRPOSettings, RunSettings

    d = GRPOSettings()
    p = add_command(
        sub, "train", "train the frame-selection policy by GRPO",
        "Train the frame-selection policy over cached features by group policy optimisation:\n"
        "N subsets sampled per question, rewards from the reference (tanh of its answer\n"
        "margin), advantages within each group, an entropy bonus, a curriculum over the\n"
        "budget. Re-running the same command resumes from the last checkpoint.\n\n"
        "examples:\n"
        "  refocus train --store data/features --reward reader:runs/reader --out runs/policy\n"
        "  refocus train --store data/features --reward reader:runs/reader --out runs/p2 \\\n"
        "      --budgets 4,8,16,32 --group 16 --steps 2000 --filter 0.2\n"
        "  refocus precompute-reference --model Qwen/Qwen2.5-VL-7B-Instruct \\\n"
        "      --shards data/shards --out data/reference\n"
        "  refocus train --store data/features --reward lmm:Qwen/Qwen2.5-VL-7B-Instruct \\\n"
        "      --reference-features data/reference --out runs/p-lmm\n"
        "  refocus train --store data/features --reward lmm:Qwen/Qwen2.5-VL-7B-Instruct \\\n"
        "      --surrogate reader:runs/reader-distilled --lmm-every 4 --out runs/p-online",
    )
    _store_options(p)
    _reward_options(p)
    p.add_argument("--reference-batch", type=positive_int,
                   default=default_of(RunSettings, "reference_batch"), metavar="B",
                   help="(question, subset) pairs per LMM forward; halves itself on GPU "
                        "out-of-memory")
    p.add_argument("--surrogate", metavar="SPEC",
                   help="a cheap reference (e.g. reader:PATH, a reader distilled on the reward "
                        "model's margins) that scores the steps the reward model does not; "
                        "subsets the reward model has scored keep its value (needs --lmm-every)")
    p.add_argument("--lmm-every", type=_int, default=None, metavar="N",
                   help="with --surrogate: the reward model scores every N-th step (filling "
                        "its cache), the surrogate the others; validation (best step) is "
                        "judged by the reward model, and every call is counted in "
                        "metrics.jsonl and summary.json (reward_calls)")
    p.add_argument("--out", required=True, type=Path, metavar="RUN", help="run folder")
    p.add_argument("--steps", type=positive_int, default=d.steps)
    p.add_argument("--group", type=positive_int, default=d.group,
                   help="subsets sampled per question (N, at least 2)")
    p.add_argument("--questions-per-step", type=positive_int, default=d.questions_per_step,
                   metavar="Q")
    p.add_argument("--budgets", type=_ints, default=d.budgets, metavar="K,K,...",
                   help="curriculum of frame budgets, equal shares of the steps")
    p.add_argument("--lr", type=non_negative_float, default=d.lr)
    p.add_argument("--entropy", type=non_negative_float, default=d.entropy_coef, metavar="BETA",
                   help="entropy bonus coefficient")
    p.add_argument("--temperature", type=non_negative_float, default=d.temperature,
                   help="sampling temperature (above 0)")
    p.add_argument("--filter", type=non_negative_float, default=None, metavar="VAR",
                   help="the paper's data filter: keep the training questions whose "
                        "--filter-statistic, scored on frames spread inside each of 4 equal "
                        "temporal windows, has a variance across the windows above VAR (the "
                        "paper uses 0.2: on the margin a standard deviation of about 0.45 "
                        "logits); default: keep all")
    p.add_argument("--filter-statistic", choices=FILTER_STATISTICS, default=d.filter_statistic,
                   help="what the filter compares across windows: margin (the reference's "
                        "correct-option logit minus the best other one, the paper's) or reward "
                        "(tanh(margin / 2), bounded by 1, so a threshold means far more)")
    p.add_argument("--val-split", default=default_of(RunSettings, "val_split"), metavar="SPLIT",
                   help="the split whose questions choose the best checkpoint; training stops "
                        "when it has none, unless you pass --val-split train to choose on "
                        "training questions")
    p.add_argument("--eval-every", type=positive_int, default=default_of(RunSettings, "eval_every"),
                   metavar="STEPS")
    p.add_argument("--checkpoint-every", type=positive_int,
                   default=default_of(RunSettings, "checkpoint_every"), metavar="STEPS")
    p.add_argument("--curriculum", choices=("cumulative", "stages"), default=d.curriculum,
                   help="cumulative: each step draws k from the stages reached so far; stages: "
                        "only the current stage's k (the paper)")
    p.add_argument("--hidden", type=positive_int, default=default_of(RunSettings, "hidden"),
                   help="policy width")
    p.add_argument("--seed", type=non_negative_int, default=d.seed)
    _objective_options(p.add_argument_group("objective"), d)
    _report_option(p)
    p.set_defaults(run=_run_train)


def _objective_options(g: argparse._ArgumentGroup, d) -> None:  # noqa: ANN001
    """The GRPO loss: averaging, advantages, updates per rollout (GRPOSettings)."""
    from refocus.settings import LOSS_NORMS, SCALE_REWARDS

    g.add_argument("--loss-norm", choices=LOSS_NORMS, default=d.loss_norm,
                   help="how the per-pick terms (policy gradient, entropy, KL) are averaged: "
                        "pick, over every real pick of the batch (DAPO; the gradient does not "
                        "grow with k); sequence, per subset then over subsets (GRPO); "
                        "constant, summed per subset and divided by the largest budget "
                        "(Dr. GRPO)")
    g.add_argument("--scale-rewards", choices=SCALE_REWARDS, default=d.scale_rewards,
                   help="group: advantages are the rewards centred in their group and divided "
                        "by its std (at least --std-floor); none: centred only (Dr. GRPO)")
    g.add_argument("--std-floor", type=float, default=d.std_floor, metavar="STD",
                   help="the group's reward std is clamped below at STD (rewards are "
                        "tanh(margin/2), in -1..1), so rewards that differ by rounding do "
                        "not become unit advantages; a group below it counts as flat "
                        "(metrics: zero_variance)")
    g.add_argument("--drop-zero-variance", action="store_true",
                   help="leave the flat groups (reward std below --std-floor) out of the "
                        "loss's mean instead of counting them with advantage ~0")
    g.add_argument("--updates-per-rollout", type=_int, default=d.updates_per_rollout,
                   metavar="N", help="optimizer steps per rollout; above 1 each later step "
                   "uses the ratio to the rollout policy with PPO clipping (metrics: "
                   "clip_fraction, approx_kl), so each reward call is used N times")
    g.add_argument("--clip-eps", type=float, default=d.clip_eps, metavar="EPS",
                   help="PPO clip range: the ratio counts within 1 +- EPS (with "
                        "--updates-per-rollout above 1)")
    g.add_argument("--kl-coef", type=non_negative_float, default=d.kl_coef, metavar="COEF",
                   help="weight of a KL penalty (k3 estimator) to the initial policy, kept "
                        "frozen in the checkpoint (metrics: kl_to_initial); 0 (the default): "
                        "none")


def _run_train(args: argparse.Namespace) -> int:
    from pipelines.learn import RunSettings, train_policy_stage
    from refocus.settings import GRPOSettings
    from refocus.trainer import DistEnv
    from stores.runs import CURVES, LAST

    if (args.lmm_every is None) != (args.surrogate is None):
        given, missing = ("--lmm-every", "--surrogate SPEC") if args.surrogate is None else (
            "--surrogate", "--lmm-every N")
        raise UserError(f"train: {given} needs {missing} (the surrogate scores the steps "
                        "the reward model does not, every N-th step is the reward model's)")
    try:
        settings = GRPOSettings(
            steps=args.steps, questions_per_step=args.questions_per_step, group=args.group,
            budgets=args.budgets, curriculum=args.curriculum, lr=args.lr,
            entropy_coef=args.entropy, temperature=args.temperature, seed=args.seed,
            filter_threshold=args.filter, filter_statistic=args.filter_statistic,
            lmm_every=args.lmm_every if args.lmm_every is not None else 1,
            loss_norm=args.loss_norm, scale_rewards=args.scale_rewards,
            std_floor=args.std_floor, drop_zero_variance=args.drop_zero_variance,
            updates_per_rollout=args.updates_per_rollout, clip_eps=args.clip_eps,
            kl_coef=args.kl_coef)
    except ValueError as e:  # a setting out of range: one line, as for any bad input
        raise UserError(f"train: {e}") from None
    run = RunSettings(eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                      hidden=args.hidden, device=args.device,
                      reference_features=args.reference_features,
                      reference_batch=args.reference_batch,
                      reference_cache_gb=args.reference_cache_gb, val_split=args.val_split,
                      present=args.present, surrogate=args.surrogate,
                      report_to=args.report_to)
    env = DistEnv.from_environ()
    if settings.questions_per_step % env.world_size:
        raise UserError(f"--questions-per-step {settings.questions_per_step} must divide evenly "
                        f"by the {env.world_size} torchrun processes (each takes an equal share)")
    main = env.is_main  # under torchrun, rank 0 alone shows and tells
    with console.progress_bar("train", "steps") if main else nullcontext() as bar:
        task = bar.add_task("train", total=settings.steps, detail="") if bar else None

        def on_start(total: int, done: int) -> None:
            bar.update(task, total=total, completed=done)

        def on_step(m) -> None:  # noqa: ANN001
            bar.update(task, completed=m.step,
                       detail=f"k={m.budget} reward {m.reward:+.3f} entropy {m.entropy:.2f}")

        summary = train_policy_stage(args.store, args.qa, args.reward, args.out, settings, run,
                                     on_start=on_start if bar else None,
                                     on_step=on_step if bar else None)
    if not main:
        return EXIT_OK
    out = console.out
    best = summary["best"]
    console.headline("train", f" → {args.out} ({summary['steps']} steps, "
                     f"{summary['seconds_this_call']} s)")
    if summary["filter"]:
        f = summary["filter"]
        out.print(f"  data filter kept {f['after']} of {f['before']} questions "
                  f"({f.get('statistic', 'reward')} variance across windows, mean "
                  f"{f['mean_variance']:.3g})")
    validation = ", ".join(f"{k} {100 * v:.1f} %" for k, v in best["validation"].items())
    out.print(f"  best validation at step {best['step']}: {validation}")
    calls = summary.get("reward_calls") or {}
    if calls:
        surrogate = (f"; surrogate {calls['train']['surrogate_subsets']} subsets"
                     if "surrogate" in summary else "")
        out.print(f"  reward model asked {calls['reward_subsets']} subsets in "
                  f"{calls['reward_forwards']} forwards (validation included){surrogate}")
    out.print(f"  policy {args.out} (the best; the last: {Path(args.out) / LAST}), curves "
              f"{Path(args.out) / CURVES}")
    return EXIT_OK


# ----------------------------------------------------------------------------- eval

JUDGE_HELP = ("a judge of the accuracy (repeat for several): ideal (the ideal observer, no "
              "model: right exactly when the frames hit every evidence span, else a uniform "
              "guess), reader:PATH or lmm:MODEL as for --reward")


def _seeds(text: str) -> tuple[int, ...]:
    """``N``: seeds 0 … N−1; ``S,S,...`` (a comma: ``3,`` is seed 3 alone): those seeds."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or seeds like 0,1,2, got {text!r}") \
            from None
    if "," not in text:
        values = tuple(range(values[0])) if values and values[0] >= 1 else ()
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected a count N ≥ 1 or distinct seeds ≥ 0 like 0,1,2, got {text!r}")
    return values


def add_eval(sub: argparse._SubParsersAction) -> None:
    from refocus.settings import EVAL_RESAMPLES, EVAL_SEEDS, LMM_CEILING_FRAMES, REFERENCE_BATCH

    p = add_command(
        sub, "eval", "compare frame selectors: accuracy per judge and evidence recall",
        "Select k frames per question with each method — uniform, random, CLIP top-k, BOLT,\n"
        "AKS-like and learned policies — and report each judge's accuracy from those\n"
        "frames and the evidence recall, per budget and question kind. Tables and plots\n"
        "name the model that gave each policy its rewards and mark self-judged cells.\n"
        "Each accuracy carries its 95 % bootstrap interval over the questions, random is\n"
        "averaged over --seeds (with its spread), and each judge's all-frames ceiling is\n"
        "a row of its own.\n\n"
        "examples:\n"
        "  refocus eval --store data/features --split test --k 4,8,16 \\\n"
        "      --judge reader:runs/reader --judge ideal --policy runs/policy --out runs/eval\n"
        "  refocus eval --store data/features --judge lmm:Qwen/Qwen2.5-VL-7B-Instruct \\\n"
        "      --judge ideal --policy runs/policy-reader runs/policy-lmm --out runs/eval2",
    )
    _store_options(p)
    p.add_argument("--split", default="test")
    p.add_argument("--k", type=_ints, default=(4, 8, 16), metavar="K,K,...")
    p.add_argument("--judge", action="append", default=[], metavar="SPEC", help=JUDGE_HELP)
    p.add_argument("--reference-batch", type=positive_int, default=REFERENCE_BATCH, metavar="B",
                   help="with an lmm: judge, (question, subset) pairs per forward")
    _reward_options(p, "a judge, as one --judge (kept for earlier commands)", required=False)
    p.add_argument("--policy", nargs="*", default=[], metavar="RUN",
                   help="learned policies (run folders or policy folders)")
    p.add_argument("--methods", nargs="*", default=None, metavar="NAME",
                   help="baselines (default: uniform random clip-top-k bolt aks)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write eval.md, eval.csv and eval.png here")
    p.add_argument("--seeds", type=_seeds, default=",".join(map(str, EVAL_SEEDS)) + ",",
                   metavar="N|S,S,...",
                   help="run stochastic selectors (random) under N seeds (0 … N-1) or these "
                   "seeds (3, is seed 3 alone): mean and spread across them")
    p.add_argument("--resamples", type=non_negative_int, default=EVAL_RESAMPLES, metavar="R",
                   help="bootstrap resamples of the questions per accuracy cell for its 95 %% "
                   "interval (0: no intervals)")
    p.add_argument("--ceiling-frames", type=non_negative_int, default=LMM_CEILING_FRAMES,
                   metavar="M", help="the most frames (spread uniformly) an lmm: judge is "
                   "shown for its all-frames ceiling (0: no ceiling for it; the other judges "
                   "see every frame)")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from pipelines.learn import evaluate_stage, markdown_table
    from refocus.evaluation import Statistics
    from refocus.selectors import BASELINES

    methods = args.methods if args.methods is not None else list(BASELINES)
    statistics = Statistics(resamples=args.resamples, seeds=args.seeds,
                            ceiling_frames=args.ceiling_frames)
    table = evaluate_stage(args.store, args.qa, args.split, args.k, args.reward, args.policy,
                           methods, args.out, args.device, args.reference_features,
                           args.reference_cache_gb, args.present, judges=args.judge,
                           reference_batch=args.reference_batch, statistics=statistics)
    console.out.print(markdown_table([r for r in table if r.category == "all"], args.split,
                                     {"statistics": statistics.as_dict()}))
    if args.out:
        console.out.print(f"per question kind: {args.out / 'eval.md'}; also eval.csv, eval.json "
                          "(judges' full identities), eval.png")
    return EXIT_OK
