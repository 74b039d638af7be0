"""Does the bundled VLM's vision tower see what the questions ask? A check of what limits
``refocus-synth-vlm``: on the frames of a ``refocus train-vlm`` folder (its corpus and its
cached tower features, ``vision.safetensors``), every candidate frame inside an event's span
is labelled with that event's name (colour × shape, 16 classes), and

* **zero-shot**: the class token through the tower's own post-layernorm and projection,
  matched to the bundled encoder's text embeddings of "a red circle", … (what the encoder
  reads, with no training);
* **linear probe**: a linear classifier on the standardised class tokens (and on the mean of
  the patch tokens), fitted on three quarters of the videos, scored on the rest.

High numbers here with a low VLM accuracy say the language model, not the tower, is what
limits it. Run from the repository root after ``refocus train-vlm --out DIR``::

    python benchmarks/vlm_tower_probe.py DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines.encoder import SYNTH_ENCODER, load_encoder
from pipelines.synth import COLOURS, SHAPES
from pipelines.vlm import clip_tower, frames_in
from stores.manifest import read_manifest


def labelled_frames(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """[frames, tokens, width] tower features of every event frame, their class, the names;
    videos in manifest order, so a split by position is a split by video."""
    data = load_file(folder / "vision.safetensors")
    ids = json.loads(data.pop("__ids__").numpy().tobytes().decode())
    index = {v: i for i, v in enumerate(ids)}
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    features, labels = [], []
    for video in read_manifest(folder / "corpus" / "manifest.jsonl").videos:
        if video.id not in index:
            continue
        i = index[video.id]
        for event in (video.meta or {}).get("events", []):
            for frame in frames_in(data[f"t{i}"].tolist(), *event["span"]):
                features.append(data[f"f{i}"][frame].float())
                labels.append(names.index(f"{event['colour']} {event['shape']}"))
    return torch.stack(features), torch.tensor(labels), names


def probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a linear classifier fitted on the first three quarters."""
    cut = len(y) * 3 // 4
    mean, std = x[:cut].mean(0), x[:cut].std(0) + 1e-3
    z = (x - mean) / std
    torch.manual_seed(0)
    layer = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(z[:cut]), y[:cut]).backward()
        optimizer.step()
    with torch.no_grad():
        return float((layer(z[cut:]).argmax(1) == y[cut:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a refocus train-vlm --out folder")
    args = parser.parse_args()
    features, labels, names = labelled_frames(args.folder)
    encoder = load_encoder(SYNTH_ENCODER, device="cpu")
    tower = clip_tower(encoder)
    text = torch.as_tensor(encoder.encode_texts([f"a {n}" for n in names]))
    with torch.no_grad():
        pooled = tower.vision_model.post_layernorm(features[:, 0])
        image = torch.nn.functional.normalize(tower.visual_projection(pooled), dim=-1)
    zero_shot = float(((image @ text.T).argmax(1) == labels).float().mean())
    results = {"event_frames": len(labels), "classes": len(names),
               "zero_shot_class_token": round(zero_shot, 4),
               "probe_class_token": round(probe(features[:, 0], labels, len(names)), 4),
               "probe_patch_mean": round(probe(features[:, 1:].mean(1), labels, len(names)), 4)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
