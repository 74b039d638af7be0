"""Contact sheets: a grid of frames read back from the shards, captioned, saved as PNG."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from stores.frames import decode_frame
from stores.index import Hit
from stores.shards import ShardSet


def contact_sheet(hits: list[Hit], shards_dir: str | os.PathLike[str],
                  out: str | os.PathLike[str], title: str = "", thumb: int = 256,
                  columns: int = 5) -> Path:
    """Write the hits' frames as a grid (rank, video id, time, score under each)."""
    shard_set = ShardSet(shards_dir)
    lookup = shard_set.lookup()
    font = ImageFont.load_default(size=14)
    caption, header = 40, 32 if title else 0
    columns = max(1, min(columns, len(hits) or 1))
    rows = max(1, -(-len(hits) // columns))
    sheet = Image.new("RGB", (columns * thumb, header + rows * (thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 8), title, fill="black", font=font)
    cache: dict[str, list[bytes]] = {}
    for rank, hit in enumerate(hits):
        if hit.video_id not in cache:
            cache[hit.video_id] = shard_set.read(hit.video_id, lookup[hit.video_id]).frames
        image = decode_frame(cache[hit.video_id][hit.frame], f"{hit.video_id} frame {hit.frame}")
        image.thumbnail((thumb, thumb))
        x = (rank % columns) * thumb
        y = header + (rank // columns) * (thumb + caption)
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        draw.text((x + 4, y + thumb + 2), f"#{rank + 1} {hit.video_id}", fill="black", font=font)
        draw.text((x + 4, y + thumb + 20), f"{hit.time:.2f} s   score {hit.score:.3f}",
                  fill="dimgray", font=font)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
