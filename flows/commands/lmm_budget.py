"""refocus lmm-budget: tokens and memory of reference video-LLMs at real size, from configs."""

from __future__ import annotations

import argparse
import json

from flows import console
from flows.options import EXIT_OK, add_command, positive_int
from pipelines import lmm_budget as lb  # numpy only at import; transformers when run

MODEL_KEYS = tuple(lb.MODELS)
TABLE_WIDTH = 160  # the table's columns stay readable when piped (rich defaults to 80)


def add_lmm_budget(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "lmm-budget", "tokens and GPU memory of reference video-LLMs at real size",
        "Build each reference model's real transformers class from its published config on\n"
        "the meta device (no weights, nothing downloaded) and count its parameters; run its\n"
        "real processor on blank frames to count the tokens a frame costs, as separate\n"
        "images and as one video; then, per subset of k frames: the prompt length, the K/V\n"
        "and activation bytes of one forward, the cached features of a 512-frame video, and\n"
        "how many subsets one forward can score on an 80 GB and a 141 GB GPU.\n\n"
        "examples:\n"
        "  refocus lmm-budget\n"
        "  refocus lmm-budget --markdown > budget.md\n"
        "  refocus lmm-budget --model qwen2.5-vl-7b --k 8 --k 64 --json",
    )
    p.add_argument("--model", action="append", choices=MODEL_KEYS, metavar="KEY",
                   help="a model to tabulate (repeatable; default: all of "
                        f"{', '.join(MODEL_KEYS)})")
    p.add_argument("--k", action="append", type=positive_int, metavar="N",
                   help="frames per subset (repeatable; default: "
                        f"{', '.join(map(str, lb.SUBSET_SIZES))})")
    p.add_argument("--height", type=positive_int, default=lb.FRAME_SIZE[0], metavar="PX",
                   help="frame height given to the processors")
    p.add_argument("--width", type=positive_int, default=lb.FRAME_SIZE[1], metavar="PX",
                   help="frame width given to the processors")
    p.add_argument("--candidates", type=positive_int, default=lb.CANDIDATES, metavar="N",
                   help="candidate frames of one video whose features the reward caches")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    out.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    keys = list(dict.fromkeys(args.model or MODEL_KEYS))
    ks = sorted(set(args.k or lb.SUBSET_SIZES))
    budgets = [lb.budget(lb.MODELS[key], (args.height, args.width), ks, args.candidates)
               for key in keys]
    if args.json:
        print(json.dumps(lb.as_json(budgets), indent=1))
    elif args.markdown:
        print(lb.markdown(budgets))
    else:
        _print_table(budgets, args)
    return EXIT_OK


def _print_table(budgets: list[lb.ModelBudget], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reference LMMs at real size: {args.height}×{args.width} px frames, "
                        f"bf16, {args.candidates}-frame cache")
    for i, name in enumerate(lb.TABLE_COLUMNS):
        table.add_column(name, justify="left" if i < 3 else "right")
    for row in lb.table_rows(budgets):
        table.add_row(*row)
    wide = console.out if console.out.is_terminal else Console(
        highlight=False, markup=False, emoji=False, width=TABLE_WIDTH)
    wide.print(table)
    for b in budgets:
        for note in b.notes:
            console.out.print(f"  {b.key}: {note}")
    console.out.print(f"  {lb.FORMULAS}")
