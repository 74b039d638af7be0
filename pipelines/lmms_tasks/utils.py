"""lmms-eval task hooks that feed a model refocus's selected frames instead of uniform samples.

lmms-eval loads this file for the ``!function utils.<name>`` tags of the task YAMLs beside it
(``--include_path`` this folder: ``python -m pipelines.lmms_plugin``
prints it). The frames come from the ``refocus score`` output
folder named by ``REFOCUS_SELECTIONS``; the prompt, answer parsing and scoring are lmms-eval's
own Video-MME functions, imported when first called, so the only change from the stock
``videomme`` task is which frames the model sees.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

try:
    from pipelines import lmms_eval as refocus_frames
except ImportError:  # running from a refocus checkout that is not pip-installed
    _ROOT = Path(__file__).resolve().parents[2]
    if not (_ROOT / "pipelines" / "lmms_eval.py").is_file():
        raise
    sys.path.append(str(_ROOT))
    from pipelines import lmms_eval as refocus_frames

# Video-MME documents: question_id "001-1", videoID (the YouTube id = refocus's video id).
videomme_refocus_doc_to_visual = refocus_frames.make_doc_to_visual(id_field="question_id")
videomme_refocus_doc_to_timestamps = refocus_frames.make_doc_to_timestamps(id_field="question_id")
# The baseline: as many frames, evenly spaced over the same candidates.
videomme_uniform_doc_to_visual = refocus_frames.make_doc_to_visual(
    id_field="question_id", frames="uniform")
# LongVideoBench documents: id, video_id. MLVU documents carry no question id: matched by
# video_name and question text.
longvideobench_refocus_doc_to_visual = refocus_frames.make_doc_to_visual(id_field="id")
mlvu_refocus_doc_to_visual = refocus_frames.make_doc_to_visual(id_field=None)


def _stock(benchmark: str):
    """lmms-eval's own task module for ``benchmark`` (needs lmms-eval installed)."""
    return importlib.import_module(f"lmms_eval.tasks.{benchmark}.utils")


def _videomme():
    return _stock("videomme")


def videomme_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The stock Video-MME prompt, unchanged."""
    return _videomme().videomme_doc_to_text(doc, lmms_eval_specific_kwargs or {})


def videomme_refocus_doc_to_text_timed(doc, lmms_eval_specific_kwargs=None):
    """The stock prompt, preceded by the times at which the selected frames were taken
    (an option: the YAML uses the unchanged prompt, so scores compare with ``videomme``)."""
    times = refocus_frames.timestamps_line(videomme_refocus_doc_to_timestamps(doc))
    return times + "\n" + videomme_doc_to_text(doc, lmms_eval_specific_kwargs)


def videomme_refocus_process_docs(dataset):
    """Keep only the documents that have a selection (an option, for a corpus scored in part:
    add ``process_docs: !function utils.videomme_refocus_process_docs`` to a copy of the YAML;
    the score is then over those questions only)."""
    reader = refocus_frames.reader_for()
    return dataset.filter(lambda doc: reader.has_doc(doc, id_field="question_id"))


def videomme_process_results(doc, results):
    return _videomme().videomme_process_results(doc, results)


def videomme_aggregate_results(results):
    return _videomme().videomme_aggregate_results(results)


def longvideobench_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The stock LongVideoBench prompt, unchanged."""
    return _stock("longvideobench").longvideobench_doc_to_text(doc, lmms_eval_specific_kwargs or {})


def longvideobench_process_results(doc, results):
    return _stock("longvideobench").longvideobench_process_results(doc, results)


def longvideobench_aggregate_results(results):
    return _stock("longvideobench").longvideobench_aggregate_results(results)


def mlvu_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The stock MLVU prompt, unchanged."""
    return _stock("mlvu").mlvu_doc_to_text(doc, lmms_eval_specific_kwargs)


def mlvu_process_results(doc, results):
    return _stock("mlvu").mlvu_process_results(doc, results)


def mlvu_aggregate_results_dev(results):
    return _stock("mlvu").mlvu_aggregate_results_dev(results)
