"""Embedding search benchmark: a FAISS index built by proteoflow (storage.vectors, streaming from Parquet as
`proteoflow index` does) against DuckDB's array_cosine_similarity scan of the same Parquet file, same run.

Synthetic clustered vectors, written as a real store's embeddings file: superfamily centres ~ N(0, 1), family
centres = superfamily + N(0, 0.6^2), members = family + N(0, 0.8^2) per dimension, ~50 members per family and
20 families per superfamily, normalised (cosine ~0.68 within a family, ~0.5 within a superfamily, ~0 across);
queries are fresh members drawn the same way (not in the store).
Reported per width: index build time and peak memory (RSS above the start), index size, recall@10 against the
exact answer (proteoflow's exact streaming scan, itself checked against DuckDB's top 10), queries/s in one
batch and one query at a time, DuckDB's queries/s, and the speed-up one query at a time.

    python bench/search.py                        # 10^6 x 320 and 2 x 10^5 x 1,280 (a few minutes on 2 cores)
    python bench/search.py --sizes 1000000:1280   # the full 10^6 x 1,280 (about 12 GB RAM, ~10 min on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import vectors  # noqa: E402
from storage.layout import ParquetSink, Store  # noqa: E402
from storage.schemas import embeddings_schema  # noqa: E402

MODEL, SHA = "bench", "0123456789abcdef"
FAMILY_SIZE, FAMILIES_PER_SUPER = 50, 20
FAMILY_SPREAD, MEMBER_SPREAD = 0.6, 0.8
BLOCK = 65_536


class Synthetic:
    """Clustered unit vectors: superfamilies > families > members (see the module docstring)."""

    def __init__(self, n: int, dim: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        families = max(1, n // FAMILY_SIZE)
        supers = max(1, families // FAMILIES_PER_SUPER)
        top = self.rng.standard_normal((supers, dim), dtype=np.float32)
        self.families = top[self.rng.integers(0, supers, families)]
        self.families += FAMILY_SPREAD * self.rng.standard_normal(self.families.shape, dtype=np.float32)

    def draw(self, m: int) -> np.ndarray:
        x = self.families[self.rng.integers(0, len(self.families), m)]
        x = x + MEMBER_SPREAD * self.rng.standard_normal(x.shape, dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(root: Path, n: int, dim: int, data: Synthetic) -> Path:
    """One embeddings file of ``n`` rows, laid out as the embed pipeline writes them."""
    Store(root).ensure()
    path = root / "embeddings" / f"{MODEL}-{SHA}" / "bench-00000.parquet"
    sink = ParquetSink(path, embeddings_schema(dim), "embeddings", {"run_id": "bench"}, background=True)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        x = data.draw(m)
        sink.write(
            pa.table(
                {
                    "seq_hash": pa.array([f"{i:032x}" for i in range(start, start + m)]),
                    "model": pa.array([MODEL] * m),
                    "model_sha": pa.array([SHA] * m),
                    "layer": pa.array([6] * m, pa.int16()),
                    "pooling": pa.array(["mean"] * m),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
                    "length": pa.array([300] * m, pa.int32()),
                    "strategy": pa.array(["full"] * m),
                    "precision": pa.array(["fp32"] * m),
                    "run_id": pa.array(["bench"] * m),
                    "random_weights": pa.array([False] * m),
                },
                schema=embeddings_schema(dim),
            )
        )
    sink.close()
    return sink.commit()


class PeakRss:
    """Peak resident memory of this process above its level at start, sampled every 20 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def above_start_gb(self) -> float:
        return (self.peak - self.base) / 1e9


def _literal(q: np.ndarray, dim: int) -> str:
    return "[" + ",".join(f"{x:.8g}" for x in q) + f"]::FLOAT[{dim}]"


def duckdb_top10(source: str, dim: int, queries: np.ndarray, con=None) -> tuple[float, list[list[str]]]:
    """DuckDB's scan of ``source`` (a Parquet file or a table): queries/s one query at a time, and each query's
    top 10 seq_hash. The query vector is a literal (DuckDB runs a bound parameter about 2x slower here); the file
    is in the page cache (just written and scanned)."""
    con = con or duckdb.connect(":memory:")

    def sql(q: np.ndarray) -> str:
        return (
            f"SELECT seq_hash FROM {source} "
            f"ORDER BY array_cosine_similarity(embedding::FLOAT[{dim}], {_literal(q, dim)}) DESC LIMIT 10"
        )

    started = time.perf_counter()
    answers = [[r[0] for r in con.execute(sql(q)).fetchall()] for q in queries]
    return len(queries) / (time.perf_counter() - started), answers


def recall(got: list[set[str]], want: list[set[str]]) -> float:
    return float(np.mean([len(g & w) / len(w) for g, w in zip(got, want, strict=True)]))


def run_size(work: Path, n: int, dim: int, n_queries: int, n_duck: int, kind: str) -> dict:
    root = work / f"store-{n}-{dim}"
    data = Synthetic(n, dim)
    t = time.perf_counter()
    path = write_store(root, n, dim, data)
    written = time.perf_counter() - t
    queries = data.draw(n_queries)
    vs = vectors.resolve(root, [MODEL])

    t = time.perf_counter()
    exact = vectors.exact_scan(vs, queries, 10)
    exact_qps = n_queries / (time.perf_counter() - t)
    truth = [set(row) for row in exact[1]]

    duck_qps, duck = duckdb_top10(f"read_parquet('{path}')", dim, queries[:n_duck])
    duck_agrees = recall([set(a) for a in duck], truth[:n_duck])
    con = duckdb.connect(":memory:")
    con.execute(
        f"CREATE TABLE e AS SELECT seq_hash, embedding::FLOAT[{dim}] AS embedding FROM read_parquet('{path}')"
    )
    mem_qps, _ = duckdb_top10("e", dim, queries[:n_duck], con)
    con.close()

    with PeakRss() as mem:
        t, cpu = time.perf_counter(), time.process_time()
        info = vectors.build_index(vs, kind)
        build_s, build_cpu = time.perf_counter() - t, time.process_time() - cpu
    t = time.perf_counter()
    index = vectors.load_index(vs)
    load_s = time.perf_counter() - t

    t = time.perf_counter()
    batch = index.search(queries, 10)
    batch_qps = n_queries / (time.perf_counter() - t)
    t = time.perf_counter()
    single = [index.search(queries[i : i + 1], 10)[1][0] for i in range(n_queries)]
    single_qps = n_queries / (time.perf_counter() - t)
    got = [set(row) for row in batch[1]]
    assert got == [set(row) for row in single]
    shutil.rmtree(root, ignore_errors=True)
    return {
        "dim": dim,
        "vectors": n,
        "kind": info.kind,
        "params": ",".join(f"{k}={v}" for k, v in info.params.items()),
        "write_s": written,
        "build_s": build_s,
        "build_cpu_s": build_cpu,
        "phases": info.phases,
        "build_gb": mem.above_start_gb,
        "index_gb": info.count * dim * 4 / 1e9,
        "load_s": load_s,
        "recall": recall(got, truth),
        "batch_qps": batch_qps,
        "single_qps": single_qps,
        "duck_qps": duck_qps,
        "duck_agrees": duck_agrees,
        "duck_mem_qps": mem_qps,
        "exact_qps": exact_qps,
        "speedup": single_qps / duck_qps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        default="1000000:320,200000:1280",
        help="comma-separated N:DIM (default 1000000:320,200000:1280)",
    )
    parser.add_argument("--queries", type=int, default=100, help="queries for recall and index speed")
    parser.add_argument("--duckdb-queries", type=int, default=3, help="queries timed through DuckDB's scan")
    parser.add_argument("--kind", default="ivf", choices=("ivf", "hnsw", "flat"))
    parser.add_argument("--work", help="scratch directory (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="pf-bench-search-"))
    print(
        f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 1e9:.0f} GB RAM, load average "
        f"{os.getloadavg()[0]:.1f} (a shared machine makes wall times longer; CPU seconds are shown too); "
        f"scratch {work}"
    )
    results = []
    try:
        for item in args.sizes.split(","):
            n, dim = (int(x) for x in item.split(":"))
            started = time.perf_counter()
            results.append(run_size(work, n, dim, args.queries, args.duckdb_queries, args.kind))
            r = results[-1]
            print(
                f"  {n:,} x {dim}: done in {time.perf_counter() - started:.0f} s; index build "
                f"{r['build_s']:.0f} s wall, {r['build_cpu_s']:.0f} s CPU, phases (s) {r['phases']}; "
                f"load average now {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    header = (
        f"{'dim':>5} {'vectors':>10} {'index':>18} {'build s':>8} {'build GB':>8} {'recall@10':>9} "
        f"{'batch q/s':>10} {'1-by-1 q/s':>10} {'DuckDB q/s':>10} {'speed-up':>8} {'in-mem q/s':>10} "
        f"{'exact q/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['dim']:>5} {r['vectors']:>10,} {r['kind'] + ' ' + r['params']:>18} {r['build_s']:>8.1f} "
            f"{r['build_gb']:>8.2f} {r['recall']:>9.3f} {r['batch_qps']:>10,.0f} {r['single_qps']:>10,.0f} "
            f"{r['duck_qps']:>10.2f} {r['speedup']:>7,.0f}x {r['duck_mem_qps']:>10.2f} {r['exact_qps']:>9.1f}"
        )
    print(
        "recall@10 against proteoflow's exact scan (DuckDB's top 10 agrees with it: "
        + ", ".join(f"{r['duck_agrees']:.2f}" for r in results)
        + "); speed-up = index one query at a time / DuckDB's Parquet scan; in-mem = DuckDB over the same vectors "
        "loaded into an in-memory table first; exact q/s = proteoflow's exact streaming scan (`search --exact`), batched"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
