"""Shard planning policy: how a run's pending sequences are cut into cost-balanced shards (pure; the plan
file itself is storage.plans).

Sequences are sorted longest first and packed greedily up to a target cost per shard, so each shard holds
similar lengths (little padding in its batches) and the longest shards are dispatched first, which keeps
the tail of a run short under dynamic dispatch. The plan is written once per run and reused on resume,
so shard ids are stable across attempts.

The rule needs only how many sequences there are of each length: :func:`shard_sizes` applies it to those
counts (what a streamed plan reads, whatever the number of sequences), :func:`cut_shards` to a list of
lengths held in memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain, groupby, repeat

from storage.plans import MAX_SHARD_SEQUENCES

SHARDS_PER_WORKER = 4


def embedding_cost(length: int) -> float:
    """Relative cost of embedding one sequence: per-token work plus the quadratic attention term."""
    return length + length * length / 1024


def folding_cost(length: int) -> float:
    """Relative cost of folding one sequence: the trunk's triangular updates grow with the cube of length."""
    return length + length**3 / 65536


def variant_cost(length: int) -> float:
    """Relative cost of a saturation table by masked marginals: one forward pass per residue, each an
    embedding of the whole sequence (wt-marginals needs one pass; its shards are then cut finer than needed)."""
    return length * embedding_cost(length)


def shard_sizes(
    length_counts: Iterable[tuple[int, int]], cost: Callable[[int], float], workers: int
) -> list[int]:
    """How many sequences each shard takes, in order, from ``(length, sequences)`` pairs longest first:
    shards of roughly equal cost, at most MAX_SHARD_SEQUENCES each (the rule of :func:`cut_shards`)."""
    runs = [(cost(length), count) for length, count in length_counts if count > 0]
    if not runs:
        return []
    sequences = sum(count for _, count in runs)
    total = sum(chain.from_iterable(repeat(c, count) for c, count in runs))  # in sequence order, as a list's
    shards = max(1, min(sequences, workers * SHARDS_PER_WORKER, math.ceil(total / max(runs[0][0], 1e-9))))
    target = total / shards
    sizes = [0]
    acc = 0.0
    for c, count in runs:
        for _ in range(count):
            if sizes[-1] and (acc + c > target * 1.05 or sizes[-1] >= MAX_SHARD_SEQUENCES):
                sizes.append(0)
                acc = 0.0
            sizes[-1] += 1
            acc += c
    return sizes


def cut_shards(lengths: list[int], cost: Callable[[int], float], workers: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into shards, longest first, of roughly equal cost."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    counts = [(length, sum(1 for _ in group)) for length, group in groupby(lengths[i] for i in order)]
    shards, start = [], 0
    for size in shard_sizes(counts, cost, workers):
        shards.append(order[start : start + size])
        start += size
    return shards


COSTS: dict[str, Callable[[int], float]] = {
    "embed": embedding_cost,
    "fold": folding_cost,
    "score-variants": variant_cost,
    "predict": embedding_cost,
}
