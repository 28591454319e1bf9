"""`make demo`: the main job end to end on the bundled examples, on this machine's defaults.

ingest -> embed (Prefect flow, local Ray) -> 5 nearest neighbours by cosine similarity through
`proteoflow sql` -> fold a handful of proteins -> export their PDB files. Uses the real models when they
are cached or reachable; otherwise writes random-weight checkpoints of the same architectures and says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
EMBED_MODEL = "facebook/esm2_t6_8M_UR50D"
FOLD_MODEL = "facebook/esmfold_v1"
BANNER = "=" * 100


def cli(args: list[str]) -> int:
    """Run one `proteoflow` command as its own process, as a user's shell would; returns its exit status."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT).returncode


def say(text: str) -> None:
    print(f"\n{BANNER}\n{text}\n{BANNER}", flush=True)


def hub_available(repo: str) -> bool:
    """True when the model is in the local Hugging Face cache or the hub answers for it."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return True
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        HfApi().model_info(repo, timeout=5)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable from here"
        return False


def random_stand_in(kind: str, store: Path) -> str:
    """Write (once) a random-weight checkpoint of the demo model's architecture under .demo/ (outside the
    store: a store holds only its own tables)."""
    target = (
        ROOT / ".demo" / "models" / ("esm2_t6_8M_UR50D-random" if kind == "embed" else "esmfold-tiny-random")
    )
    if not (target / "config.json").exists():
        if kind == "embed":
            from esm_core.random_weights import write_random_hf_checkpoint

            write_random_hf_checkpoint(target, arch="esm2_t6_8M_UR50D")
        else:
            from esm_core.random_esmfold import write_random_esmfold_checkpoint

            write_random_esmfold_checkpoint(target, tiny=True)
    return str(target)


def pick_model(kind: str, repo: str, store: Path) -> str:
    if hub_available(repo):
        return repo
    path = random_stand_in(kind, store)
    say(
        f"!!! NOTICE: {repo} is neither cached nor reachable. Using RANDOM WEIGHTS of that architecture\n"
        f"!!! ({path}). Every number below is meaningless; runs are recorded as random_weights=true."
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default="demo-store")
    args = parser.parse_args(argv)
    store = Path(args.store)
    example = EXAMPLES / "ecoli_200.fasta"

    say(f"1. ingest {example.name} (200 E. coli proteins) into {store}/")
    if cli(["ingest", str(example), "--store", str(store)]):
        return 1

    model = pick_model("embed", EMBED_MODEL, store)
    say(f"2. embed with {model}: Prefect flow, local Ray actor pool, Parquet shards")
    if cli(["embed", str(example), "--store", str(store), "--model", model]):
        return 1

    query = """
        WITH q AS (SELECT e.embedding, m.seq_id FROM embeddings e JOIN members m USING (seq_hash)
                   WHERE m.record_index = 0 LIMIT 1)
        SELECT m.seq_id, m.length, round(array_cosine_similarity(e.embedding, q.embedding), 4) AS cosine
        FROM embeddings e JOIN members m USING (seq_hash), q
        WHERE m.seq_id <> q.seq_id
        ORDER BY cosine DESC LIMIT 5"""
    say(
        "3. the 5 nearest neighbours of the first protein, by cosine similarity:\n"
        f'   proteoflow sql --store {store} "{" ".join(query.split())}"'
    )
    if cli(["sql", "--store", str(store), query]):
        return 1

    fold_input = EXAMPLES / "ecoli_fold5.fasta"
    fold_model = pick_model("fold", FOLD_MODEL, store)
    say(f"4. fold {fold_input.name} (5 short proteins) with {fold_model}")
    if cli(["fold", str(fold_input), "--store", str(store), "--model", fold_model]):
        return 1
    if cli(
        [
            "sql",
            "--store",
            str(store),
            "SELECT DISTINCT m.seq_id, s.length, round(s.mean_plddt, 1) AS mean_plddt, "
            "round(s.ptm, 3) AS ptm FROM structures s JOIN members m USING (seq_hash) ORDER BY m.seq_id",
        ]
    ):
        return 1
    out = store / "pdb"
    say(f"5. export the structures as PDB files into {out}/")
    if cli(["export-structures", "--store", str(store), "--out", str(out)]):
        return 1
    for path in sorted(out.glob("*.pdb")):
        print(f"  {path}")
    say(f'done. Try: .venv/bin/proteoflow sql --store {store} "SELECT * FROM runs"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
