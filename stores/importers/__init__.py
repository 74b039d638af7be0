"""Readers that turn what users have (video folders, manifests, public annotation files)
into a validated :class:`stores.manifest.Manifest`.

Every importer builds plain rows and passes them through ``build_manifest``, so all
sources get the same checks and the same ``file:line: field: message`` issues.
"""

from __future__ import annotations

from pathlib import Path

from stores.errors import UserError
from stores.importers.folder import (
    VIDEO_EXTENSIONS,
    import_folder,
    import_video_files,
    import_video_url,
)
from stores.importers.longvideobench import import_longvideobench
from stores.importers.mlvu import import_mlvu
from stores.importers.nextqa import import_nextgqa, import_nextqa
from stores.importers.videomme import import_videomme
from stores.manifest import Manifest, merge, read_manifest
from stores.urls import NetworkSettings, is_url, url_problem

__all__ = [
    "VIDEO_EXTENSIONS", "import_folder", "import_video_files", "import_video_url", "import_nextqa",
    "import_nextgqa", "import_videomme", "import_longvideobench", "import_mlvu", "from_inputs",
]


def from_inputs(inputs: list[str], network: NetworkSettings | None = None) -> Manifest:
    """Resolve command-line inputs — video files or URLs, folders, ``.jsonl`` manifests —
    into one manifest. Unknown kinds of input, and URLs that ``network`` does not allow
    (``stores.urls``), fail at once with a message naming them; a manifest's rows with such
    URLs are its issues. An existing local file or folder is never taken for a URL."""
    network = network or NetworkSettings()
    parts: list[Manifest] = []
    loose: list[Path] = []
    for item in inputs:
        p = Path(item)
        if is_url(item) and not p.exists():
            problem = url_problem(item, network)
            if problem is not None:
                raise UserError(f"{item}: {problem}")
            parts.append(import_video_url(item))
        elif p.is_dir():
            parts.append(import_folder(p))
        elif p.suffix.lower() == ".jsonl":
            parts.append(read_manifest(p, network))
        elif p.suffix.lower() in VIDEO_EXTENSIONS:
            loose.append(p)  # a missing file still becomes a row: it fails at decode, recorded
        elif not p.exists():
            raise UserError(f"{item}: no such file or folder")
        else:
            raise UserError(
                f"{item}: not a video ({', '.join(sorted(VIDEO_EXTENSIONS))}), folder or .jsonl "
                "manifest; convert annotation files with 'refocus import'"
            )
    if loose:
        parts.append(import_video_files(loose))
    return merge(parts)
