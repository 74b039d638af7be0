"""File formats: the only layer that reads or writes refocus data on disk.

Corpus manifests (JSONL) and their importers, WebDataset frame shards, and (later)
the Zarr feature store, FAISS indexes, checkpoints and run records.
"""
