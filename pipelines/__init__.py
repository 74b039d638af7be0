"""Stage logic as plain functions: synthesise a corpus, decode and ingest videos into frame
shards, embed them into a feature store, precompute reference features and LMM margins, train
the reader and the policy, evaluate, and score new corpora. Usable and testable without
Prefect."""
