"""Loading weight files without tracebacks: a damaged or unsafe file is one line.

refocus writes weights as safetensors only. A truncated or garbled safetensors file, and a
pickle (``.bin``/``.pt``) that holds anything besides plain tensors, are refused with a
:class:`UserError` naming the file; pickles are only ever read with
``torch.load(weights_only=True)`` (by open_clip), never through unrestricted pickle.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from stores.errors import UserError

# What the loaders raise on a damaged file (safetensors) or a refused pickle (torch.load
# with weights_only=True raises UnpicklingError; a truncated zip or pickle the others).
DAMAGED_WEIGHTS = (SafetensorError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError)

CONVERT_HINT = ("refocus reads safetensors, and pickles holding plain tensors only; convert "
                "it with safetensors.torch.save_file, or re-create it")


def weights_problem(path: str | os.PathLike[str], error: BaseException) -> str:
    """One line for a weights file that ``error`` says cannot be loaded."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        found = (re.search(r"GLOBAL \S+ was not an allowed global", text)
                 or re.search(r"Unsupported operand \d+", text))
        reason = found.group(0) if found else "not a pickle of plain tensors"
        what = (f"refused as a pickle ({reason}; refocus loads pickles with "
                "weights_only, as loading anything else could run code)")
    else:
        first = (text.strip().splitlines() or [""])[0][:160]
        what = f"damaged or not a weights file ({type(error).__name__}: {first})"
    return f"{path}: {what}; {CONVERT_HINT}"


def load_safetensors(path: str | os.PathLike[str], remedy: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged one is one line ending with ``remedy``."""
    try:
        return load_file(Path(path))
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"{path}: damaged safetensors file ({first}); {remedy}") from None
