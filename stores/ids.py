"""Validation of ids that become file names and keys, and the ids refocus derives.

Video ids name WebDataset samples and Zarr rows, question ids name records in run
outputs and export folders; both must be safe to use as a path component and as a tar
member prefix. Shards are written with PAX headers (``stores/shards.py``), so any id this
module accepts (up to :data:`MAX_ID_BYTES` bytes of UTF-8) can be written: the tar format
sets no lower limit.

Ids refocus derives itself (from file names and dataset paths, ``safe_component``; export
keys from question ids, ``export_key``) are deterministic, shorter than that limit, and keep
two different originals apart: a shortened or rewritten id carries a short hash of its
original.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence

MAX_ID_BYTES = 200
# Derived ids stay well under MAX_ID_BYTES: an importer makes question ids from video ids
# (MLVU: ``<video id>_<task>_<index>``), and these must still be valid.
DERIVED_ID_BYTES = 120
HASH_CHARS = 10


def id_problem(value: object, *, allow_dot: bool = True) -> str | None:
    """Return why ``value`` is not a usable id, or None when it is fine.

    Refused: non-strings, the empty string, ``.``, ``/``, ``\\``, ``..``, NUL and other
    control characters, text that is not valid Unicode (lone surrogates, which a JSON
    ``\\ud800`` escape can make), leading or trailing whitespace, and more than 200 bytes of
    UTF-8. ``allow_dot=False`` also refuses any ``.``, which WebDataset reads as the start of
    a member's extension (video ids are shard keys).
    """
    if not isinstance(value, str):
        return f"must be a string, got {type(value).__name__}"
    if not value:
        return "must not be empty"
    if "/" in value or "\\" in value:
        return "must not contain '/' or '\\' (ids become file names)"
    if ".." in value:
        return "must not contain '..' (ids become file names)"
    if value == ".":
        return "must not be '.' (ids become file names)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "must not contain NUL or control characters"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "must be valid Unicode text (it holds a lone surrogate such as \\ud800)"
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


def short_hash(value: str) -> str:
    """A short, stable digest of ``value`` (hex), to tell apart ids that look alike."""
    data = value.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:HASH_CHARS]


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, at a character boundary."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def _sanitise(value: str) -> str:
    out = value.replace("/", "__").replace("\\", "__")
    out = "".join(
        "_" if (ord(c) < 32 or ord(c) == 127 or c == "." or 0xD800 <= ord(c) <= 0xDFFF) else c
        for c in out
    ).strip()
    return out or "_"


def safe_component(value: str, limit: int = DERIVED_ID_BYTES) -> str:
    """Turn an arbitrary string (a file stem, a nested path) into a valid video id.

    Path separators become ``__``, dots, control characters and lone surrogates ``_``. A
    result longer than ``limit`` bytes is cut and gets ``-`` and a short hash of the whole
    of ``value``, so two long names that share a beginning stay apart and the same name
    always gives the same id. Used by importers that derive ids from file names; different
    names that only differ in what is replaced (``a.b``, ``a_b``) give the same id, which
    the importers report."""
    out = _sanitise(value)
    if len(out.encode("utf-8")) > limit:
        out = _cut(out, limit - HASH_CHARS - 1).rstrip() + "-" + short_hash(value)
    return out


def unique_ids(wanted: Sequence[str], reserved: Collection[str] = ()) -> list[str]:
    """One id per item of ``wanted``, all different and none in ``reserved``.

    An item gets the id it wants when that id is not reserved and no earlier item wants it;
    each other item gets ``<wanted>-2``, ``-3``, ... (the smallest number whose id is not
    reserved, not wanted by any item and not given yet), so a suffix never takes the id
    another item wants. Without clashes every item keeps its id."""
    taken = set(reserved)
    out: list[str | None] = []
    for want in wanted:
        out.append(None if want in taken else want)
        taken.add(want)  # wanted by an item: never another's suffix
    result: list[str] = []
    for want, got in zip(wanted, out, strict=True):
        n = 2
        while got is None:
            candidate = f"{want}-{n}"
            if candidate not in taken:
                got = candidate
                taken.add(candidate)
            n += 1
        result.append(got)
    return result


def stable_ids(stored: Mapping[str, str], items: Sequence[tuple[str, str]]) -> list[str]:
    """The ids of ``items`` (``(id, place)`` pairs, a place being a resolved path or a URL)
    joining a corpus that already holds ``stored`` (id → place), so that a stored id never
    changes its place and a place keeps its stored id.

    An item whose id is stored for its own place keeps it; an item whose place is stored
    under other ids takes the first of those no other item keeps (importers that number
    clashing file names may have numbered it differently this time); every other item is
    new and gets ``unique_ids`` of its id with all stored ids reserved, so it never takes
    the id of a stored video, even one gone from the inputs."""
    final: list[str | None] = [vid if stored.get(vid) == place else None
                               for vid, place in items]
    claimed = {vid for vid in final if vid is not None}
    by_place: dict[str, list[str]] = {}
    for vid, place in stored.items():
        by_place.setdefault(place, []).append(vid)
    for i, (_, place) in enumerate(items):
        if final[i] is None:
            free = [vid for vid in by_place.get(place, ()) if vid not in claimed]
            if free:
                final[i] = free[0]
                claimed.add(free[0])
    new = [i for i, vid in enumerate(final) if vid is None]
    for i, vid in zip(new, unique_ids([items[i][0] for i in new], stored), strict=True):
        final[i] = vid
    return [vid for vid in final if vid is not None]


def export_key(value: str) -> str:
    """A WebDataset key and folder name for the id ``value`` (a question id): ``value``
    itself when it is a valid dot-free id, else ``safe_component(value)`` with ``-`` and a
    short hash of ``value`` (``q.1`` → ``q_1-…``), so ids that only differ in such characters
    get different keys."""
    if id_problem(value, allow_dot=False) is None:
        return value
    base = safe_component(value, MAX_ID_BYTES - HASH_CHARS - 1)
    return f"{base}-{short_hash(value)}"


def export_keys(values: Iterable[str]) -> dict[str, str]:
    """``export_key`` of each distinct value; raises ValueError naming two values whose keys
    are the same (only an id chosen to look like another's key can do that)."""
    keys: dict[str, str] = {}
    owner: dict[str, str] = {}
    for value in values:
        if value in keys:
            continue
        key = export_key(value)
        if key in owner:
            raise ValueError(f"ids {owner[key]!r} and {value!r} both export as {key!r}; "
                             "rename one of them")
        keys[value] = key
        owner[key] = value
    return keys
