"""Folding throughput: proteoflow's ``Folder`` (token-budget batches sorted by length, per-sequence pTM,
PDB + mmCIF text) beside a one-by-one ``model.infer_pdb`` loop, on the same model in the same run.

The input is the first --n E. coli proteins of --min-len..--max-len residues (file order), read from --fasta
(default: the proteome in $PROTEOFLOW_DATA, else ../shared/data).
--model: "tiny" (random tiny checkpoint, the default; seconds on a CPU), "realistic" (random weights,
esmfold_v1 trunk on a 35M ESM-2 stem; a GPU job), or a hub id / local HF directory.

    python bench/fold.py                          # tiny model, CPU
    python bench/fold.py --model realistic --device cuda --n 60 --max-len 400
    python bench/fold.py --model facebook/esmfold_v1 --device cuda
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esm_core.folding import Folder, load_esmfold  # noqa: E402
from esm_core.random_esmfold import write_random_esmfold_checkpoint  # noqa: E402

DATA = Path(os.environ.get("PROTEOFLOW_DATA") or ROOT.parent / "shared" / "data")
ECOLI = DATA / "ecoli_k12_UP000000625.fasta.gz"


def read_proteins(path: Path, n: int, min_len: int, max_len: int) -> list[tuple[str, str]]:
    """The first ``n`` records of ``min_len``..``max_len`` residues, (accession, sequence)."""
    out: list[tuple[str, str]] = []
    key, parts = None, []
    with gzip.open(path, "rt") as handle:
        for line in [*handle, ">end"]:
            if line.startswith(">"):
                seq = "".join(parts)
                if key is not None and min_len <= len(seq) <= max_len:
                    out.append((key, seq))
                    if len(out) == n:
                        break
                key, parts = line[1:].split()[0], []
            else:
                parts.append(line.strip())
    return out


def model_source(spec: str, workdir: Path) -> str:
    """A loadable spec: random checkpoints written once under ``workdir``; anything else as given."""
    if spec in ("tiny", "realistic"):
        path = workdir / f"random_esmfold_{spec}"
        if not (path / "config.json").exists():
            write_random_esmfold_checkpoint(path, tiny=spec == "tiny", seed=0)
        return str(path)
    return spec


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | realistic | hub id | local HF directory")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    parser.add_argument("--fasta", type=Path, default=ECOLI)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=150)
    parser.add_argument("--max-tokens", type=int, default=None, help="Folder token budget (default 1024)")
    parser.add_argument("--num-recycles", type=int, default=None, help="default: the model's own")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each; the median is reported")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a busy CPU)"
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/proteoflow-bench"))
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    args = parser.parse_args()

    if not args.fasta.exists():
        sys.exit(f"E. coli proteome not found at {args.fasta}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    proteins = read_proteins(args.fasta, args.n, args.min_len, args.max_len)
    loaded = load_esmfold(model_source(args.model, args.workdir), device=args.device)
    model = loaded.model
    folder = Folder(loaded, num_recycles=args.num_recycles, max_tokens=args.max_tokens)

    def baseline() -> None:
        # transformers' infer takes no num_recycles, so the baseline always runs the model's default
        for _, seq in proteins:
            model.infer_pdb(seq)

    def proteoflow() -> None:
        results = list(folder.fold(proteins))
        assert len(results) == len(proteins)

    warm = proteins[:2]
    list(folder.fold(warm))
    for _, seq in warm:
        model.infer_pdb(seq)
    times: dict[str, list[float]] = {"infer_pdb one by one": [], "proteoflow Folder": []}
    for _ in range(args.repeats):  # interleaved, so drifting load on a shared machine hits both
        times["infer_pdb one by one"].append(timed(baseline))
        times["proteoflow Folder"].append(timed(proteoflow))

    residues = sum(len(seq) for _, seq in proteins)
    device = torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu"
    print(
        f"model: {loaded.name} (sha {loaded.sha}, random_weights={loaded.random_weights}) on {device}, "
        f"torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}"
    )
    print(
        f"input: {len(proteins)} E. coli proteins, {args.min_len}-{args.max_len} aa, {residues:,} residues; "
        f"num_recycles={folder.num_recycles}, max_tokens={folder.max_tokens}, chunk_size={folder.chunk_size}"
    )
    print(f"{'':24}{'wall s':>9}{'seq/hour':>12}{'residues/s':>12}")
    rates = {}
    for name, runs in times.items():
        wall = statistics.median(runs)
        rates[name] = len(proteins) * 3600 / wall
        print(f"{name:24}{wall:9.2f}{rates[name]:12,.0f}{residues / wall:12,.0f}")
    ratio = rates["proteoflow Folder"] / rates["infer_pdb one by one"]
    print(
        f"throughput ratio proteoflow / infer_pdb: {ratio:.2f}x (proteoflow also writes mmCIF, per-sequence pTM)"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "model": loaded.name,
                    "device": device,
                    "n": len(proteins),
                    "seq_per_hour": rates,
                    "ratio": ratio,
                }
            )
        )


if __name__ == "__main__":
    main()
