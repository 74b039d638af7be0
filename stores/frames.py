"""Stored JPEG frames, decoded with a cap on their pixels.

Frames refocus writes are small (ingest scales them to ``--size``), but shards can come from
other tools or be damaged: a frame whose header says it is larger than
:data:`MAX_FRAME_PIXELS` is refused before its pixels are decoded (a "decompression bomb"
is a few kB of JPEG that decodes to gigabytes). The cap is checked here rather than by
changing PIL's process-wide ``Image.MAX_IMAGE_PIXELS``, so code that imports refocus keeps
its own setting.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from stores.errors import UserError

MAX_FRAME_PIXELS = 8192 * 8192  # 67 Mpx per frame: an 8K UHD frame (33 Mpx) fits


class FrameTooLarge(UserError):
    """A stored frame over :data:`MAX_FRAME_PIXELS` (callers that can skip one frame catch it;
    elsewhere it is one line at the command line)."""


def open_frame(data: bytes, where: str = "frame") -> Image.Image:
    """A stored frame, opened lazily (header read, pixels not decoded yet); over the cap,
    :class:`FrameTooLarge` naming ``where``."""
    with warnings.catch_warnings():  # PIL's own warning for large images: we refuse instead
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:  # past twice PIL's own limit
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise FrameTooLarge(_too_large(where, f"{found[1] if found else 'too many'} "
                                                  "pixels")) from None
    if image.width * image.height > MAX_FRAME_PIXELS:
        raise FrameTooLarge(_too_large(where, f"{image.width}×{image.height} pixels"))
    return image


def _too_large(where: str, size: str) -> str:
    return (f"{where}: {size}, over refocus's cap of {MAX_FRAME_PIXELS} pixels per frame "
            "(stores/frames.py MAX_FRAME_PIXELS); ingest the video again (ingest scales "
            "frames to --size)")


def decode_frame(data: bytes, where: str = "frame") -> Image.Image:
    """A stored frame as an RGB image (see :func:`open_frame` for the cap)."""
    with open_frame(data, where) as image:
        return image.convert("RGB")
