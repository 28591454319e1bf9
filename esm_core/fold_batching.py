"""Folding inputs: complexes joined with ESMFold's glycine linker and residue-index gap, token-budget
batches (padding counted) and the chunk-size rules used by the folder and its out-of-memory back-off."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers.models.esm.openfold_utils import residue_constants

from esm_core import alphabet
from esm_core.structure_io import CHAIN_IDS

# As in ESMFold's own ``infer``: chains joined by 25 glycines, residue index jumps by 512 per chain.
LINKER = "G" * 25
RESIDUE_INDEX_OFFSET = 512
GPU_FOLD_TOKENS = 1024  # tokens per batch on a GPU: ESMFold's fold.py default (--max-tokens-per-batch)
# On a CPU every input goes alone: a budget of one token is below any input, and take_batch always takes one.
ONE_INPUT_PER_BATCH = 1
MIN_CHUNK_SIZE = 8


@dataclass(frozen=True)
class FoldInput:
    """One sequence (or complex) as model input: T tokens (linker included), N kept residues."""

    key: str
    chains: tuple[str, ...]  # chain sequences, normalised as ingest does
    aatype: torch.Tensor  # [T] long, restypes_with_x order
    residue_index: torch.Tensor  # [T] long, position ids for the folding trunk
    keep: torch.Tensor  # [T] bool, False on linker residues
    chain_index: np.ndarray  # [N] int, chain of each kept residue

    @property
    def tokens(self) -> int:
        return int(self.aatype.shape[0])

    @property
    def length(self) -> int:
        return int(self.chain_index.shape[0])


def encode(key: str, sequence: str, linker: str = LINKER, offset: int = RESIDUE_INDEX_OFFSET) -> FoldInput:
    """Encode ``sequence`` (chains separated by ':') the way ESMFold folds complexes.

    Each chain is normalised by ingest's rule (:func:`esm_core.alphabet.normalise`); unknown letters
    (U, B, Z, O, X) map to X as in transformers' ``infer``; empty chains are an error.
    """
    chains = tuple(alphabet.normalise(chain, key) for chain in sequence.split(":"))
    if not all(chains):
        raise ValueError(f"{key!r}: empty sequence or empty chain in {sequence[:60]!r}")
    if len(chains) > len(CHAIN_IDS):
        raise ValueError(f"{key!r}: {len(chains)} chains; at most {len(CHAIN_IDS)} are supported")
    aatype: list[int] = []
    residx: list[int] = []
    keep: list[bool] = []
    chain_index: list[int] = []
    for i, chain in enumerate(chains):
        for part, is_linker in ((linker, True), (chain, False)) if i else ((chain, False),):
            # ESMFold: position = running token position + 512 * chain, the linker numbered with the chain before it
            shift = (i - 1 if is_linker else i) * offset
            residx.extend(range(len(aatype) + shift, len(aatype) + shift + len(part)))
            aatype.extend(_aatype(part, key))
            keep.extend([not is_linker] * len(part))
        chain_index.extend([i] * len(chain))
    return FoldInput(
        key=key,
        chains=chains,
        aatype=torch.tensor(aatype, dtype=torch.long),
        residue_index=torch.tensor(residx, dtype=torch.long),
        keep=torch.tensor(keep, dtype=torch.bool),
        chain_index=np.asarray(chain_index, dtype=np.int64),
    )


def _aatype(chain: str, key: str) -> list[int]:
    try:
        onehot = residue_constants.sequence_to_onehot(
            chain, residue_constants.restype_order_with_x, map_unknown_to_x=True
        )
    except ValueError as exc:
        raise ValueError(f"{key!r}: {exc}") from None
    return onehot.argmax(axis=1).tolist()


def collate(
    batch: Sequence[FoldInput], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ``input_ids``, ``attention_mask`` and ``position_ids`` [B, T_max] on ``device``."""
    width = max(item.tokens for item in batch)
    aatype = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    residx = torch.zeros(len(batch), width, dtype=torch.long)
    for row, item in enumerate(batch):
        aatype[row, : item.tokens] = item.aatype
        mask[row, : item.tokens] = 1
        residx[row, : item.tokens] = item.residue_index
    return aatype.to(device), mask.to(device), residx.to(device)


def fold_token_budget(device: torch.device) -> int:
    """Default ``max_tokens`` of a fold batch (batch size * longest input, padding counted): 1024 on a GPU
    (ESMFold's fold.py default); on a CPU one input per batch, because the cores are already busy inside
    one sequence and padding costs L^3 in triangle attention (measured 1.4x slower batched on the tiny
    model, bench/fold.py)."""
    return GPU_FOLD_TOKENS if device.type == "cuda" else ONE_INPUT_PER_BATCH


def take_batch(queue: list[FoldInput], max_tokens: int) -> list[FoldInput]:
    """Pop the next batch from ``queue`` (sorted longest first): as many as fit ``batch * longest <=
    max_tokens`` (padding counted); a sequence longer than the budget goes alone."""
    longest = queue[0].tokens
    size = max(1, min(len(queue), max_tokens // longest))
    batch = queue[:size]
    del queue[:size]
    return batch


def sort_longest_first(inputs: Sequence[FoldInput]) -> list[FoldInput]:
    """Longest first, so an out-of-memory failure shows at the start of a run, not hours in."""
    return sorted(inputs, key=lambda item: (-item.tokens, item.key))


def auto_chunk_size(tokens: int) -> int | None:
    """Axial-attention chunk for a batch whose longest input has ``tokens`` residues.

    Triangle attention holds heads * L^3 scores unchunked (~2 GB at L=512 in fp32), so: no chunking
    up to 256, then 128 up to 512, 64 up to 1024, 32 beyond.
    """
    if tokens <= 256:
        return None
    if tokens <= 512:
        return 128
    if tokens <= 1024:
        return 64
    return 32


def smaller_chunk_size(current: int | None, tokens: int) -> int | None:
    """The next chunk size after an out-of-memory error: half the current (half the length when
    unchunked), a power of two; None once below ``MIN_CHUNK_SIZE``."""
    start = min(current, tokens) if current is not None else tokens
    nxt = 1 << max(0, (start - 1).bit_length() - 1)  # largest power of two below start
    return nxt if nxt >= MIN_CHUNK_SIZE else None
