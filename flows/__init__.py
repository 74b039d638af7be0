"""What users run: the ``refocus`` command line (``cli.py``, one module per command group in
``commands/``) and the Prefect flows that run the pipeline stages' per-shard steps as tasks on
threads or Dask (``orchestrate.py``, ``runtime.py``). The only layer that may import prefect."""
