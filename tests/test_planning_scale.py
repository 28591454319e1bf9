"""The streamed plan (plans.Pending -> length_counts -> planning.shard_sizes -> write_pending_plan) is the plan
the materialized one was: same shards, same sequences in the same order, same costs, on real E. coli records.

The reference cut below is the pre-streaming ``cut_shards`` verbatim, so the rule itself is pinned, not only
the agreement of the two code paths that now share it.
"""

from __future__ import annotations

import math
import pickle

import pyarrow as pa
import pytest
from conftest import ECOLI, read_fasta_records, require_shared, write_slice

from flows import planning
from storage import objects, plans
from storage.ingest import ingest
from storage.layout import Store


def reference_cut(lengths: list[int], cost, workers: int, cap: int) -> list[list[int]]:
    """flows.planning.cut_shards as it was before planning streamed."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    costs = [cost(lengths[i]) for i in order]
    total = sum(costs)
    if not order:
        return []
    count = max(
        1, min(len(order), workers * planning.SHARDS_PER_WORKER, math.ceil(total / max(costs[0], 1e-9)))
    )
    target = total / count
    shards: list[list[int]] = [[]]
    acc = 0.0
    for index, c in zip(order, costs, strict=True):
        if shards[-1] and (acc + c > target * 1.05 or len(shards[-1]) >= cap):
            shards.append([])
            acc = 0.0
        shards[-1].append(index)
        acc += c
    return shards


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Store, str]:
    """Two overlapping ingest runs of real records; the second also repeats some of its own records, so its
    members hold duplicates and sequences that the first run's sequences file stores."""
    tmp = tmp_path_factory.mktemp("planning-scale")
    store = Store(tmp / "store")
    ingest(store, [str(write_slice(ECOLI, tmp / "a.fasta", start=0, count=150))])
    records = read_fasta_records(require_shared(ECOLI))[100:400]
    second = tmp / "b.fasta"
    second.write_text("".join(f">{h}\n{s}\n" for h, s in records + records[:40]))
    run = ingest(store, [str(second)]).run_id
    return store, run


def plan_rows(plan: plans.Plan) -> list[pa.Table]:
    pf = objects.parquet_file(plan.path)
    return [pf.read_row_group(rg) for rg in range(pf.metadata.num_row_groups)]


@pytest.mark.parametrize(
    ("cost_name", "workers", "cap", "band_bytes", "open_bands"),
    [
        ("embed", 2, 2048, 16 << 20, 256),  # the defaults: one band, one pass
        ("fold", 3, 2048, 20_000, 4),  # many bands over several passes
        ("embed", 64, 7, 300, 5),  # lengths split by seq_hash prefix; shards capped at 7 sequences
        ("score-variants", 1, 2048, 50_000, 1),
    ],
)
def test_streamed_plan_is_the_materialized_plan(
    store, monkeypatch, cost_name, workers, cap, band_bytes, open_bands
) -> None:
    store, run = store
    monkeypatch.setattr(planning, "MAX_SHARD_SEQUENCES", cap)
    monkeypatch.setattr(plans, "MAX_SHARD_SEQUENCES", cap)
    monkeypatch.setattr(plans, "BAND_BYTES", band_bytes)
    monkeypatch.setattr(plans, "OPEN_BANDS", open_bands)
    monkeypatch.setattr(plans, "PLAN_BATCH_ROWS", 5)  # shards straddle batches and bands
    cost = planning.COSTS[cost_name]
    todo = plans.pending_sequences(store, [run], pa.array([], pa.string()))
    lengths = todo.column("length").to_pylist()
    assert todo.num_rows == 300  # distinct: the 40 repeated records are one sequence each
    expected = reference_cut(lengths, cost, workers, cap)
    assert planning.cut_shards(lengths, cost, workers) == expected
    old = plans.write_plan(store, "materialized", todo, expected, cost, first_shard=5)

    pending = plans.Pending(store, [run], pa.array([], pa.string()))
    sizes = planning.shard_sizes(plans.length_counts(pending), cost, workers)
    assert sizes == [len(shard) for shard in expected]
    bands = plans.Bands(pending.counts)
    count, split = bands.count, int(bands.parts.max())
    assert (count, split) == (1, 1) if band_bytes == 16 << 20 else count > open_bands
    assert split > 1 if band_bytes < 1_000 else True
    new = plans.write_pending_plan(store, "streamed", pending, sizes, cost, first_shard=5)

    assert new.shards == old.shards and new.first_shard == old.first_shard == 5
    assert new.plan_id != old.plan_id
    assert len(new.shards) > 1 and max(s.sequences for s in new.shards.values()) <= cap
    for a, b in zip(plan_rows(old), plan_rows(new), strict=True):
        assert a.equals(b)  # one row group per shard, same rows in the same order
    rows = pa.concat_tables(plan_rows(new))
    assert rows.column("length").to_pylist() == sorted(lengths, reverse=True)  # longest first
    assert new.items(7) == old.items(7)


def test_exclusions_coverage_and_empty_plans(store) -> None:
    store, run = store
    cost = planning.embedding_cost
    everything = plans.pending_sequences(store, [run], pa.array([], pa.string())).column("seq_hash")
    exclude = everything.combine_chunks().take(pa.array(range(0, len(everything), 3)))
    pending = plans.Pending(store, [run], exclude)
    sizes = planning.shard_sizes(plans.length_counts(pending), cost, 2)
    plan = plans.write_pending_plan(store, "partial", pending, sizes, cost)
    todo = plans.pending_sequences(store, [run], exclude)
    assert plan.sequences == todo.num_rows == 200
    assert plan.hashes().to_pylist() == todo.column("seq_hash").to_pylist()
    hashes = plans.pending_sequences(store, [run], exclude, columns=("seq_hash",))
    assert hashes.column_names == ["seq_hash"] and hashes.column(0).equals(todo.column("seq_hash"))

    assert plans.covers(plan, pending) and plans.covers(plan, todo.column("seq_hash"))
    grown = plans.Pending(store, [run], pa.array([], pa.string()))  # the excluded ones are pending again
    assert not plans.covers(plan, grown) and not plans.covers(plan, everything)

    nothing = plans.Pending(store, [run], everything.combine_chunks())
    assert plans.length_counts(nothing) == [] and planning.shard_sizes([], cost, 4) == []
    empty = plans.write_pending_plan(store, "empty", nothing, [], cost)
    assert empty.shards == {} and plans.covers(empty, nothing)
    assert plans.length_counts(plans.Pending(store, ["no-such-run"], exclude)) == []

    with pytest.raises(RuntimeError, match="changed while the plan was written"):
        plans.write_pending_plan(store, "wrong", pending, [*sizes, 1], cost)
    assert plans.load_plan(store, "wrong", cost) is None  # nothing committed


def test_plan_file_is_opened_once(store, monkeypatch) -> None:
    """Dispatching a shard reads its row group without parsing the plan's footer again: the footer holds a
    row group per shard, so parsing it per shard made dispatch cost grow with the number of shards."""
    store, run = store
    cost = planning.embedding_cost
    pending = plans.Pending(store, [run], pa.array([], pa.string()))
    plans.write_pending_plan(store, "opened", pending, planning.shard_sizes(pending.counts, cost, 4), cost)
    opened = []
    real = objects.parquet_file
    monkeypatch.setattr(objects, "parquet_file", lambda path: opened.append(path) or real(path))
    plan = plans.load_plan(store, "opened", cost)
    assert plan is not None and len(plan.shards) > 1
    items = [plan.items(s) for s in plan.shards] + [plan.hashes(list(plan.shards)[:2]).to_pylist()]
    assert len(opened) == 1 and sum(len(i) for i in items[:-1]) == plan.sequences
    again = pickle.loads(pickle.dumps(plan))  # the open file stays behind; the copy opens its own
    assert again.items(plan.first_shard) == plan.items(plan.first_shard) and len(opened) == 2
