"""What users run: the ``refocus`` command line and (later) the Prefect flows that schedule
the pipeline stages. The only layer that may import prefect."""
