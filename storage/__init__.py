"""storage: FASTA ingest, the Parquet store layout and its DuckDB catalog; knows nothing of models."""
