"""refocus export-policy: a trained policy as a Hugging Face Hub model (folder or upload)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows import console
from flows.options import EXIT_OK, EXIT_USAGE, add_command


def add_export_policy(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "export-policy", "a trained policy as a Hugging Face model (folder or Hub upload)",
        "Write a trained policy the way Hugging Face models are shared (huggingface_hub's\n"
        "PyTorchModelHubMixin): config.json (its shape, encoder identity, candidate-frame\n"
        "settings, budgets and reward model), model.safetensors and a model card README.md\n"
        "(encoder, candidate settings, the model that gave the rewards, training data, the\n"
        "cross-judged evaluation given with --eval, the training command). --out writes the\n"
        "folder; --push-to-hub uploads the same files to a Hub repo (needs the network and\n"
        "a token: hf auth login). Anyone then scores with it by its id:\n"
        "refocus score corpus.jsonl --policy ORG/NAME (HF_HUB_OFFLINE=1 uses the cache).\n\n"
        "examples:\n"
        "  refocus export-policy runs/policy --eval runs/eval --out exported/policy\n"
        "  refocus export-policy runs/policy --eval runs/eval --push-to-hub me/refocus-synth",
    )
    p.add_argument("policy", type=Path, metavar="RUN",
                   help="a refocus train --out folder (or a policy folder)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the model folder here")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                   help="upload to this Hugging Face model repo (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--eval", type=Path, metavar="DIR", default=None,
                   help="a refocus eval --out folder whose eval.md goes into the model card")
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from pipelines.hub import export_policy, push_policy

    if args.out is None and args.push_to_hub is None:
        console.error("give --out DIR, --push-to-hub ORG/NAME, or both")
        return EXIT_USAGE
    console.headline("export-policy", f" ← {args.policy}")
    if args.out is not None:
        folder = export_policy(args.policy, args.out, args.eval, args.push_to_hub)
        console.out.print(f"  folder     {folder} (config.json, model.safetensors, README.md)")
    if args.push_to_hub is not None:
        url = push_policy(args.policy, args.push_to_hub, args.eval, args.private or None)
        console.out.print(f"  pushed     {args.push_to_hub}: {url}")
    return EXIT_OK
