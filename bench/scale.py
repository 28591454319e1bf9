"""Scale of the driver: planning memory over up to 10^7 sequences, and dispatch overhead per shard.

    python bench/scale.py --planning [--sizes 100000,1000000,10000000] [--workdir /tmp/proteoflow-scale]
    python bench/scale.py --dispatch [--shards 10000] [--nodes 3]
    (neither flag: both sections)

Planning. A synthetic store per size N holds one ingest run of N distinct sequences, written with the store's
own writers in ingest's format (``sequences/<run>.parquet`` sorted by seq_hash in 16,384-row groups,
``members/run_id=<run>/part-0.parquet`` in record order, a completed ingest run record) instead of running
ingest on an N-record FASTA (too slow on 2 cores at 10^7). Lengths are drawn, with replacement, from the E. coli
K-12 proteome (/work/shared/data); residues are uniform over the 20 standard amino acids (the planner only
sees counts, lengths and hashes; the residues are there so the sequence column weighs what it would). Each
planner runs in its own subprocess, which reports its peak RSS (ru_maxrss) and the wall time of the planning
step: the plan task's calls for a fresh run (nothing done, nothing claimed) up to the plan read back.
  baseline:      the same subprocess's RSS once everything is imported, before planning;
  materialized:  the plan task before issue 10: plans.pending_sequences (the whole pending set as one Arrow
                 table) + flows.planning.cut_shards (Python lists of every length) + plans.write_plan;
  streamed:      the plan task now: plans.Pending + plans.length_counts + planning.shard_sizes +
                 plans.write_pending_plan (DuckDB streams the pending rows, under a memory limit, into
                 length bands on scratch disk; each band is sorted alone and cut into row groups).
Both plans are then compared row group by row group: the same shards, sequences and order.

Dispatch. A Ray cluster of several logical nodes on loopback (``ray start`` per node, head on 127.0.0.2, the
others on 127.0.0.3, ...; each in its own process group, which is killed at the end: never ``ray stop``).
``--shards`` shards of a no-op engine are dispatched to one no-op actor per CPU slot:
  baseline:         ``ray.get([actor.run_shard.remote(task) for every shard])`` round robin over the same
                    actors, each task a ShardTask without sequences;
  pool:             proteoflow's ActorPool.run (dynamic dispatch, one shard in flight per actor), the same tasks;
  pool+plan.items:  the same, each ShardTask holding its shard's 10 sequences read from a real plan file (one
                    row group per shard), as the compute task builds it.
The no-op actor replaces flows.actors.ShardWorker for this process only (flows.pool's ``ShardWorker`` name is
rebound before the pool is built), so ActorPool's own constructor, actor options and dispatch loop run as is.

Measured (2 shared cores, load average 6 to 8 from other test runs, so wall times are loose; 23 GB RAM):

  planning, --workers 8   wall s   peak RSS MB   (import baseline 98 MB; same run for both planners)
  N=10^5  materialized      0.4        255
          streamed          1.3        261       plans identical
  N=10^6  materialized     35.7        991
          streamed          5.6        373       plans identical
  N=10^7  materialized     fails after 29 s at 7,507 MB: ArrowInvalid, offset overflow (3.1 GB of residues
                           in one string column, taken shard by shard)
          streamed        188.8        429       4,883 shards
  Before issue 10 (the same materialized path at the previous commit, its own run): 0.4 s / 254 MB,
  52.3 s / 960 MB, and at 10^7 the same failure at 7,839 MB. The materialized time is quadratic: each shard's
  take() concatenates the whole pending table (0.15 s a shard at 10^6).

  dispatch, 10^4 shards, 3 nodes (127.0.0.2-4, 2 logical CPUs each), 6 no-op actors, ms per shard:
                     before the plan file was opened once    after
  baseline                  0.390                            0.454
  pool                      1.008  (+0.618)                  1.068  (+0.614)
  pool+plan.items          93.561  (+93.171)                 1.541  (+1.087)
  Plan.items parsed the plan's footer (one row group per shard) at every shard: 112 ms a shard at 10^4
  shards, growing with their number. Plan now keeps its file open.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ECOLI = Path(os.environ.get("PROTEOFLOW_SHARED_DATA", ROOT.parent / "shared" / "data")) / (
    "ecoli_k12_UP000000625.fasta.gz"
)
AMINO_ACIDS = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
CHUNK = 1 << 17  # sequences generated per batch
INGEST_RUN = "ingest-synthetic"
COMPUTE_RUN = "embed-scale-bench"


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak RSS so far in MB: VmHWM, which (unlike ru_maxrss) does not inherit the peak of the
    process that forked it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------- synthetic store


def ecoli_lengths() -> np.ndarray:
    """Residue counts of the E. coli K-12 proteome's records (terminal '*' not counted)."""
    lengths, current = [], None
    with gzip.open(ECOLI, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                if current is not None:
                    lengths.append(current)
                current = 0
            elif current is not None:
                current += len(line.strip().rstrip("*"))
    if current is not None:
        lengths.append(current)
    return np.array([n for n in lengths if n > 0], dtype=np.int32)


def build_store(root: Path, n: int, seed: int = 10) -> dict:
    """A store holding one ingest run of ``n`` synthetic sequences, in ingest's format (see the docstring)."""
    from storage.ingest import SEQUENCE_ROW_GROUP_ROWS
    from storage.layout import ParquetSink, Store
    from storage.runs import IngestCounts, RunRecord
    from storage.schemas import MEMBER_SCHEMA, SEQUENCE_SCHEMA

    marker = root.with_name(root.name + ".json")
    if marker.exists() and root.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(root, ignore_errors=True)
    marker.unlink(missing_ok=True)
    start = time.perf_counter()
    store = Store(root).ensure()
    source = ecoli_lengths()
    rng = np.random.default_rng(seed)
    unsorted = root.parent / f".{root.name}-unsorted.parquet"
    members = ParquetSink(store.run_dir("members", INGEST_RUN) / "part-0.parquet", MEMBER_SCHEMA, "members")
    writer = pq.ParquetWriter(unsorted, SEQUENCE_SCHEMA, compression="zstd", compression_level=1)
    residues = 0
    for first in range(0, n, CHUNK):
        count = min(CHUNK, n - first)
        lengths = rng.choice(source, count).astype(np.int32)
        offsets = np.zeros(count + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        data = AMINO_ACIDS[rng.integers(0, len(AMINO_ACIDS), int(offsets[-1]), dtype=np.uint8)].tobytes()
        view = memoryview(data)
        bounds = offsets.tolist()
        hashes = pa.array(
            [
                hashlib.md5(view[a:b], usedforsecurity=False).hexdigest()
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ],
            pa.string(),
        )
        sequences = pa.LargeStringArray.from_buffers(count, pa.py_buffer(offsets), pa.py_buffer(data))
        length_array = pa.array(lengths, pa.int32())
        writer.write_table(
            pa.table([hashes, sequences.cast(pa.string()), length_array], schema=SEQUENCE_SCHEMA)
        )
        members.write(
            pa.table(
                {
                    "record_index": pa.array(np.arange(first, first + count, dtype=np.int64)),
                    "seq_id": pa.array([f"syn{i:08d}" for i in range(first, first + count)]),
                    "description": pa.array([""] * count, pa.string()),
                    "seq_hash": hashes,
                    "length": length_array,
                    "source": pa.array(["synthetic.fasta"] * count),
                },
                schema=MEMBER_SCHEMA,
            )
        )
        residues += int(offsets[-1])
    writer.close()
    members.close()
    members.commit()
    # ingest's pass 2 writes the run's new sequences sorted by hash: DuckDB sorts them here, spilling to disk
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET memory_limit = '1GB'")
    con.execute(f"SET temp_directory = '{root.parent / ('.' + root.name + '-spill')}'")
    distinct = con.execute(f"SELECT count(DISTINCT seq_hash) FROM read_parquet('{unsorted}')").fetchall()[0][
        0
    ]
    if distinct != n:
        sys.exit(f"synthetic store: {n - distinct} duplicate sequences (change --seed)")
    sink = ParquetSink(
        store.table_dir("sequences") / f"{INGEST_RUN}.parquet",
        SEQUENCE_SCHEMA,
        "sequences",
        {"run_id": INGEST_RUN, "inputs": ["synthetic.fasta"]},
        row_group_rows=SEQUENCE_ROW_GROUP_ROWS,
    )
    relation = con.sql(f"SELECT * FROM read_parquet('{unsorted}') ORDER BY seq_hash")
    reader = getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader
    for batch in reader(SEQUENCE_ROW_GROUP_ROWS):
        sink.write(batch.cast(SEQUENCE_SCHEMA))
    sink.close()
    sink.commit()
    con.close()
    unsorted.unlink()
    shutil.rmtree(root.parent / ("." + root.name + "-spill"), ignore_errors=True)
    counts = IngestCounts(records=n, accepted=n, residues=residues, distinct=n, new_sequences=n,
                          new_residues=residues)  # fmt: skip
    RunRecord(INGEST_RUN, "ingest", params={"inputs": ["synthetic.fasta"]}, counts=counts).finish(
        store, "completed"
    )
    info = {"n": n, "residues": residues, "seed": seed, "build_s": round(time.perf_counter() - start, 1)}
    marker.write_text(json.dumps(info))
    return info


def disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


# ------------------------------------------------------------------------------------ planning subprocess


def plan_in_this_process(store_root: str, planner: str, workers: int) -> dict:
    """The plan task's planning calls for a fresh run; prints what it measured (run in a subprocess)."""
    import pyarrow as pa

    from flows import planning
    from storage import plans, shards
    from storage.layout import Store

    store = Store(store_root)
    cost = planning.COSTS["embed"]
    store.plan_path(COMPUTE_RUN).unlink(missing_ok=True)
    before = peak_rss_mb()
    start = time.perf_counter()
    plan = plans.load_plan(store, COMPUTE_RUN, cost)
    done = pa.array([], pa.string())  # a fresh run: nothing computed, no other run's live claim
    claimed = plans.claimed_by_others(store, "0" * 40, COMPUTE_RUN)
    exclude = pa.concat_arrays([done, claimed])
    if planner == "materialized":  # the plan task before issue 10
        todo = plans.pending_sequences(store, [INGEST_RUN], exclude)
        if plan is None or not plans.covers(plan, todo.column("seq_hash")):
            cut = planning.cut_shards(todo.column("length").to_pylist(), cost, workers)
            plan = plans.write_plan(
                store, COMPUTE_RUN, todo, cut, cost, shards.next_shard_id(store, COMPUTE_RUN)
            )
    else:  # the plan task now
        pending = plans.Pending(store, [INGEST_RUN], exclude)
        if plan is None or not plans.covers(plan, pending):
            sizes = planning.shard_sizes(plans.length_counts(pending), cost, workers)
            plan = plans.write_pending_plan(
                store, COMPUTE_RUN, pending, sizes, cost, shards.next_shard_id(store, COMPUTE_RUN)
            )
    wall = time.perf_counter() - start
    kept = store.root.parent / f"{store.root.name}.{planner}.plan.parquet"
    os.replace(plan.path, kept)
    return {"planner": planner, "wall_s": wall, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
            "shards": len(plan.shards), "sequences": plan.sequences, "residues": plan.residues,
            "plan": str(kept)}  # fmt: skip


def run_planner(cmd: list[str], timeout: float) -> dict:
    """Run one planning subprocess; past ``timeout`` it is killed and its peak RSS so far reported."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    start = time.monotonic()
    deadline, peak = start + timeout, 0.0
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            peak = max(peak, peak_rss_mb(proc.pid))
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
        return {"error": f"not finished after {timeout:.0f} s", "peak_rss_mb": peak, "wall_s": timeout}
    out, err = proc.communicate()
    if proc.returncode:
        return {"error": f"rc {proc.returncode}: {err.strip().splitlines()[-1] if err.strip() else ''}",
                "peak_rss_mb": peak, "wall_s": time.monotonic() - start}  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def same_plans(a: Path, b: Path) -> bool:
    """Whether two plan files hold the same shards (row groups) with the same rows in the same order."""
    fa, fb = pq.ParquetFile(a), pq.ParquetFile(b)
    if fa.metadata.num_row_groups != fb.metadata.num_row_groups:
        return False
    for rg in range(fa.metadata.num_row_groups):
        ta = fa.read_row_group(rg, columns=["shard_id", "seq_hash", "length"])
        tb = fb.read_row_group(rg, columns=["shard_id", "seq_hash", "length"])
        if not ta.equals(tb):
            return False
    return True


def planning_section(args: argparse.Namespace) -> None:
    free = shutil.disk_usage(args.workdir).free / 1e9
    print(f"planning: workdir {args.workdir} ({free:.0f} GB free), cpus={os.cpu_count()}, "
          f"workers={args.workers}, planners {','.join(args.planners)}")  # fmt: skip
    header = f"{'N':>12}{'planner':>14}{'wall s':>9}{'RSS before MB':>15}{'peak RSS MB':>13}{'shards':>8}"
    rows = []
    for n in args.sizes:
        root = args.workdir / f"store-{n}"
        info = build_store(root, n)
        print(f"store N={n:,}: {info['residues']:,} residues, {disk_mb(root):,.0f} MB on disk "
              f"(built in {info['build_s']} s)", flush=True)  # fmt: skip
        results = {}
        for planner in args.planners:
            cmd = [sys.executable, __file__, "_plan", str(root), planner, str(args.workers)]
            result = run_planner(cmd, args.timeout)
            if "error" in result:
                print(f"{n:>12,}{planner:>14}  {result['error']}", flush=True)
                rows.append(f"{n:>12,}{planner:>14}{result['wall_s']:9.0f}{'':15}"
                            f"{result['peak_rss_mb']:13.0f}  (failed: {result['error'][:100]})")  # fmt: skip
                continue
            results[planner] = result
            r = results[planner]
            rows.append(f"{n:>12,}{planner:>14}{r['wall_s']:9.1f}{r['rss_before_mb']:15.0f}"
                        f"{r['peak_rss_mb']:13.0f}{r['shards']:8}")  # fmt: skip
            print(rows[-1], flush=True)
        if len(results) == 2:
            a, b = (Path(r["plan"]) for r in results.values())
            print(f"{'':12}plans identical (shards, rows, order): {same_plans(a, b)}", flush=True)
        for r in results.values():
            Path(r["plan"]).unlink(missing_ok=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            root.with_name(root.name + ".json").unlink(missing_ok=True)
    print("\n" + header)
    print("\n".join(rows))
    print("RSS before: the planning subprocess once imports are done (the baseline); peak RSS: its VmHWM "
          "(sampled every 0.5 s by the parent for a run that failed)")  # fmt: skip


# -------------------------------------------------------------------------------------------- dispatch


class NoopWorker:
    """flows.actors.ShardWorker's interface with nothing inside: its cost is Ray's and the pool's alone."""

    def __init__(self, kind, model, options, threads=None) -> None:
        self.shards = 0

    def identity(self):
        return SimpleNamespace(model=SimpleNamespace(sha="noop"))

    def progress(self) -> int:
        return 0

    def where(self) -> dict:
        import ray

        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def run_shard(self, task):
        from flows.engines import ShardResult

        self.shards += 1
        return ShardResult(outputs=[])  # what a shard returns (its manifest), with nothing in it


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PROTEOFLOW_", "PREFECT_"))}
    ray_bin = str(Path(sys.executable).parent)
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{ray_bin}{os.pathsep}{env.get('PATH', '')}"}  # fmt: skip


def start_node(tmp: Path, ip: str, cpus: int, head_gcs: str | None) -> tuple[int, str]:
    """``ray start`` in its own process group; returns (process group, GCS address) once the node joined."""
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "start", "--node-ip-address", ip, "--num-cpus", str(cpus), "--num-gpus", "0",
           "--temp-dir", str(tmp), "--disable-usage-stats"]  # fmt: skip
    for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"):  # fmt: skip
        cmd += [flag, str(free_port(ip))]
    gcs = head_gcs or f"{ip}:{free_port(ip)}"
    if head_gcs is None:
        cmd += ["--head", "--port", gcs.split(":")[1], "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port(ip))]  # fmt: skip
    else:
        cmd += ["--address", head_gcs]
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(cmd, env=node_env(), cwd=tmp, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out, _ = proc.communicate(timeout=180)
    if proc.returncode:
        kill_group(proc.pid)
        raise RuntimeError(f"ray start on {ip} failed:\n{out[-3000:]}")
    return proc.pid, gcs


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def plan_with_shards(workdir: Path, shards: int, per_shard: int) -> Path:
    """A real plan file of ``shards`` row groups of ``per_shard`` synthetic sequences each."""
    from flows.planning import embedding_cost
    from storage import plans
    from storage.layout import Store

    n = shards * per_shard
    root = workdir / f"store-{n}"
    build_store(root, n)
    store = Store(root)
    todo = plans.pending_sequences(store, [INGEST_RUN], pa.array([], pa.string()))
    cut = [list(range(i, min(i + per_shard, n))) for i in range(0, n, per_shard)]
    return plans.write_plan(store, COMPUTE_RUN, todo, cut, embedding_cost).path


def dispatch_section(args: argparse.Namespace) -> None:
    import ray

    import flows.pool
    from flows.engines import EmbedOptions, ShardTask
    from flows.job import PoolOptions
    from storage import plans
    from storage.layout import Store
    from storage.results import ModelIdentity

    plan_path = plan_with_shards(args.workdir, args.shards, 10)
    store_root = plan_path.parents[1]
    plan = plans.load_plan(Store(store_root), COMPUTE_RUN, lambda length: float(length))
    assert plan is not None and len(plan.shards) == args.shards
    ips = [f"127.0.0.{2 + i}" for i in range(args.nodes)]
    groups: list[int] = []
    tmp = args.workdir / "ray"
    try:
        start = time.perf_counter()
        head, gcs = start_node(tmp / "n0", ips[0], args.cpus_per_node, None)
        groups.append(head)
        for i, ip in enumerate(ips[1:], start=1):
            groups.append(start_node(tmp / f"n{i}", ip, args.cpus_per_node, gcs)[0])
        os.environ["RAY_AUTH_MODE"] = "disabled"
        ray.init(address=gcs, _node_ip_address=ips[0], logging_level="ERROR", log_to_driver=False)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        print(f"dispatch: {len(nodes)} Ray nodes ({', '.join(sorted(n['NodeManagerAddress'] for n in nodes))}), "
              f"{ray.cluster_resources().get('CPU', 0):g} logical CPUs, started in {time.perf_counter() - start:.0f} s; "
              f"{args.shards:,} shards, cpus={os.cpu_count()}", flush=True)  # fmt: skip

        flows.pool.ShardWorker = NoopWorker  # this process only: the pool builds no-op actors
        workers = args.nodes * args.cpus_per_node
        pool = flows.pool.ActorPool(
            "embed",
            "noop",
            EmbedOptions(),
            PoolOptions(workers=workers, cpus_per_worker=1, gpus_per_worker=0, max_attempts=1, spread=True),
        )
        pool.identity(timeout=300)
        where = {p["node_id"] for p in pool.placements()}
        print(f"{workers} no-op actors on {len(where)} nodes", flush=True)
        # warm-up: first calls pay for connections and function export
        model = ModelIdentity("noop", "0" * 40)
        root = str(store_root.absolute())

        def empty(shard: int) -> ShardTask:
            return ShardTask(shard, [], COMPUTE_RUN, root, model)

        def planned(shard: int) -> ShardTask:  # as the compute task builds it: the shard's row group read
            return ShardTask(shard, plan.items(shard), COMPUTE_RUN, root, model)

        ray.get([a.run_shard.remote(empty(-1)) for a in pool.actors for _ in range(20)])

        figures = {}
        for name in ("baseline", "pool", "pool+plan.items"):
            start = time.perf_counter()
            if name == "baseline":
                refs = [pool.actors[s % workers].run_shard.remote(empty(s)) for s in range(args.shards)]
                ray.get(refs)
                computed = len(refs)
            else:
                task = empty if name == "pool" else planned
                report = pool.run(list(plan.shards), task, lambda s, r, d: None)
                computed = len(report.computed)
                assert computed == args.shards and not report.failed, report
            figures[name] = (time.perf_counter() - start, computed)
        pool.shutdown()
        print(f"\n{'':18}{'wall s':>9}{'shards':>8}{'ms/shard':>10}{'ms/shard over baseline':>24}")
        base = figures["baseline"][0] / args.shards
        for name, (wall, computed) in figures.items():
            per = wall / computed
            extra = "" if name == "baseline" else f"{(per - base) * 1e3:24.3f}"
            print(f"{name:18}{wall:9.2f}{computed:8}{per * 1e3:10.3f}{extra}")
        print("baseline: every shard submitted at once round robin (no dynamic dispatch, no retries); "
              "pool: flows.pool.ActorPool.run, one shard in flight per actor")  # fmt: skip
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for pgid in reversed(groups):
            kill_group(pgid)
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(store_root, ignore_errors=True)
            store_root.with_name(store_root.name + ".json").unlink(missing_ok=True)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "_plan":
        print(json.dumps(plan_in_this_process(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--planning", action="store_true", help="planning memory and time section")
    parser.add_argument("--dispatch", action="store_true", help="dispatch overhead section")
    parser.add_argument("--sizes", default="100000,1000000,10000000",
                        help="comma-separated N (sequences) for --planning")  # fmt: skip
    parser.add_argument("--planners", default="materialized,streamed")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per planning subprocess")
    parser.add_argument("--workers", type=int, default=8, help="the run's --workers (shards per worker: 4)")
    parser.add_argument("--shards", type=int, default=10_000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--cpus-per-node", type=int, default=2, help="logical CPUs (one no-op actor each)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/proteoflow-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic stores for the next run")
    args = parser.parse_args()
    args.sizes = [int(float(s)) for s in args.sizes.split(",")]
    args.planners = args.planners.split(",")
    args.workdir.mkdir(parents=True, exist_ok=True)
    both = not (args.planning or args.dispatch)
    if args.planning or both:
        planning_section(args)
    if args.dispatch or both:
        dispatch_section(args)


if __name__ == "__main__":
    main()
