"""The file formats one stage writes and another reads.

Corpus manifests (JSONL) and their importers, WebDataset frame shards, the Zarr feature store,
FAISS frame indexes, checkpoints and model folders, metrics logs, refocus score's selections,
reference-LMM features and stored LMM margins; with them ids, errors and owned output folders.
Each stage's summaries, reports, plots and evaluation tables, a training run's ``run.json`` and
the exported JPEG frames are written by ``pipelines``.
"""
