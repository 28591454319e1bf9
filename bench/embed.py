"""Embedding throughput: proteoflow's engine vs a naive transformers loop vs fair-esm's own batching.

All three run the same random weights (one fair-esm .pt per architecture, loaded by proteoflow's
converter and by fair-esm's loader) on the same real E. coli proteins (<= 1,022 residues, file order):

  proteoflow   Embedder with its defaults (precision auto, token budget auto, length-sorted batches)
  proteoflow fp32   the same engine forced to fp32 (separates batching gains from precision gains)
  naive        transformers EsmModel + EsmTokenizer, batches of 8 in file order, padded, fp32
  fair-esm     FastaBatchedDataset.get_batch_indices(4096) sorted batches, fp32, fair-esm ESM2

Also: machine GEMM throughput (fp32, bf16), proteoflow's achieved FLOP/s as a share of it, and the cosine
similarity of auto vs fp32 mean embeddings. Everything runs on --device (default: the GPU if there is one,
else the CPU), GEMM peaks included. The proteome is read from $PROTEOFLOW_DATA (default: ../shared/data).
Run: ``python bench/embed.py [--n 600] [--models ...] [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from esm_core import alphabet  # noqa: E402
from esm_core.checkpoints import LoadedEsm, load_esm  # noqa: E402
from esm_core.device import pick_device  # noqa: E402
from esm_core.embedding import Embedder  # noqa: E402
from esm_core.precision import cosine_similarity  # noqa: E402
from esm_core.random_weights import write_random_fair_esm_checkpoint  # noqa: E402

DATA = Path(os.environ.get("PROTEOFLOW_DATA") or ROOT.parent / "shared" / "data")
ECOLI = DATA / "ecoli_k12_UP000000625.fasta.gz"
Items = list[tuple[str, str]]


def read_proteins(path: Path, count: int, max_length: int = 1022) -> Items:
    """First ``count`` proteins of ``path`` (file order) with at most ``max_length`` residues."""
    items: Items = []
    header, chunks = None, []
    with gzip.open(path, "rt") as fh:
        for line in [*fh, ">end"]:
            if line.startswith(">"):
                seq = "".join(chunks).rstrip("*")
                if header and 0 < len(seq) <= max_length:
                    items.append((header.split("|")[1], seq))
                if len(items) == count:
                    break
                header, chunks = line[1:].strip(), []
            else:
                chunks.append(line.strip())
    return items


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_size(device: torch.device) -> int:
    """Matmul side for the GEMM peak: 2048 on a CPU, 8192 on a GPU (2048^3 is launch-bound there)."""
    return 8192 if device.type == "cuda" else 2048


def gemm_flops(dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """Best-of-``repeats`` FLOP/s of an n x n x n matmul on ``device`` (n from :func:`gemm_size`)."""
    n = gemm_size(device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def model_flops(loaded: LoadedEsm, items: Items) -> float:
    """Forward FLOPs over ``items`` without padding: 2 x block parameters x tokens + attention 4 T^2 D/layer."""
    blocks = sum(p.numel() for p in loaded.model.encoder.layer.parameters())
    tokens = np.array([len(s) + 2 for _, s in items], dtype=np.float64)
    return float(2 * blocks * tokens.sum() + loaded.num_layers * 4 * loaded.dim * (tokens**2).sum())


def run_proteoflow(
    loaded: LoadedEsm, items: Items, precision: str
) -> tuple[float, dict[str, np.ndarray], str]:
    embedder = Embedder(loaded, precision=precision)
    list(embedder.embed(items[:16]))  # warm-up, as every contender gets
    start = time.perf_counter()
    pooled = {r.key: r.pooled[(loaded.num_layers, "mean")] for r in embedder.embed(items)}
    return time.perf_counter() - start, pooled, f"{embedder.precision}, max_tokens {embedder.max_tokens}"


@torch.inference_mode()
def run_naive(loaded: LoadedEsm, items: Items, workdir: Path) -> tuple[float, dict[str, np.ndarray]]:
    from transformers import EsmTokenizer

    tokenizer = EsmTokenizer(str(alphabet.write_vocab(workdir / "vocab.txt")))
    model = loaded.model  # fp32, sdpa, untouched by the Embedder (which casts a copy)

    def run(batch_items: Items) -> dict[str, np.ndarray]:
        out = {}
        for i in range(0, len(batch_items), 8):
            chunk = batch_items[i : i + 8]
            enc = tokenizer([s for _, s in chunk], return_tensors="pt", padding=True).to(loaded.device)
            hidden = model(**enc).last_hidden_state
            for row, (key, seq) in enumerate(chunk):
                out[key] = hidden[row, 1 : len(seq) + 1].mean(0).cpu().numpy()
        return out

    run(items[:16])
    start = time.perf_counter()
    pooled = run(items)
    return time.perf_counter() - start, pooled


@torch.inference_mode()
def run_fair_esm(path: Path, items: Items, device: torch.device) -> tuple[float, dict[str, np.ndarray]]:
    import esm

    with torch.serialization.safe_globals([argparse.Namespace]):
        model, fair_alphabet = esm.pretrained.load_model_and_alphabet_local(str(path))
    model.eval().to(device)
    last = model.num_layers

    def run(batch_items: Items) -> dict[str, np.ndarray]:
        dataset = esm.FastaBatchedDataset([k for k, _ in batch_items], [s for _, s in batch_items])
        batches = dataset.get_batch_indices(4096, extra_toks_per_seq=1)
        loader = torch.utils.data.DataLoader(
            dataset, collate_fn=fair_alphabet.get_batch_converter(), batch_sampler=batches
        )
        out = {}
        for labels, strs, tokens in loader:
            reps = model(tokens.to(device), repr_layers=[last])["representations"][last]
            for row, (key, seq) in enumerate(zip(labels, strs, strict=True)):
                out[key] = reps[row, 1 : len(seq) + 1].mean(0).cpu().numpy()
        return out

    run(items[:16])
    start = time.perf_counter()
    pooled = run(items)
    return time.perf_counter() - start, pooled


def max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def measure_peak(peak: dict[str, float], device: torch.device) -> dict[str, float]:
    """Raise ``peak`` to the best GEMM rates seen now: the CPU is shared, so peaks are re-measured before
    each model and the best of all measurements is the denominator (fp16 too on a GPU)."""
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if device.type == "cuda":
        dtypes.append(("fp16", torch.float16))
    for name, dtype in dtypes:
        peak[name] = max(peak.get(name, 0.0), gemm_flops(dtype, device))
    return peak


def bench_model(
    arch: str, items: Items, workdir: Path, peak: dict[str, float], device: torch.device
) -> list[str]:
    residues = sum(len(s) for _, s in items)
    path = write_random_fair_esm_checkpoint(workdir / f"{arch}.pt", arch, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_esm(str(path), device)
    measure_peak(peak, device)
    t_auto, auto, auto_desc = run_proteoflow(loaded, items, "auto")
    t_fp32, fp32, _ = run_proteoflow(loaded, items, "fp32")
    t_naive, naive = run_naive(loaded, items, workdir)
    t_fair, fair = run_fair_esm(path, items, device)
    cos = cosine_similarity(np.stack([auto[k] for k, _ in items]), np.stack([fp32[k] for k, _ in items]))
    flops = model_flops(loaded, items)
    rate = {
        name: residues / t
        for name, t in [("auto", t_auto), ("fp32", t_fp32), ("naive", t_naive), ("fair", t_fair)]
    }
    auto_precision = auto_desc.split(",")[0]
    lines = [
        f"\n== {arch}: {len(items)} proteins, {residues:,} residues, {loaded.num_layers} layers x {loaded.dim} ==",
        f"{'engine':<46}{'seconds':>9}{'residues/s':>12}{'vs naive':>10}{'vs fair-esm':>13}",
    ]
    for label, key, seconds in [
        (f"proteoflow auto ({auto_desc})", "auto", t_auto),
        ("proteoflow fp32", "fp32", t_fp32),
        ("naive transformers (8/batch, fp32)", "naive", t_naive),
        ("fair-esm (4096-token batches, fp32)", "fair", t_fair),
    ]:
        lines.append(
            f"{label:<46}{seconds:>9.1f}{rate[key]:>12,.0f}{rate[key] / rate['naive']:>9.2f}x"
            f"{rate[key] / rate['fair']:>12.2f}x"
        )
    achieved = flops / t_auto
    lines += [
        f"proteoflow auto achieved {achieved / 1e9:,.0f} GFLOP/s = {achieved / peak[auto_precision]:.1%} of "
        f"{auto_precision} GEMM peak ({peak[auto_precision] / 1e9:,.0f} GFLOP/s); "
        f"fp32 engine {flops / t_fp32 / 1e9:,.0f} GFLOP/s = {flops / t_fp32 / peak['fp32']:.1%} of fp32 peak",
        f"cosine(auto, fp32) mean embeddings: min {cos.min():.6f}, mean {cos.mean():.6f}",
        f"max |diff| of fp32 means vs naive {max_diff(fp32, naive):.2e}, vs fair-esm {max_diff(fp32, fair):.2e}",
    ]
    return lines


def describe_peak(peak: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate / 1e9:,.0f} GFLOP/s" for name, rate in peak.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="number of E. coli proteins (<= 1,022 residues)")
    parser.add_argument("--models", nargs="+", default=["esm2_t6_8M_UR50D", "esm2_t12_35M_UR50D"])
    parser.add_argument("--quick", action="store_true", help="150 proteins, esm2_t6 only")
    parser.add_argument("--fasta", type=Path, default=ECOLI)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: GPU if any)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.models = min(args.n, 150), args.models[:1]
    if not args.fasta.exists():
        print(f"missing {args.fasta}", file=sys.stderr)
        return 2
    items = read_proteins(args.fasta, args.n)
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device} ({name})")
    n = gemm_size(device)
    peak = measure_peak({}, device)
    print(f"GEMM {n}^3 at start: {describe_peak(peak)}")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models:
            for line in bench_model(arch, items, Path(tmp), peak, device):
                print(line, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next model's token budget reads free memory
    measure_peak(peak, device)
    print(
        f"\nGEMM {n}^3 best seen (the FLOP shares above use the best seen up to that model): "
        f"{describe_peak(peak)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
