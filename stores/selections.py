"""Frame selections: what ``refocus score`` hands to a downstream video-LLM.

One row per question, written twice with the same content: ``selections.jsonl`` (a line per
question) and ``selections.parquet`` (list columns). Fields:

* ``qid``, ``video_id``, ``question``, ``options`` — the question as scored;
* ``k`` — the budget asked for (a video with fewer candidates gives fewer frames);
* ``frame_indices`` — the chosen candidates' positions in the video's shard sample
  (``<video_id>.<index:06d>.jpg``), in time order;
* ``timestamps`` — their times in seconds in the source video, ascending (decode these
  again at full resolution if the shard JPEGs are too small);
* ``probabilities`` — the policy's probability of each pick at the step it was chosen,
  aligned with ``frame_indices``;
* ``source`` — the video file it came from.

``selections.json`` beside them records the policy, the budget and the folders the frames
can be read from (``shards``), so a reader needs nothing else.

Exported frames (``refocus score --export``) are filed under each question's export key
(:func:`export_keys`): its qid, or for a qid holding a ``.`` (which WebDataset reads as the
start of an extension) the qid made safe plus a short hash of it (``q.1`` → ``q_1-…``), so
two questions never share a folder or a sample key.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stores import ids
from stores.errors import UserError
from stores.shards import write_json_atomic

JSONL_FILE = "selections.jsonl"
PARQUET_FILE = "selections.parquet"
META_FILE = "selections.json"


@dataclass(frozen=True)
class FrameSelection:
    qid: str
    video_id: str
    question: str
    options: list[str]
    k: int
    frame_indices: list[int]
    timestamps: list[float]
    probabilities: list[float]
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.frame_indices)
        if len(self.timestamps) != n or len(self.probabilities) != n:
            raise ValueError(f"{self.qid}: frame_indices, timestamps and probabilities must "
                             "have the same length")
        if any(b < a for a, b in zip(self.timestamps, self.timestamps[1:], strict=False)):
            raise ValueError(f"{self.qid}: timestamps must be in time order")


def export_keys(rows: list[FrameSelection]) -> dict[str, str]:
    """qid → the folder name and WebDataset key of its exported frames, one per question;
    two qids that would share one are refused, naming both."""
    try:
        return ids.export_keys(r.qid for r in rows)
    except ValueError as e:
        raise UserError(f"cannot export frames: question {e}") from None


@dataclass(frozen=True)
class SelectionsMeta:
    policy: str
    k: int
    shards: str
    features: str
    extra: dict[str, Any] = field(default_factory=dict)


def write_selections(out: str | os.PathLike[str], rows: list[FrameSelection],
                     meta: SelectionsMeta) -> dict[str, Path]:
    """Write the JSONL, Parquet and meta files (each atomically); returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    dicts = [asdict(r) for r in rows]
    jsonl = folder / JSONL_FILE
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for d in dicts:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    os.replace(tmp, jsonl)
    schema = pa.schema([
        ("qid", pa.string()), ("video_id", pa.string()), ("question", pa.string()),
        ("options", pa.list_(pa.string())), ("k", pa.int32()),
        ("frame_indices", pa.list_(pa.int32())), ("timestamps", pa.list_(pa.float64())),
        ("probabilities", pa.list_(pa.float64())), ("source", pa.string()),
    ])
    table = pa.Table.from_pylist(dicts, schema=schema)
    parquet = folder / PARQUET_FILE
    tmp = parquet.with_name(parquet.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, parquet)
    write_json_atomic(folder / META_FILE, {**asdict(meta), "questions": len(rows)})
    return {"jsonl": jsonl, "parquet": parquet, "meta": folder / META_FILE}


def read_selections(path: str | os.PathLike[str]) -> list[FrameSelection]:
    """Rows from a selections folder, or from its .jsonl or .parquet file."""
    p = Path(path)
    if p.is_dir():
        p = p / JSONL_FILE if (p / JSONL_FILE).exists() else p / PARQUET_FILE
    if not p.exists():
        raise UserError(f"{path}: no selections ({JSONL_FILE} or {PARQUET_FILE}); "
                        "write them with refocus score")
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        dicts = pq.read_table(p).to_pylist()
    else:
        with open(p, encoding="utf-8") as f:
            dicts = [json.loads(line) for line in f if line.strip()]
    return [FrameSelection(**d) for d in dicts]


def read_meta(folder: str | os.PathLike[str]) -> SelectionsMeta:
    path = Path(folder) / META_FILE
    if not path.exists():
        raise UserError(f"{folder}: no {META_FILE}; is this a refocus score output folder?")
    data = json.loads(path.read_text(encoding="utf-8"))
    data.pop("questions", None)
    return SelectionsMeta(**data)
