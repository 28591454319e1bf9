"""Shard planning policy: how a run's pending sequences are cut into cost-balanced shards (pure; the plan
file itself is storage.plans).

Sequences are sorted longest first and packed greedily up to a target cost per shard, so each shard holds
similar lengths (little padding in its batches) and the longest shards are dispatched first, which keeps
the tail of a run short under dynamic dispatch. The plan is written once per run and reused on resume,
so shard ids are stable across attempts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

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


def cut_shards(lengths: list[int], cost: Callable[[int], float], workers: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into shards, longest first, of roughly equal cost."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    costs = [cost(lengths[i]) for i in order]
    total = sum(costs)
    if not order:
        return []
    count = max(1, min(len(order), workers * SHARDS_PER_WORKER, math.ceil(total / max(costs[0], 1e-9))))
    target = total / count
    shards: list[list[int]] = [[]]
    acc = 0.0
    for index, c in zip(order, costs, strict=True):
        if shards[-1] and (acc + c > target * 1.05 or len(shards[-1]) >= MAX_SHARD_SEQUENCES):
            shards.append([])
            acc = 0.0
        shards[-1].append(index)
        acc += c
    return shards


COSTS: dict[str, Callable[[int], float]] = {
    "embed": embedding_cost,
    "fold": folding_cost,
    "score-variants": variant_cost,
    "predict": embedding_cost,
}
