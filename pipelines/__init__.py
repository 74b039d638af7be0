"""Stage logic as plain functions: decode and ingest videos (and, later, embed, synthesise
and score). Usable and testable without Prefect."""
