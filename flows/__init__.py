"""What users run: the ``refocus`` command line (``cli.py``, one module per command group in
``commands/``, flags and ``--config`` in ``options.py`` and ``config.py``) and the Prefect flows
that run the stages with their per-shard steps as tasks on threads or Dask (``orchestrate.py``,
``runners.py``, ``runtime.py``, ``artifacts.py``). The only layer that may import prefect."""
