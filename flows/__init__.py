"""flows: Prefect flows, Ray actors, cluster submission and the CLI that wire esm_core to storage."""
