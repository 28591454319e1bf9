"""Saturation mutagenesis speed: masked-marginal scores of every residue x 20 amino acids of one real
300-residue E. coli protein, batched masked copies (proteoflow) beside one masked copy per forward pass
(fair-esm's examples/variant-prediction/predict.py loop).

One random-weight checkpoint (fair-esm .pt, default esm2_t6_8M_UR50D shape) is read by proteoflow's loader and
by fair-esm's own; all contenders score the same protein in the same run:

  proteoflow batched      VariantScorer, masked copies packed under the token budget, fp32
  proteoflow batched auto the same at precision auto (bf16 where the device has it)
  proteoflow one copy     VariantScorer with max_tokens=1: one masked copy per pass (same model and code)
  fair-esm loop           fair-esm's ESM2, one masked copy per pass, log-softmax over all positions

The residues are timed in blocks, every contender on each block in turn, so that the load of a shared
machine falls on all of them alike. Prints seconds, masked copies per second, the batched/loop speed ratios
and the largest score difference from fair-esm.

Run: ``python bench/variants.py [--arch esm2_t6_8M_UR50D] [--length 300] [--device cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esm_core.checkpoints import LoadedMaskedLm, load_esm_mlm  # noqa: E402
from esm_core.random_weights import write_random_fair_esm_checkpoint  # noqa: E402
from esm_core.variants import AMINO_ACIDS, VariantScorer  # noqa: E402

ECOLI = ROOT.parent / "shared" / "data" / "ecoli_k12_UP000000625.fasta.gz"


def read_protein(path: Path, length: int) -> tuple[str, str]:
    """The first protein of ``path`` (file order) with exactly ``length`` residues, as (accession, sequence)."""
    header, chunks = None, []
    with gzip.open(path, "rt") as fh:
        for line in [*fh, ">end"]:
            if line.startswith(">"):
                seq = "".join(chunks).rstrip("*")
                if header and len(seq) == length:
                    return header.split("|")[1], seq
                header, chunks = line[1:].strip(), []
            else:
                chunks.append(line.strip())
    raise SystemExit(f"no {length}-residue protein in {path}")


class Proteoflow:
    """VariantScorer on blocks of residues (the table is assembled from the blocks)."""

    def __init__(self, loaded: LoadedMaskedLm, key: str, sequence: str, **options):
        self.scorer = VariantScorer(loaded, "masked-marginals", **options)
        self.key, self.sequence = key, sequence
        self.table = np.full((len(sequence), 20), np.nan, np.float32)
        next(self.scorer.score([(key, sequence)], {key: range(5)}))  # warm-up, as every contender gets

    def __call__(self, block: list[int]) -> None:
        result = next(self.scorer.score([(self.key, self.sequence)], {self.key: block}))
        self.table[block] = result.scores[block]


class FairEsmLoop:
    """fair-esm's predict.py masked-marginals loop: for each residue, mask it, run the whole model (LM head
    at every position), take the log-softmax at that residue."""

    def __init__(self, path: Path, sequence: str, device: torch.device):
        import esm

        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, fair_alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
        self.model = model.eval().to(device)
        self.mask = fair_alphabet.mask_idx
        _, _, tokens = fair_alphabet.get_batch_converter()([("x", sequence)])
        self.tokens = tokens.to(device)
        self.columns = [fair_alphabet.get_idx(a) for a in AMINO_ACIDS]
        self.table = np.full((len(sequence), 20), np.nan, np.float32)
        self([0, 1, 2, 3, 4])  # warm-up

    @torch.inference_mode()
    def __call__(self, block: list[int]) -> None:
        for i in block:
            masked = self.tokens.clone()
            masked[0, i + 1] = self.mask
            logp = torch.log_softmax(self.model(masked)["logits"], dim=-1)[0, i + 1]
            self.table[i] = (logp[self.columns] - logp[self.tokens[0, i + 1]]).cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="esm2_t6_8M_UR50D", help="registry architecture of the random model"
    )
    parser.add_argument("--length", type=int, default=300, help="residues of the E. coli protein scored")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: the first GPU, else CPU)")
    parser.add_argument("--fasta", type=Path, default=ECOLI)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    key, sequence = read_protein(args.fasta, args.length)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_fair_esm_checkpoint(Path(tmp) / f"{args.arch}.pt", args.arch, seed=0)
        loaded = load_esm_mlm(str(path), device=args.device)
        batched = Proteoflow(loaded, key, sequence, precision="fp32")
        contenders = {
            f"proteoflow batched (fp32, max_tokens {batched.scorer.max_tokens})": batched,
            "proteoflow batched auto": Proteoflow(loaded, key, sequence, precision="auto"),
            "proteoflow one copy per pass (fp32)": Proteoflow(
                loaded, key, sequence, precision="fp32", max_tokens=1
            ),
            "fair-esm loop, one copy per pass (fp32)": FairEsmLoop(path, sequence, loaded.device),
        }
    auto = contenders["proteoflow batched auto"]
    names = list(contenders)
    names[1] = f"proteoflow batched auto ({auto.scorer.precision})"
    # Blocks of residues, every contender on each block in turn (rotating the order): a shared CPU's load
    # drifts over minutes, and interleaving exposes every contender to the same drift.
    per_batch = max(1, batched.scorer.max_tokens // (len(sequence) + 2))
    size = per_batch * max(1, 64 // per_batch)
    blocks = [list(range(i, min(i + size, len(sequence)))) for i in range(0, len(sequence), size)]
    seconds = dict.fromkeys(contenders, 0.0)
    print(
        f"saturation mutagenesis, masked-marginals: {key} ({len(sequence)} residues x 20), random-weight "
        f"{args.arch} ({loaded.num_layers} layers x {loaded.dim}) on {loaded.device}, torch threads "
        f"{torch.get_num_threads()}; {len(blocks)} interleaved blocks of {size} residues"
    )
    for number, block in enumerate(blocks):
        order = list(contenders)[number % 4 :] + list(contenders)[: number % 4]
        for name in order:
            _sync(loaded.device)
            start = time.perf_counter()
            contenders[name](block)
            _sync(loaded.device)
            seconds[name] += time.perf_counter() - start

    copies = len(sequence)
    t_batched, t_auto, t_single, t_fair = seconds.values()
    print(f"{'engine':<52}{'seconds':>9}{'copies/s':>10}{'vs fair-esm loop':>18}")
    for label, value in zip(names, seconds.values(), strict=True):
        print(f"{label:<52}{value:>9.2f}{copies / value:>10.1f}{t_fair / value:>17.2f}x")
    print(f"batched / one copy per pass, same model and code: {t_single / t_batched:.2f}x faster")
    print(
        f"batched / fair-esm's loop: {t_fair / t_batched:.2f}x faster (fp32), {t_fair / t_auto:.2f}x (auto)"
    )
    tables = [c.table for c in contenders.values()]
    fair = tables[3]
    print(
        f"max |score diff| vs fair-esm: batched fp32 {np.abs(tables[0] - fair).max():.2e}, one copy "
        f"{np.abs(tables[2] - fair).max():.2e}, auto {np.abs(tables[1] - fair).max():.2e} "
        f"(score range {np.ptp(fair):.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
