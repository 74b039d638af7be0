"""lmms-eval's own CLI with the ``refocus`` model plugin, on a tiny generated video task.

Needs an environment with lmms-eval and refocus installed (refocus with ``pip install -e .``,
so that lmms-eval finds the ``lmms_eval.models`` entry point)::

    python -m venv --system-site-packages /work/scratch-lmms   # + a .pth to refocus's venv
    /work/scratch-lmms/bin/pip install --no-deps lmms-eval && pip install -e . --no-deps
    /work/scratch-lmms/bin/python benchmarks/lmms_eval_plugin.py

What it does, all in a temporary folder:

1. two small H.264 videos whose frame i is grey level 4*i, ingested with every frame kept,
   and ``selections.jsonl`` for three questions (known frame positions);
2. a throw-away lmms-eval plugin package (the legacy ``LMMS_EVAL_PLUGINS`` mechanism) holding
   a tiny task ``refocus_tiny`` (a local JSON dataset; its own ``doc_to_visual`` gives the
   video's path, as the stock video tasks do) and a ``frame_probe`` model that answers with
   what it was given: the frame positions (read back from the grey levels), the request
   metadata's ``task_type``, ``sample_frames`` and ``timestamps``;
3. ``lmms-eval --model refocus --model_args model=frame_probe,...`` for ``frames_as=video``,
   ``frames_as=images`` and ``frames=uniform``, each scored by the task against the answer
   expected from the selections (accuracy 1.0 = every question got exactly its frames);
   ``model=dummy`` (lmms-eval's own dummy model) to show an unmodified model runs; and a task
   with one unscored question, which must exit non-zero with one line naming it.

Prints one line per run and exits 1 if any check fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import av
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.decode import DecodeSettings  # noqa: E402
from pipelines.ingest import IngestSettings, ingest  # noqa: E402
from stores.manifest import build_manifest  # noqa: E402
from stores.selections import FrameSelection, SelectionsMeta, write_selections  # noqa: E402
from stores.shards import ShardSet  # noqa: E402

VIDEOS = {"vidA": 16, "vidB": 12}
QUESTIONS = [("q1", "vidA", "What is first?", [1, 6, 11]),
             ("q2", "vidA", "What is last?", [3, 15]),
             ("q3", "vidB", "What happens?", [0, 4, 9])]
FPS = 10

MODEL = '''
import numpy as np
from lmms_eval.api.model import lmms


def frame_positions(images):
    return [int(round(np.asarray(i.convert("RGB"))[-4:, -4:, 1].mean() / 4)) for i in images]


class FrameProbe(lmms):
    """Answers with the frames it was given and the request metadata about them."""

    def __init__(self, **kwargs):
        super().__init__()

    def generate_until(self, requests):
        out = []
        for request in requests:
            ctx, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            meta = request.metadata
            times = ",".join(f"{t:.2f}" for t in meta.get("timestamps", []))
            out.append(f"frames={frame_positions(visuals)};as={meta.get('task_type', 'images')};"
                       f"n={meta.get('sample_frames', '-')};t={times}")
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    def generate_until_multi_round(self, requests):
        raise NotImplementedError
'''

TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video_path"]]  # what the stock video tasks do: the model would sample it


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["expected"])}
'''

TASK_YAML = '''
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
task: {name}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: expected
generation_kwargs:
  max_new_tokens: 8
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
'''


def make_video(path: Path, frames: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        stream.options = {"crf": "10"}
        for i in range(frames):
            image = np.full((32, 48, 3), 4 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def scored(root: Path) -> tuple[Path, dict[str, list[float]]]:
    """Shards of the videos and a selections folder; each video's frame times."""
    rows = [(vid, {"id": vid, "path": str(make_video(root / f"{vid}.mp4", n))})
            for vid, n in VIDEOS.items()]
    settings = IngestSettings(decode=DecodeSettings(fps=None, max_frames=None, size=None),
                              shard_size=1, workers=1)
    summary = ingest(build_manifest(rows), root / "shards", settings)
    assert summary.failed == 0, summary
    shards = ShardSet(root / "shards")
    times = {vid: [float(t) for t in shards.read(vid).meta["timestamps"]] for vid in VIDEOS}
    selections = [FrameSelection(qid=q, video_id=v, question=text, options=[], k=3,
                                 frame_indices=picks, timestamps=[times[v][i] for i in picks],
                                 probabilities=[1.0] * len(picks))
                  for q, v, text, picks in QUESTIONS]
    write_selections(root / "scored", selections,
                     SelectionsMeta(policy="bench", k=3, shards=str(root / "shards"), features=""))
    return root / "scored", times


def expected(picks: list[int], times: list[float], as_video: bool) -> str:
    stamps = ",".join(f"{times[i]:.2f}" for i in picks) if as_video else ""
    kind, n = ("video", len(picks)) if as_video else ("images", "-")
    return f"frames={picks};as={kind};n={n};t={stamps}"


def linspace(n: int, k: int) -> list[int]:
    return np.linspace(0, n - 1, k, dtype=int).tolist()  # lmms-eval's uniform sampling


def write_plugin(root: Path, times: dict[str, list[float]]) -> None:
    """Package ``probe_plugin``: models.frame_probe.FrameProbe and tasks/ (three tasks)."""
    package = root / "probe_plugin"
    (package / "models").mkdir(parents=True)
    (package / "tasks").mkdir()
    (package / "__init__.py").write_text("")
    (package / "models" / "__init__.py").write_text(
        'AVAILABLE_MODELS = {"frame_probe": "FrameProbe"}\n')
    (package / "models" / "frame_probe.py").write_text(textwrap.dedent(MODEL))
    (package / "tasks" / "utils.py").write_text(textwrap.dedent(TASK_UTILS))
    variants = {"video": ("selected", True), "images": ("selected", False),
                "uniform": ("uniform", True)}
    for name, (frames, as_video) in variants.items():
        docs = []
        for qid, vid, text, picks in QUESTIONS:
            if frames == "uniform":
                picks = linspace(VIDEOS[vid], len(picks))
            docs.append({"question_id": qid, "videoID": vid, "question": text,
                         "video_path": str(root / f"{vid}.mp4"),
                         "expected": expected(picks, times[vid], as_video)})
        write_task(package / "tasks", f"refocus_tiny_{name}", docs)
    unscored = {"question_id": "q404", "videoID": "vidB", "question": "Not scored?",
                "video_path": str(root / "vidB.mp4"), "expected": "-"}
    write_task(package / "tasks", "refocus_tiny_missing", [docs[0], unscored])


def write_task(folder: Path, name: str, docs: list[dict]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(data=data, name=name))


def lmms_eval(root: Path, task: str, model_args: str, label: str = ""
              ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMMS_EVAL_PLUGINS": "probe_plugin",
           "PYTHONPATH": os.pathsep.join([str(root), str(ROOT)]), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf")}
    cli = Path(sys.executable).with_name("lmms-eval")
    return subprocess.run([str(cli), "--model", "refocus", "--model_args", model_args,
                           "--tasks", task, "--batch_size", "1",
                           "--include_path", str(root / "probe_plugin" / "tasks"),
                           "--output_path", str(root / "out" / (label or task))],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)


def accuracy(root: Path, task: str, label: str = "") -> float | None:
    found = sorted((root / "out" / (label or task)).rglob("*results*.json"))
    if not found:
        return None
    results = json.loads(found[-1].read_text())["results"][task]
    return next(v for k, v in results.items() if k.startswith("exact,"))


def main() -> int:
    failures = 0
    with tempfile.TemporaryDirectory(prefix="lmms-plugin-") as tmp:
        root = Path(tmp)
        selections, times = scored(root)
        write_plugin(root, times)
        base = f"selections={selections}"
        runs = [("refocus_tiny_video", f"model=frame_probe,{base},frames_as=video"),
                ("refocus_tiny_images", f"model=frame_probe,{base},frames_as=images"),
                ("refocus_tiny_uniform", f"model=frame_probe,{base},frames=uniform")]
        for task, args in runs:
            result = lmms_eval(root, task, args)
            score = accuracy(root, task)
            ok = result.returncode == 0 and score == 1.0
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {task}: exit {result.returncode}, "
                  f"exact match {score} (1.0 = every question got exactly its frames)")
            if not ok:
                print(result.stderr[-3000:])
        result = lmms_eval(root, "refocus_tiny_video", f"model=dummy,{base}", "dummy")
        ok = result.returncode == 0 and accuracy(root, "refocus_tiny_video", "dummy") == 0.0
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} lmms-eval's dummy model wrapped: exit "
              f"{result.returncode}")
        result = lmms_eval(root, "refocus_tiny_missing", f"model=frame_probe,{base}")
        lines = [ln for ln in result.stderr.splitlines() if ln.startswith("refocus:")]
        ok = result.returncode != 0 and len(lines) == 1 and "q404" in lines[0] \
            and accuracy(root, "refocus_tiny_missing") is None
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} unscored question: exit {result.returncode}, "
              f"stderr: {lines[0] if lines else result.stderr[-2000:]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
