"""The file formats one stage writes and another reads.

Corpus manifests (JSONL) and their importers, WebDataset frame shards, the Zarr feature store,
FAISS frame indexes, a training run's folder (``runs.py``: run.json, checkpoint, metrics, the
best policy), checkpoints and model folders, refocus score's selections, reference-LMM features
and stored LMM margins; with them ids, errors and owned output folders. Each stage's
summaries, reports, plots and evaluation tables and the exported JPEG frames are written by
``pipelines``.
"""
