"""``--config FILE.yaml``: every command's options from a YAML file, and the resolved
configuration of a run written next to its outputs.

The file is a mapping from option names to values: the flag names (``max-frames`` or
``max_frames``, both accepted) and the positional arguments' names (``inputs``). Each value
goes through the same type and range check as the flag (a list for a repeatable option, or for
an option like ``--budgets 4,8,16``), and becomes that option's default in the parser, so a
flag given on the command line still wins. An unknown key or a value of the wrong type is a
one-line error naming the key and the file (exit 2).

After a command finishes (landed, or finished with failures), the final value of every option
is written as :data:`CONFIG_FILE` into its output folder when refocus owns that folder
(stores/owned.py), with the refocus version and the command: ``refocus COMMAND --config
FOLDER/resolved-config.yaml`` runs it again with the same settings.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from refocus import __version__
from stores.errors import UserError
from stores.owned import write_made

CONFIG_FILE = "resolved-config.yaml"  # in an output folder (a policy's config.json is its own)
COMMAND_KEY, VERSION_KEY = "command", "refocus-version"  # written, checked, never options
NOT_OPTIONS = {"help", "version", "config", "run"}  # parser actions that are not settings
OUTPUT_OPTIONS = ("out", "root")  # the options naming a command's output folder


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE.yaml`` on a command (one without subcommands of its own)."""
    parser.add_argument("--config", type=Path, metavar="FILE.yaml",
                        help="take options from this YAML file (keys: the option names, e.g. "
                             "'max-frames: 256'); options given here win; the output folder "
                             f"gets the resolved options as {CONFIG_FILE}")


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every runnable command (those without subcommands), depth first."""
    sub = _subcommands(parser)
    if sub is None:
        return [parser]
    found: list[argparse.ArgumentParser] = []
    for child in dict.fromkeys(sub.choices.values()):  # (aliases share a parser)
        found.extend(leaves(child))
    return found


def command_of(parser: argparse.ArgumentParser, argv: Sequence[str],
               ) -> tuple[argparse.ArgumentParser, str]:
    """The parser of the command ``argv`` runs, and its name ('flow preprocess')."""
    names: list[str] = []
    for token in argv:
        sub = _subcommands(parser)
        if sub is None:
            break
        if token in sub.choices:
            parser = sub.choices[token]
            names.append(token)
    return parser, " ".join(names)


def config_path(argv: Sequence[str]) -> Path | None:
    """The file after ``--config`` (or in ``--config=FILE``), if any, before a ``--``."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if token.startswith("--config="):
            return Path(token.split("=", 1)[1])
    return None


def read_config(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; an unreadable or malformed file is one line."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e.__class__.__name__}: "
                        f"{getattr(e, 'strerror', None) or e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: not valid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values, found a "
                        f"{type(data).__name__}")
    return data


def _key(name: str) -> str:
    return name.replace("-", "_")


def settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's options by every name a config key may use (dest and long flag)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in NOT_OPTIONS or isinstance(action, argparse._SubParsersAction):
            continue
        found[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                found[_key(flag[2:])] = action
    return found


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def _is_many(action: argparse.Action) -> bool:
    return (action.nargs in ("*", "+") or isinstance(action.nargs, int)
            or isinstance(action, argparse._AppendAction))


def _one(action: argparse.Action, value: Any, where: str) -> Any:
    """One value through the option's type and choices, as if typed on the command line."""
    if isinstance(value, (dict, list, bool)):
        shown = "true or false" if isinstance(value, bool) else f"a {type(value).__name__}"
        raise UserError(f"{where}: expected one value, got {shown}")
    text = value if isinstance(value, str) else str(value)
    try:
        result = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None
    if action.choices is not None and result not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UserError(f"{where}: {result!r} is not one of {choices}")
    return result


def convert(action: argparse.Action, value: Any, where: str) -> Any:
    """A config file's value for ``action``, checked as the command line checks it."""
    if _is_flag(action):
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if value is None:
        if action.default is not None:
            raise UserError(f"{where}: expected a value, got null")
        return None
    if _is_many(action):
        items = value if isinstance(value, list) else [value]
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise UserError(f"{where}: expected {action.nargs} values, got {len(items)}")
        if action.nargs == "+" and not items:
            raise UserError(f"{where}: expected at least one value")
        return [_one(action, item, where) for item in items]
    if isinstance(value, list):  # a comma-separated option, e.g. budgets: [4, 8, 16]
        if any(isinstance(v, (dict, list, bool)) for v in value):
            raise UserError(f"{where}: expected a list of numbers or names")
        value = ",".join(map(str, value)) + ("," if len(value) == 1 else "")
    return _one(action, value, where)


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Make the values of ``--config FILE`` (if ``argv`` names one) the defaults of the
    command's options, so that flags on the command line override them."""
    path = config_path(argv)
    if path is None:
        return
    leaf, command = command_of(parser, argv)
    values = read_config(path)
    actions = settings_actions(leaf)
    for key, value in values.items():
        name = _key(str(key))
        if name == _key(VERSION_KEY):
            continue
        if name == COMMAND_KEY:
            if str(value) != command:
                raise UserError(f"{path}: written for refocus {value}, not refocus {command}")
            continue
        action = actions.get(name)
        if action is None:
            raise UserError(f"{path}: unknown key {key!r} for refocus {command} (its options: "
                            f"refocus {command} --help)")
        action.default = convert(action, value, f"{path}: {key}")
        action.required = False  # given by the file
        if not action.option_strings and action.nargs == "+":
            action.nargs = "*"  # a positional the file gives may be left off the command line


def _plain(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolved(parser: argparse.ArgumentParser, command: str,
             args: argparse.Namespace) -> dict[str, Any]:
    """Every option's final value (keyed by its flag name), with the command and version."""
    values: dict[str, Any] = {COMMAND_KEY: command, VERSION_KEY: __version__}
    for action in dict.fromkeys(settings_actions(parser).values()):
        longs = [f[2:] for f in action.option_strings if f.startswith("--")]
        values[longs[0] if longs else action.dest] = _plain(getattr(args, action.dest, None))
    return values


def write_resolved(parser: argparse.ArgumentParser, argv: Sequence[str],
                   args: argparse.Namespace) -> Path | None:
    """Write the resolved configuration into the command's output folder, when it names one
    refocus owns; returns the file written, if any. Under torchrun only rank 0 writes (the
    other ranks write nothing into a run folder)."""
    import yaml

    if os.environ.get("RANK", "0") != "0":
        return None

    leaf, command = command_of(parser, argv)
    text = yaml.safe_dump(resolved(leaf, command, args), sort_keys=False, allow_unicode=True)
    for option in OUTPUT_OPTIONS:
        folder = getattr(args, option, None)
        if folder is not None and Path(folder).is_dir():
            return write_made(folder, CONFIG_FILE, text)
    return None
