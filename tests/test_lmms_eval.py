"""The lmms-eval hooks hand a model exactly the frames refocus selected (no lmms-eval needed).

Real shards (two small H.264 videos ingested with every frame kept), selections written with
stores.selections, and the frames checked against an independent decode of the shard tars.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, make_video
from PIL import Image

from pipelines import lmms_eval as hooks
from pipelines.decode import DecodeSettings
from pipelines.ingest import IngestSettings, ingest
from stores.errors import UserError
from stores.manifest import build_manifest
from stores.selections import FrameSelection, SelectionsMeta, write_selections
from stores.shards import ShardSet

EXAMPLE = REPO / "pipelines" / "lmms_tasks"
VIDEOS = {"fFjv93ACGo8": 14, "-ab_XY12cd3": 10}  # YouTube-style ids, frames per video
PICKS = {  # qid → (video, question, frame positions in the shard sample)
    "001-1": ("fFjv93ACGo8", "What colour is the corner?", [1, 6, 11]),
    "001-2": ("fFjv93ACGo8", "How bright is the end?", [0, 13]),
    "002-1": ("-ab_XY12cd3", "What happens first?", [2, 3, 8]),
}
OPTIONS = ["A. red", "B. green", "C. blue", "D. grey"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    """An ingest folder (one shard per video) and a selections folder beside it."""
    root = tmp_path_factory.mktemp("lmms")
    rows = []
    for vid, frames in VIDEOS.items():
        path = make_video(root / f"{vid}.mp4", frames, fps=10, size=(48, 32))
        rows.append((vid, {"id": vid, "path": str(path)}))
    manifest = build_manifest(rows)
    assert not manifest.issues
    settings = IngestSettings(decode=DecodeSettings(fps=None, max_frames=None, size=None),
                              shard_size=1, workers=1)
    summary = ingest(manifest, root / "shards", settings)
    assert summary.failed == 0 and summary.shards == 2
    shard_set = ShardSet(root / "shards")
    selections = []
    for qid, (vid, question, picks) in PICKS.items():
        times = shard_set.read(vid).meta["timestamps"]
        selections.append(FrameSelection(
            qid=qid, video_id=vid, question=question, options=[o[3:] for o in OPTIONS],
            k=3, frame_indices=picks, timestamps=[times[i] for i in picks],
            probabilities=[0.5] * len(picks), source=str(root / f"{vid}.mp4")))
    write_selections(root / "scored", selections,
                     SelectionsMeta(policy="test", k=3, shards=str(root / "shards"), features=""))
    return root / "scored"


def tar_frames(shards: Path, video_id: str, picks: list[int]) -> list[np.ndarray]:
    """The JPEGs <video_id>.<index>.jpg, found by scanning the shard tars with tarfile."""
    found: dict[int, np.ndarray] = {}
    for shard in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                stem, _, ext = member.name.partition(".")
                if stem == video_id and ext.endswith(".jpg"):
                    index = int(ext.split(".")[0])
                    data = tar.extractfile(member).read()
                    found[index] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return [found[i] for i in picks]


def assert_same_frames(images: list[Image.Image], expected: list[np.ndarray]) -> None:
    assert len(images) == len(expected)
    for image, want in zip(images, expected, strict=True):
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), want)


def load_utils():
    """pipelines/lmms_tasks/utils.py, loaded the way lmms-eval resolves `!function utils.x`
    (spec_from_file_location on the file beside the YAML, a fresh module each time)."""
    spec = importlib.util.spec_from_file_location("utils", EXAMPLE / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def env(scored, monkeypatch):
    monkeypatch.setenv(hooks.SELECTIONS_ENV, str(scored))
    monkeypatch.delenv(hooks.SHARDS_ENV, raising=False)
    hooks._READERS.clear()
    yield scored
    hooks._READERS.clear()


def test_frames_by_qid_are_the_selected_jpegs_in_time_order(scored):
    reader = hooks.SelectedFrames(scored)
    shards = scored.parent / "shards"
    for qid, (vid, _, picks) in PICKS.items():
        got = reader.frames(qid)
        assert (got.qid, got.video_id, got.frame_indices) == (qid, vid, picks)
        assert_same_frames(got.images, tar_frames(shards, vid, picks))
        times = ShardSet(shards).read(vid).meta["timestamps"]
        assert got.timestamps == [times[i] for i in picks]
        assert got.timestamps == sorted(got.timestamps) and len(set(got.timestamps)) == len(picks)
    # the frames differ (grey level 4*i), so a wrong index could not pass unnoticed
    first = reader.frames("001-1").images
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))


def test_hook_from_env_returns_the_frames_for_a_videomme_doc(env):
    utils = load_utils()
    doc = {"question_id": "001-1", "videoID": "fFjv93ACGo8", "video_id": "001",
           "question": "What colour is the corner?", "options": OPTIONS, "answer": "A"}
    images = utils.videomme_refocus_doc_to_visual(doc)
    assert_same_frames(images, tar_frames(env.parent / "shards", "fFjv93ACGo8", [1, 6, 11]))
    times = utils.videomme_refocus_doc_to_timestamps(doc)
    assert len(times) == 3 and times == sorted(times)
    # a second load of utils.py (lmms-eval loads it once per !function) shares the reader
    assert len(load_utils().videomme_refocus_doc_to_visual(doc)) == 3
    assert len(hooks._READERS) == 1


def test_fallback_by_video_and_question_when_the_doc_id_is_unknown(env):
    utils = load_utils()
    doc = {"question_id": "lmms-7", "videoID": "-ab_XY12cd3",
           "question": "  what HAPPENS\nfirst? ", "options": OPTIONS}
    assert_same_frames(utils.videomme_refocus_doc_to_visual(doc),
                       tar_frames(env.parent / "shards", "-ab_XY12cd3", [2, 3, 8]))
    # MLVU-style: no question id, a file name for the video, options inside the question
    mlvu = {"video_name": "fFjv93ACGo8.mp4",
            "question": "How bright is the end?\n(A) dark\n(B) bright", "candidates": ["x", "y"]}
    assert_same_frames(utils.mlvu_refocus_doc_to_visual(mlvu),
                       tar_frames(env.parent / "shards", "fFjv93ACGo8", [0, 13]))
    # LongVideoBench-style: the id field is "id"
    lvb = {"id": "002-1", "video_id": "-ab_XY12cd3", "question": "?"}
    assert len(utils.longvideobench_refocus_doc_to_visual(lvb)) == 3


def test_uniform_baseline_gives_as_many_evenly_spaced_frames(env):
    utils = load_utils()
    doc = {"question_id": "001-1", "videoID": "fFjv93ACGo8", "question": "?"}
    images = utils.videomme_uniform_doc_to_visual(doc)
    spaced = np.linspace(0, VIDEOS["fFjv93ACGo8"] - 1, 3, dtype=int).tolist()  # lmms-eval's way
    assert spaced == [0, 6, 13]
    assert_same_frames(images, tar_frames(env.parent / "shards", "fFjv93ACGo8", spaced))
    got = hooks.reader_for().images(hooks.reader_for().selection("001-1"), uniform=True)
    times = ShardSet(env.parent / "shards").read("fFjv93ACGo8").meta["timestamps"]
    assert got.frame_indices == spaced and got.timestamps == [times[i] for i in spaced]
    assert hooks.linspace_indices(5, 9) == [0, 1, 2, 3, 4] and hooks.linspace_indices(5, 1) == [0]


def test_several_matching_questions_are_told_apart_by_options(scored, tmp_path):
    rows = [FrameSelection(qid=q, video_id="fFjv93ACGo8", question="Same question?",
                           options=opts, k=1, frame_indices=[i], timestamps=[0.1 * i],
                           probabilities=[1.0])
            for q, opts, i in (("a", ["red", "blue"], 2), ("b", ["cat", "dog"], 4))]
    write_selections(tmp_path / "s", rows, SelectionsMeta(
        policy="t", k=1, shards=str(scored.parent / "shards"), features=""))
    reader = hooks.SelectedFrames(tmp_path / "s")
    doc = {"videoID": "fFjv93ACGo8", "question": "Same question?", "options": ["A. cat", "B. dog"]}
    assert reader.for_doc(doc).qid == "b"
    with pytest.raises(UserError, match="several selections"):
        reader.for_doc({"videoID": "fFjv93ACGo8", "question": "Same question?"})


def test_unknown_question_is_a_one_line_error_naming_it_and_the_folder(env):
    utils = load_utils()
    doc = {"question_id": "999-3", "videoID": "nope", "question": "Who?", "options": OPTIONS}
    with pytest.raises(UserError) as info:
        utils.videomme_refocus_doc_to_visual(doc)
    message = str(info.value)
    assert "'999-3'" in message and str(env) in message and "\n" not in message
    with pytest.raises(UserError, match=r"'nope-1'.*no selection"):
        hooks.SelectedFrames(env).frames("nope-1")


def test_process_docs_keeps_only_the_scored_documents(env):
    class Docs(list):  # the one method of datasets.Dataset that process_docs uses
        def filter(self, keep):
            return Docs(d for d in self if keep(d))

    docs = Docs([{"question_id": "001-2", "videoID": "x", "question": "?"},
                 {"question_id": "404-1", "videoID": "fFjv93ACGo8", "question": "Unscored?"},
                 {"question_id": "x", "videoID": "-ab_XY12cd3", "question": "What happens first?"}])
    kept = load_utils().videomme_refocus_process_docs(docs)
    assert [d["question_id"] for d in kept] == ["001-2", "x"]


def test_missing_env_var_and_missing_shards_are_user_errors(scored, monkeypatch, tmp_path):
    hooks._READERS.clear()
    monkeypatch.delenv(hooks.SELECTIONS_ENV, raising=False)
    with pytest.raises(UserError, match=hooks.SELECTIONS_ENV):
        hooks.make_doc_to_visual()({"question_id": "001-1"})
    with pytest.raises(UserError, match="no such folder"):
        hooks.SelectedFrames(tmp_path / "absent")
    reader = hooks.SelectedFrames(scored, shards=tmp_path / "moved")
    with pytest.raises(UserError, match=hooks.SHARDS_ENV):
        reader.frames("001-1")
    # a score folder moved whole (refocus score writes OUT/shards): found inside it
    moved = tmp_path / "elsewhere"
    shutil.copytree(scored, moved)
    shutil.copytree(scored.parent / "shards", moved / "shards")
    meta = json.loads((moved / "selections.json").read_text())
    (moved / "selections.json").write_text(json.dumps({**meta, "shards": "/gone/shards"}))
    assert len(hooks.SelectedFrames(moved).frames("002-1").images) == 3


def test_the_reader_needs_neither_lmms_eval_nor_the_heavy_libraries():
    blocked = ["torch", "av", "numpy", "pyarrow", "lmms_eval", "cv2", "transformers"]
    utils = str(EXAMPLE / "utils.py")
    code = ("import sys\n"
            f"for name in {blocked!r}: sys.modules[name] = None\n"
            "from pipelines import lmms_eval\n"
            "import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('utils', {utils!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_each_video_is_read_once_and_the_shard_set_opened_once(scored, monkeypatch):
    reads: list[str] = []
    lookups: list[int] = []
    real_read, real_lookup = ShardSet.read, ShardSet.lookup

    def read(self, video_id, location=None):
        reads.append(video_id)
        return real_read(self, video_id, location)

    def lookup(self):
        lookups.append(1)
        return real_lookup(self)

    monkeypatch.setattr(ShardSet, "read", read)
    monkeypatch.setattr(ShardSet, "lookup", lookup)
    reader = hooks.SelectedFrames(scored, cache_videos=1)
    for qid in ("001-1", "001-2", "001-1", "002-1", "002-1"):
        reader.frames(qid)
    assert reads == ["fFjv93ACGo8", "-ab_XY12cd3"] and len(lookups) == 1
    reader.frames("001-2")  # evicted by the LRU of one video: read again
    assert reads[-1] == "fFjv93ACGo8" and len(reads) == 3


class _TaskLoader(yaml.SafeLoader):
    """A safe loader that keeps `!function utils.name` as ("function", "utils.name")."""


_TaskLoader.add_constructor(
    "!function", lambda loader, node: ("function", loader.construct_scalar(node)))


def test_task_yamls_parse_and_name_functions_that_exist_in_utils():
    config = yaml.load((EXAMPLE / "videomme_refocus.yaml").read_text(), Loader=_TaskLoader)
    assert config["task"] == "videomme_refocus"
    assert config["doc_to_visual"] == ("function", "utils.videomme_refocus_doc_to_visual")
    assert "video" not in config["dataset_kwargs"]  # no download of the videos themselves
    baseline = yaml.load((EXAMPLE / "videomme_refocus_uniform.yaml").read_text(),
                         Loader=_TaskLoader)
    assert baseline == {"include": "videomme_refocus.yaml", "task": "videomme_refocus_uniform",
                        "doc_to_visual": ("function", "utils.videomme_uniform_doc_to_visual")}
    tags = [baseline["doc_to_visual"][1]]

    def walk(value):
        if isinstance(value, tuple) and value[:1] == ("function",):
            tags.append(value[1])
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(config)
    assert len(tags) == 5
    utils = load_utils()
    for tag in tags:
        module, _, name = tag.partition(".")
        assert module == "utils" and callable(getattr(utils, name)), tag
    readme = (EXAMPLE / "README.md").read_text()
    assert "--tasks videomme_refocus" in readme and "REFOCUS_SELECTIONS" in readme


# -- the `refocus` lmms-eval model (pipelines/lmms_plugin.py): its logic, without lmms-eval ------

@dataclasses.dataclass
class Instance:
    """lmms-eval 0.7.3's lmms_eval.api.instance.Instance, the fields a model reads."""

    request_type: str
    arguments: tuple
    idx: int
    metadata: dict = dataclasses.field(default_factory=dict)


DOCS = [  # a Video-MME doc, an LVB-style doc (id), an MLVU-style doc (no id)
    {"question_id": "001-1", "videoID": "fFjv93ACGo8", "question": "?"},
    {"id": "002-1", "video_id": "-ab_XY12cd3", "question": "?"},
    {"video_name": "fFjv93ACGo8.mp4", "question": "How bright is the end?\n(A) x"},
]


def stock_visual(doc):  # what a stock video task's doc_to_visual gives: a path
    return [f"/videos/{doc.get('videoID', 'x')}.mp4"]


def simple_requests(docs=DOCS, task="vmme"):
    return [Instance("generate_until", ("ctx", {}, stock_visual, i, task, "test"), 0,
                     {"task": task, "doc_id": i, "repeats": 1}) for i in range(len(docs))]


def test_router_gives_each_simple_request_its_frames_as_video_with_metadata(scored):
    router = hooks.RequestRouter(hooks.SelectedFrames(scored))
    task_dict = {"vmme": {"test": DOCS}}
    requests = simple_requests()
    groups = router.route(requests, task_dict, simple=True)
    assert [[p for p, _ in g] for g in groups] == [[2], [0, 1]]  # by frame count: 2, then 3
    shards = scored.parent / "shards"
    expected = {0: ("fFjv93ACGo8", [1, 6, 11]), 1: ("-ab_XY12cd3", [2, 3, 8]),
                2: ("fFjv93ACGo8", [0, 13])}
    for group in groups:
        for position, request in group:
            vid, picks = expected[position]
            _, _, doc_to_visual, doc_id, task, split = request.arguments
            assert (doc_id, task, split) == (position, "vmme", "test")
            assert_same_frames(doc_to_visual(DOCS[position]), tar_frames(shards, vid, picks))
            meta = request.metadata
            assert meta["task"] == "vmme" and meta["task_type"] == "video"
            assert meta["sample_frames"] == len(picks) and meta["fps"] == 10
            assert meta["frames_indices"] == picks  # every frame kept at 10 fps: t = i / 10
            assert meta["timestamps"] == pytest.approx([i / 10 for i in picks])
            assert meta["total_num_frames"] == VIDEOS[vid]
    assert requests[0].arguments[2] is stock_visual and "task_type" not in requests[0].metadata
    answers = [[f"answer {p}" for p, _ in g] for g in groups]
    assert hooks.in_request_order(groups, answers) == ["answer 0", "answer 1", "answer 2"]


def test_router_images_and_uniform_modes(scored):
    task_dict = {"vmme": {"test": DOCS[:1]}}
    shards = scored.parent / "shards"
    images = hooks.RequestRouter(hooks.SelectedFrames(scored), frames_as="images")
    [[(_, request)]] = images.route(simple_requests(DOCS[:1]), task_dict, simple=True)
    assert "task_type" not in request.metadata and "sample_frames" not in request.metadata
    assert_same_frames(request.arguments[2](DOCS[0]),
                       tar_frames(shards, "fFjv93ACGo8", [1, 6, 11]))
    uniform = hooks.RequestRouter(hooks.SelectedFrames(scored), frames="uniform")
    [[(_, request)]] = uniform.route(simple_requests(DOCS[:1]), task_dict, simple=True)
    spaced = np.linspace(0, VIDEOS["fFjv93ACGo8"] - 1, 3, dtype=int).tolist()
    assert request.metadata["frames_indices"] == spaced
    assert_same_frames(request.arguments[2](DOCS[0]), tar_frames(shards, "fFjv93ACGo8", spaced))
    with pytest.raises(UserError, match="frames_as='gif'"):
        hooks.RequestRouter(hooks.SelectedFrames(scored), frames_as="gif")


def test_router_puts_the_frames_where_a_chat_task_had_its_video(scored):
    def doc_to_messages(doc):  # as lmms-eval's ConfigurableMessagesTask builds them
        return [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "video", "url": "/v/x.mp4"},
                                             {"type": "text", "text": doc["question"]}]}]

    task_dict = {"vmme": {"test": DOCS[:1]}}
    request = Instance("generate_until", ("ctx", doc_to_messages, {}, 0, "vmme", "test"), 0,
                       {"task": "vmme", "doc_id": 0, "repeats": 1})
    want = tar_frames(scored.parent / "shards", "fFjv93ACGo8", [1, 6, 11])
    for frames_as in ("video", "images"):
        router = hooks.RequestRouter(hooks.SelectedFrames(scored), frames_as=frames_as)
        [[(_, routed)]] = router.route([request], task_dict, simple=False)
        system, user = routed.arguments[1](DOCS[0])
        assert system == {"role": "system", "content": "Be brief."}
        assert user["content"][-1] == {"type": "text", "text": "?"}
        parts = user["content"][:-1]
        if frames_as == "video":
            assert [p["type"] for p in parts] == ["video"]
            assert_same_frames(parts[0]["url"], want)
        else:
            assert [p["type"] for p in parts] == ["image"] * 3
            assert_same_frames([p["url"] for p in parts], want)


def test_router_stops_before_the_model_when_a_doc_has_no_selection(scored):
    calls = []

    def counting_visual(doc):
        calls.append(doc)
        return []

    docs = [DOCS[0], {"question_id": "404-9", "videoID": "nope", "question": "Who?"},
            {"question_id": "405-9", "videoID": "nope", "question": "Why?"}]
    requests = [Instance("generate_until", ("c", {}, counting_visual, i, "vmme", "test"), 0,
                         {"task": "vmme", "doc_id": i, "repeats": 1}) for i in range(3)]
    router = hooks.RequestRouter(hooks.SelectedFrames(scored))
    with pytest.raises(UserError) as info:
        router.route(requests, {"vmme": {"test": docs}}, simple=True)
    message = str(info.value)
    assert message.startswith("2 of 3 requests have no selection") and "\n" not in message
    assert "task 'vmme' doc 1" in message and "'404-9'" in message and str(scored) in message
    assert calls == []


def test_plugin_is_an_lmms_eval_model_registered_by_entry_point(tmp_path):
    """lmms-eval 0.7.3's interface: an `lmms_eval.models` entry point whose payload is a
    callable returning a ModelManifest; the class subclasses lmms and implements its three
    abstract methods. Checked in lmms-eval itself when the scratch environment has it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    target = config["project"]["entry-points"]["lmms_eval.models"]["refocus"]
    assert target == "pipelines.lmms_plugin:manifest"
    tree = ast.parse((REPO / "pipelines" / "lmms_plugin.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    [model] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RefocusModel"]
    assert "manifest" in functions and [b.id for b in model.bases] == ["lmms"]
    methods = {n.name for n in model.body if isinstance(n, ast.FunctionDef)}
    assert {"generate_until", "loglikelihood", "generate_until_multi_round"} <= methods
    scratch = Path(os.environ.get("REFOCUS_LMMS_PYTHON", "/work/scratch-lmms/bin/python"))
    if scratch.exists():  # the real registry: lmms-eval resolves --model refocus to our class
        # this checkout's entry point, as an installed refocus would declare it (a dist-info
        # ahead of any other install on the path), and this checkout's code
        dist = tmp_path / "refocus-0.0.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: refocus\nVersion: 0.0.0\n")
        (dist / "entry_points.txt").write_text(f"[lmms_eval.models]\nrefocus = {target}\n")
        code = ("from lmms_eval.models import get_model\n"
                "from pipelines.lmms_plugin import RefocusModel\n"
                "assert get_model('refocus') is RefocusModel\n")
        env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
        result = subprocess.run([str(scratch), "-c", code], cwd=tmp_path, capture_output=True,
                                text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]


def test_task_files_are_package_data():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["pipelines"]
    tasks = REPO / "pipelines" / "lmms_tasks"
    files = {p.relative_to(REPO / "pipelines").as_posix() for p in tasks.iterdir()}
    assert {"lmms_tasks/videomme_refocus.yaml", "lmms_tasks/longvideobench_refocus.yaml",
            "lmms_tasks/mlvu_refocus.yaml", "lmms_tasks/utils.py"} <= files
    assert all(any(fnmatch.fnmatch(f, p) for p in patterns) for f in files)
    for name in ("longvideobench_refocus", "mlvu_refocus"):
        config = yaml.load((tasks / f"{name}.yaml").read_text(), Loader=_TaskLoader)
        assert config["task"] == name and "video" not in config["dataset_kwargs"]
        utils = load_utils()
        for key in ("doc_to_visual", "doc_to_text", "process_results"):
            kind, tag = config[key]
            assert kind == "function" and callable(getattr(utils, tag.split(".")[1]))
