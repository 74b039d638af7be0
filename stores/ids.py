"""Validation of ids that become file names and keys.

Video ids name WebDataset samples and Zarr rows, question ids name records in run
outputs; both must be safe to use as a path component and as a tar member prefix.
"""

from __future__ import annotations

MAX_ID_BYTES = 200


def id_problem(value: object, *, allow_dot: bool = True) -> str | None:
    """Return why ``value`` is not a usable id, or None when it is fine.

    Refused: non-strings, the empty string, ``/``, ``\\``, ``..``, NUL and other control
    characters, leading or trailing whitespace, and more than 200 bytes of UTF-8.
    ``allow_dot=False`` also refuses ``.``, which WebDataset reads as the start of a
    member's extension (video ids are shard keys).
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if "/" in value or "\\" in value:
        return "must not contain '/' or '\\' (ids become file names)"
    if ".." in value:
        return "must not contain '..' (ids become file names)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must not contain NUL or control characters"
    if value != value.strip():
        return "must not start or end with whitespace"
    if not allow_dot and "." in value:
        return "must not contain '.' (a video id is a WebDataset key, and '.' starts the extension)"
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def check_id(value: object, *, what: str = "id", allow_dot: bool = True) -> str:
    """Return ``value`` when it is a valid id; raise ValueError with a one-line reason."""
    problem = id_problem(value, allow_dot=allow_dot)
    if problem is not None:
        raise ValueError(f"{what} {value!r} {problem}")
    return value  # type: ignore[return-value]


def safe_component(value: str) -> str:
    """Turn an arbitrary string (a file stem, say) into a valid video id.

    Path separators become ``__``, dots and control characters ``_``; the result is cut
    to the byte limit. Used by importers that derive ids from file names.
    """
    out = value.replace("/", "__").replace("\\", "__")
    out = "".join("_" if (ord(c) < 32 or ord(c) == 127 or c == ".") else c for c in out).strip()
    out = out or "_"
    while len(out.encode("utf-8")) > MAX_ID_BYTES:
        out = out[:-1]
    return out
