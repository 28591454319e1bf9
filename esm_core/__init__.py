"""esm_core: ESM-2 embedding and ESMFold folding on top of transformers; no Ray, Prefect or Parquet here."""
