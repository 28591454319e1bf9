"""Token-budget batching and the out-of-memory fallback ladder (split the batch, then one sequence on CPU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from esm_core.device import free_cached_memory, is_out_of_memory

# Tokens per batch on CPU. Measured on a 2-core Sapphire Rapids (AMX bf16), esm2_t12 shape, bf16, E. coli:
# 2,048 and 4,096 tokens give the same throughput (within noise); 8,192 is ~35% slower and 16,384 ~50% slower
# (activations of a batch no longer stay in cache).
CPU_MAX_TOKENS = 4096
# GPU budget bounds: below the floor kernels are launch-bound; above the ceiling nothing is gained.
GPU_MIN_TOKENS, GPU_MAX_TOKENS = 2048, 1 << 18

Out = TypeVar("Out")


def pack_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group indices of ``lengths`` so each batch's padded size ``len(batch) * (max_len + 2) <= max_tokens``.

    Longest first: the most memory-hungry batch runs first, so an OOM shows up at once, and length-sorted
    neighbours waste little padding. A sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for index in order:
        size = lengths[index] + 2
        if current and (len(current) + 1) * max(width, size) > max_tokens:
            batches.append(current)
            current, width = [], 0
        current.append(index)
        width = max(width, size)
    if current:
        batches.append(current)
    return batches


def activation_bytes_per_token(hidden: int, ffn: int, heads: int, max_len: int, element_bytes: int) -> int:
    """Peak inference activations per token for one layer: residual stream, q/k/v, FFN and one row of
    attention scores per head (the eager / non-flash worst case); layers run one at a time."""
    return element_bytes * (6 * hidden + 2 * ffn + heads * max_len)


def embed_token_budget(
    model: torch.nn.Module, device: torch.device, element_bytes: int = 2, contacts: bool = False
) -> int:
    """Default ``max_tokens`` of an embedding batch (padded tokens, BOS/EOS included) for ``device``: a
    measured constant on CPU; on GPU, 60% of free memory after the weights, divided by the activation
    cost of a full-length (1024-token) sequence.

    With contacts every layer's attention map is kept (layers x heads x T per token), so the budget shrinks
    to what that allows (CPU: 2 GiB of maps), never below one full-length sequence.
    """
    config = model.config
    maps = config.num_hidden_layers * config.num_attention_heads * 1024 * element_bytes if contacts else 0
    if device.type != "cuda":
        return CPU_MAX_TOKENS if not contacts else max(1026, min(CPU_MAX_TOKENS, (2 << 30) // maps))
    free, _total = torch.cuda.mem_get_info(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = maps + activation_bytes_per_token(
        config.hidden_size, config.intermediate_size, config.num_attention_heads, 1024, element_bytes
    )
    budget = int(0.6 * max(free - weights, 0) / per_token)
    return max(1026 if contacts else GPU_MIN_TOKENS, min(GPU_MAX_TOKENS, budget))


def run_with_oom_fallback(
    batch: list[int],
    run: Callable[[list[int]], Out],
    run_on_cpu: Callable[[list[int]], Out],
    device: torch.device,
    fallbacks: list[str] | None = None,
) -> list[tuple[list[int], Out, list[str]]]:
    """``run(batch)``; on OOM halve the batch and retry, down to one sequence, which then goes to
    ``run_on_cpu``. Returns (sub-batch, output, fallbacks taken) for each piece that finally ran."""
    fallbacks = list(fallbacks or [])
    try:
        return [(batch, run(batch), fallbacks)]
    except Exception as exc:  # noqa: BLE001 - only OOMs are handled, everything else re-raised
        if not is_out_of_memory(exc):
            raise
    free_cached_memory(device)
    if len(batch) > 1:
        half = len(batch) // 2
        note = f"oom on {device.type}: batch of {len(batch)} split into {half}+{len(batch) - half}"
        return [
            *run_with_oom_fallback(batch[:half], run, run_on_cpu, device, [*fallbacks, note]),
            *run_with_oom_fallback(batch[half:], run, run_on_cpu, device, [*fallbacks, note]),
        ]
    note = f"oom on {device.type}: single sequence re-run on cpu"
    return [(batch, run_on_cpu(batch), [*fallbacks, note])]
